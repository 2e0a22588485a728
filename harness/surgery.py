"""Model surgery: find the decomposable Linear layers, swap replacements in and out.

No linear algebra happens here: a method's ``Factorization`` says what each
layer becomes; this module puts it into the model, counts what the model then
holds, and puts the original layers back when the cell is done. While a cell
runs, the replaced originals' weights can wait in host memory instead of on
the accelerator (``replaced(..., offload=...)``, the suite's
``surgery.offload_originals``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from harness.api import LayerInfo
from harness.errors import HarnessError
from harness.factorization import Dense, LowRank, Replacement
from harness.offload import materialized, offload_like

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class FactoredLinear(nn.Module):
    """y = A (B x) + bias: a rank-k Linear as two matmuls, k (m + n) weights (and m for the bias).

    What the core swaps in for a ``LowRank`` replacement: the bias is the replaced Linear's own, or the
    replacement's where it brings one (``LowRank.bias``: the whole output offset, e.g. LoRD's and SFSD's
    mean compensation); ``harness export`` writes it as ``<name>.A``, ``<name>.B`` and ``<name>.bias``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = B.shape[1], A.shape[0], A.shape[1]
        self.B = nn.Parameter(B, requires_grad=False)
        self.A = nn.Parameter(A, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.B), self.A, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def find_linears(
    model: nn.Module,
    kinds: Sequence[str] | None = None,
    include_lm_head: bool = False,
) -> list[LayerInfo]:
    """Decomposable Linear layers in module order.

    By default every ``nn.Linear`` inside the transformer blocks (names with a
    layer index: attention and MLP projections); ``kinds`` keeps only layers
    whose last name component is listed (e.g. ``["q_proj", "down_proj"]``);
    ``include_lm_head`` adds the output head.
    """
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        kind = name.rsplit(".", 1)[-1]
        match = _LAYER_INDEX.search(f".{name}.")
        is_head = match is None and kind in ("lm_head", "embed_out", "output")
        if is_head and not include_lm_head:
            continue
        if match is None and not is_head:
            continue
        if kinds is not None and kind not in kinds and not is_head:
            continue
        shape = (module.out_features, module.in_features)
        layers.append(LayerInfo(name, kind, int(match.group(1)) if match else None, shape))
    return layers


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def build_module(original: nn.Linear, replacement: Replacement, dense: bool) -> nn.Module:
    """The module that stands in for ``original``; ``dense`` multiplies factors out."""
    bias = None if original.bias is None else original.bias.detach()
    device, dtype = original.weight.device, original.weight.dtype
    if isinstance(replacement, LowRank):
        A, B = replacement.A.to(device, dtype), replacement.B.to(device, dtype)
        if A.shape[0] != original.out_features or B.shape[1] != original.in_features:
            raise ValueError(f"factors {tuple(A.shape)} x {tuple(B.shape)} do not fit {tuple(original.weight.shape)}")
        if replacement.bias is not None:  # the replacement's whole output offset, in place of the Linear's
            if tuple(replacement.bias.shape) != (original.out_features,):
                raise ValueError(f"bias {tuple(replacement.bias.shape)} does not fit {original.out_features} outputs")
            bias = replacement.bias.to(device, dtype)
        if dense:
            return _dense_linear(original, A @ B, bias)
        return FactoredLinear(A, B, bias)
    if isinstance(replacement, Dense):
        return _dense_linear(original, replacement.weight.to(device, dtype))
    if isinstance(replacement, nn.Module):
        if bias is None or getattr(replacement, "own_bias", False):
            return replacement.to(device)
        return WithBias(replacement.to(device), bias)
    raise TypeError(f"unsupported replacement {type(replacement).__name__}")


class WithBias(nn.Module):
    """A replacement module plus the replaced Linear's bias: y = module(x) + b.

    A plugin's replacement module stands for ``W x``; the layer's own bias is
    added here unless the module sets ``own_bias = True`` (it computes the
    whole output, bias included, as LoRD's centred layer does)."""

    def __init__(self, module: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) + self.bias

    def harness_params(self) -> int:
        return module_params(self.module) + self.bias.numel()

    def harness_bytes(self) -> int:
        return module_bytes(self.module) + self.bias.numel() * self.bias.element_size()


