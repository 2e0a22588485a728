"""Signs packed at 1 bit per value into real uint8 storage.

Layout: the tensor is flattened row-major; element i goes to byte i // 8, bit
7 - i % 8 (most significant bit first); bit 1 means +1, bit 0 means -1; zeros
count as +1 (BitStack's convention). The last byte is padded with 0 bits, so a
tensor of N values takes ceil(N / 8) bytes.
"""

from __future__ import annotations

import math

import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def packed_size(numel: int) -> int:
    """Bytes that ``numel`` packed signs take: ceil(numel / 8)."""
    return math.ceil(numel / 8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """sign(x) of any shape, zeros as +1, packed into a (ceil(numel/8),) uint8 tensor."""
    bits = (x >= 0).flatten().to(torch.uint8)
    pad = packed_size(bits.numel()) * 8 - bits.numel()
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = _SHIFTS.to(bits.device)
    return (bits.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype=torch.int8) -> torch.Tensor:
    """The +1 / -1 tensor of ``shape`` that ``pack_signs`` packed, as ``dtype``."""
    numel = math.prod(shape)
    bits = (packed[:, None] >> _SHIFTS.to(packed.device)) & 1
    return (bits.flatten()[:numel].to(dtype) * 2 - 1).view(*shape)
