"""BitStack's Factorization (rank = number of blocks kept) and its packed layer.

Cost of r blocks of an (m, n) weight with k = min(k, m, n):

    bytes(r)  = r * (ceil(m n / 8) + 2 k (m + n)) + (2 n + 2 m [fused] if r > 0 else 0)
                 packed signs      fp16 u and v      fp16 input (and output-row) scales
    params(r) = ceil(bytes(r) / 2)

The 2 m term is there only for a weight whose output rows carry fused scales
(``row_scales``: up_proj, and v_proj on multi-head attention, with
``fuse_scale``).

``params`` counts fp16-equivalent values (a packed sign byte is half a value),
so that a kept-parameter fraction is the memory fraction of an fp16 model.
Both are the storage of ``BitStackLinear``'s buffers, exactly; ``bytes`` does
not depend on the model's dtype, since BitStack stores fp16 by construction.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

import harness
from harness_bitstack.decompose import BitStackBlocks, reconstruct
from harness_bitstack.packing import packed_size

FP16 = 2


def bitstack_bytes(m: int, n: int, k: int, blocks: int, row_scales: bool = False) -> int:
    """Bytes of ``blocks`` blocks of an (m, n) weight at rank k (formula above)."""
    k = min(k, m, n)
    if blocks == 0:
        return 0
    return blocks * (packed_size(m * n) + FP16 * k * (m + n)) + FP16 * n + (FP16 * m if row_scales else 0)


class BitStackLinear(nn.Module):
    """y = x W_r^T with W_r rebuilt from r packed blocks: diag(r) (sum_i sign_i ⊙ u_i v_i) diag(s)^-1.

    The weight is rebuilt at every forward from the stored blocks, or once and
    kept (``cache_dense``; the cache is a speed device and is not counted).
    With no block the layer outputs zeros.
    """

    def __init__(
        self,
        packed,
        u,
        v,
        scales,
        *,
        row_scales: torch.Tensor | None = None,
        cache_dense: bool = False,
        dense: torch.Tensor | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = u.shape[1], v.shape[2]
        self.blocks = u.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.register_buffer("scales", scales if self.blocks else scales[:0])
        if row_scales is None:
            self.row_scales = None
        else:
            self.register_buffer("row_scales", row_scales if self.blocks else row_scales[:0])
        self.cache_dense = cache_dense
        self._dense = dense

    def weight_hat(self) -> torch.Tensor:
        """W_r (out, in) in float32."""
        shape = (self.out_features, self.in_features)
        if self.blocks == 0:
            return torch.zeros(shape, device=self.u.device)
        return reconstruct(self.packed, self.u, self.v, self.scales, shape, self.row_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cache_dense:
            return nn.functional.linear(x, self.weight_hat().to(x.dtype))
        if self._dense is None:
            self._dense = self.weight_hat()
        if self._dense.device != x.device or self._dense.dtype != x.dtype:
            self._dense = self._dense.to(x.device, x.dtype)
        return nn.functional.linear(x, self._dense)

    def harness_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def harness_params(self) -> int:
        return math.ceil(self.harness_bytes() / FP16)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}"


class BitStackFactorization(harness.Factorization):
    """One weight's BitStack blocks; ranks 0..niter are the number of blocks kept."""

    def __init__(self, name: str, blocks: BitStackBlocks, *, cache_dense: bool = False, info: dict | None = None):
        self.names = (name,)
        self.shapes = (blocks.shape,)
        self.blocks = blocks
        self.k = blocks.u.shape[2]
        self.cache_dense = cache_dense
        self._dense: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.info = dict(info or {})

    @property
    def niter(self) -> int:
        return self.blocks.u.shape[0]

    @property
    def ranks(self) -> Sequence[int]:
        return range(0, self.niter + 1)

    def bytes(self, rank: int, dtype_bytes: int = FP16) -> int:
        m, n = self.shapes[0]
        return bitstack_bytes(m, n, self.k, rank, row_scales=self.blocks.row_scales is not None)

    def params(self, rank: int) -> int:
        return math.ceil(self.bytes(rank) / FP16)

    def error(self, rank: int) -> float:
        """||W - W_rank||_F^2 in the original weight space."""
        return self.blocks.errors[rank]

    def reconstruct(self, rank: int) -> torch.Tensor:
        """W_rank (m, n) in float32."""
        b = self.blocks
        return reconstruct(b.packed[:rank], b.u[:rank], b.v[:rank], b.scales, self.shapes[0], b.row_scales)

    def dense(self, rank: int) -> torch.Tensor:
        """W_rank, remembered for the two most recent ranks (scoring alternates between two)."""
        if rank not in self._dense:
            self._dense[rank] = self.reconstruct(rank)
            while len(self._dense) > 2:
                self._dense.popitem(last=False)
        self._dense.move_to_end(rank)
        return self._dense[rank]

    def materialize(self, rank: int) -> dict[str, harness.Replacement]:
        b = self.blocks
        dense = self.dense(rank) if self.cache_dense else None
        layer = BitStackLinear(
            b.packed[:rank],
            b.u[:rank],
            b.v[:rank],
            b.scales,
            row_scales=b.row_scales,
            cache_dense=self.cache_dense,
            dense=dense,
        )
        return {self.names[0]: layer}