def _dense_linear(original: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear of ``original``'s shape holding ``weight`` and ``bias`` (None: ``original``'s own bias)."""
    if tuple(weight.shape) != tuple(original.weight.shape):
        raise ValueError(f"dense weight {tuple(weight.shape)} does not fit {tuple(original.weight.shape)}")
    if bias is None and original.bias is not None:
        bias = original.bias.detach()
    layer = nn.Linear(original.in_features, original.out_features, bias=bias is not None)
    layer = layer.to(original.weight.device, original.weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer


@contextmanager
def replaced(
    model: nn.Module,
    replacements: Mapping[str, Replacement],
    dense: bool = False,
    offload: bool | str = "auto",
) -> Iterator[nn.Module]:
    """Swap each named Linear for its replacement; the originals return on exit (also on an exception).

    ``offload`` (the suite's ``surgery.offload_originals``): while the
    replacements are in, the originals' weights wait in host memory and their
    device memory is freed (``park``); "auto" does so for weights on CUDA only.
    """
    originals: dict[str, nn.Module] = {}
    parked: list[Parked] = []
    try:
        for name, replacement in replacements.items():
            parent, child = _parent(model, name)
            original = getattr(parent, child)
            if not isinstance(original, nn.Linear):
                raise HarnessError(f"cannot replace {name}: it is a {type(original).__name__}, not a Linear")
            with materialized([original]):  # an offloaded Linear's weight and bias exist only inside
                module = offload_like(build_module(original, replacement, dense), original)
            setattr(parent, child, module)
            originals[name] = original
        park(model, [o.weight for o in originals.values()], offload, parked)
        yield model
    finally:
        try:
            unpark(parked)
        finally:
            for name, original in originals.items():
                parent, child = _parent(model, name)
                setattr(parent, child, original)


# ---------------------------------------------------------------- the originals off the device
@dataclass
class Parked:
    """A weight whose data waits in ``host`` memory while its parameter holds an empty tensor on ``device``."""

    weight: nn.Parameter
    host: torch.Tensor
    device: torch.device


def wants_offload(weight: torch.Tensor, offload: bool | str) -> bool:
    """Whether ``offload`` parks ``weight``: "auto" only on CUDA (host and device are one on the CPU, and
    unified on MPS); True anywhere but on the meta device (accelerate's offloaded weights)."""
    if offload not in (True, False, "auto"):
        raise ValueError(f"offload: expected true, false or 'auto', got {offload!r}")
    if offload is False or type(weight) is not nn.Parameter or weight.device.type == "meta":
        return False
    return weight.device.type == "cuda" if offload == "auto" else True


def park(model: nn.Module, weights: Sequence[nn.Parameter], offload: bool | str, parked: list[Parked]) -> None:
    """Move each of ``weights`` that ``offload`` wants to host memory (pinned on CUDA) and free its device
    storage, appending it to ``parked`` as it goes (so that a failure half-way restores what was moved).

    A weight still reachable from ``model`` (tied to one that stays, as an LM head to its embedding) or whose
    storage another tensor shares (a replacement made from it) stays where it is: freeing it would free
    nothing, and restoring a copy would untie it.
    """
    todo = [w for w in weights if wants_offload(w, offload)]
    if not todo:
        return
    in_use = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    for weight in todo:
        if weight.untyped_storage().data_ptr() in in_use or shared(weight):
            continue
        data = weight.data
        host = torch.empty_like(data, device="cpu", pin_memory=data.device.type == "cuda").copy_(data)
        parked.append(Parked(weight, host, data.device))
        del data
        weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)


def shared(weight: torch.Tensor) -> bool:
    """True where another tensor shares ``weight``'s storage (torch's use count of it; False where unknown)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    return count(weight.untyped_storage()._cdata) > 2  # the parameter's tensor and the storage object asked


def unpark(parked: list[Parked]) -> None:
    """Every parked weight back on its device, bit for bit (its host copy dropped). One that cannot go back
    (the device is full) keeps its host copy as its data, so that the model fails loudly rather than silently;
    the first such error is raised once every other weight is back."""
    failure: BaseException | None = None
    while parked:
        item = parked.pop()
        try:
            item.weight.data = item.host.to(item.device)
        except Exception as exc:
            item.weight.data = item.host
            failure = failure or exc
    if failure is not None:
        raise failure


# ---------------------------------------------------------------- counting
def module_params(module: nn.Module) -> int:
    """Stored values of a (possibly replaced) layer."""
    if hasattr(module, "harness_params"):
        return int(module.harness_params())
    return sum(p.numel() for p in module.parameters())


def module_bytes(module: nn.Module) -> int:
    """Bytes a (possibly replaced) layer stores, at its parameters' dtypes."""
    if hasattr(module, "harness_bytes"):
        return int(module.harness_bytes())
    return sum(p.numel() * p.element_size() for p in module.parameters())


def count_layers(model: nn.Module, names: Sequence[str]) -> tuple[int, int]:
    """(parameters, bytes) held by the named layers now (weights and biases)."""
    modules = [model.get_submodule(name) for name in names]
    return sum(module_params(m) for m in modules), sum(module_bytes(m) for m in modules)


def count_model(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the whole model, shared (tied) tensors counted once."""
    seen: set[int] = set()
    params = nbytes = 0
    for module in model.modules():
        if hasattr(module, "harness_params"):
            params += int(module.harness_params())
            nbytes += int(module.harness_bytes())
            seen.update(id(p) for p in module.parameters())
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params += p.numel()
            nbytes += p.numel() * p.element_size()
    return params, nbytes


def weights_of(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named Linear layers' weights (views, not copies)."""
    return {name: model.get_submodule(name).weight.detach() for name in names}


def bias_of(model: nn.Module, name: str) -> torch.Tensor | None:
    """The named Linear's bias (a detached copy: a factorization may keep it past an offloaded weight's
    ``materialized`` scope), None where it has none."""
    bias = model.get_submodule(name).bias
    return None if bias is None else bias.detach().clone()
