"""Which weight matrices TRAWL stacks together, in which orientation.

A group is a tuple of Linear layer names whose (oriented) weights have one
shape (m, n); they are stacked along a new first axis into a 3-way tensor
(S, m, n). Orientation: every weight is used as stored, (out, in), except the
MLP's output projections (``down_proj``, GPT-J's ``fc_out``), which are
transposed so that a gated MLP stacks as [gate, up, down^T], all
(d_ff, d). The authors' code stacks GPT-J's MLP as [fc_in^T, fc_out], all
(d, d_ff): the same tensor with its last two axes swapped, which CP and Tucker
treat symmetrically.

Groupings (option ``by``), after the authors' ``intervention_mode`` (Laser_T,
``src/taser/gptj_taser.py``: 1 QKVO across the model, 2 QKVO per layer, 3 QKVO
per third, 4 FC across the model, 5 FC per layer, 6 FC per third):

- ``layer-attn`` (mode 2): per layer, the attention projections, one group per
  shape. With grouped-query attention (K, V smaller than Q, O) that is [q, o]
  and [k, v]; without it, [q, k, v, o] as in the authors' code.
- ``layer-mlp`` (mode 5): per layer, the MLP projections ([gate, up, down^T] for
  Llama, as the authors' ``llama2_taser.py``; [fc_in, fc_out^T] for GPT-J);
  shapes that still differ are refused.
- ``model-attn`` (mode 1): every selected layer's attention projections in one
  stack, [4L, d, d] without grouped-query attention; with it, one stack per
  shape: [q, o] x L as [2L, d, d] and [k, v] x L as [2L, d_kv, d].
- ``model-mlp`` (mode 4): every selected layer's MLP projections in one stack,
  [3L, d_ff, d] for Llama ([2L, ...] for GPT-J's two matrices).
- ``thirds-attn`` / ``thirds-mlp`` (modes 3 and 6): as ``model-*``, one stack per
  third of the model's layers (``thirds``: contiguous, the first thirds one
  layer longer where L is not a multiple of 3: GPT-J's 28 layers give
  10 / 9 / 9, as the authors' code hard-codes).
- ``across-layers``: one group per projection kind, across the selected
  layers (e.g. every selected ``down_proj``); not one of the paper's modes.

Matrices of different shapes are never padded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from harness import HarnessError, LayerInfo

if TYPE_CHECKING:  # the tensor functions import torch when called: the plugin's import loads none
    import torch

ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj", "fc_in", "fc_out")
TRANSPOSED_KINDS = frozenset({"down_proj", "fc_out"})
GROUPINGS = ("layer-attn", "layer-mlp", "model-attn", "model-mlp", "thirds-attn", "thirds-mlp", "across-layers")
FAMILIES = {
    "layer-attn": ATTENTION_KINDS,
    "layer-mlp": MLP_KINDS,
    "model-attn": ATTENTION_KINDS,
    "model-mlp": MLP_KINDS,
    "thirds-attn": ATTENTION_KINDS,
    "thirds-mlp": MLP_KINDS,
    "across-layers": ATTENTION_KINDS + MLP_KINDS,
}


def kind_of(name: str) -> str:
    """The projection kind of a dotted layer name (its last component)."""
    return name.rsplit(".", 1)[-1]


def is_transposed(name: str) -> bool:
    """True where the layer's weight enters the stack transposed (MLP output projections)."""
    return kind_of(name) in TRANSPOSED_KINDS


def oriented_shape(layer: LayerInfo) -> tuple[int, int]:
    m, n = layer.shape
    return (n, m) if is_transposed(layer.name) else (m, n)


# ---------------------------------------------------------------- layer selection
def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Layer indices selected by ``spec``: "all", "first:N", "last:N" or a list of indices.

    Negative indices count from the end, as in Python. Raises HarnessError for
    anything else or for an index outside [0, n_layers).
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n_layers))
        head, _, count = text.partition(":")
        if head in ("first", "last") and count.isdigit() and int(count) > 0:
            k = min(int(count), n_layers)
            return list(range(k)) if head == "first" else list(range(n_layers - k, n_layers))
        raise HarnessError(f"layers: expected 'all', 'first:N', 'last:N' or a list of indices, got {spec!r}")
    chosen = []
    for index in spec:
        resolved = index + n_layers if index < 0 else index
        if not 0 <= resolved < n_layers:
            raise HarnessError(f"layers: index {index} is outside the model's {n_layers} layers")
        chosen.append(resolved)
    return sorted(set(chosen))


def thirds(n_layers: int) -> list[range]:
    """The model's layers in three contiguous segments (early, middle, last), the first ones longer by one
    where ``n_layers`` is not a multiple of 3 (GPT-J's 28 layers: 0-9, 10-18, 19-27, as the authors' code)."""
    base, extra = divmod(n_layers, 3)
    bounds = [0]
    for i in range(3):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(3)]


def check_layers_spec(spec: str | Sequence[int]) -> None:
    """Validate the form of a ``layers`` option without knowing the model."""
    if isinstance(spec, str):
        parse_layers(spec, 1)


# ---------------------------------------------------------------- groups
def trawl_groups(
    layers: Sequence[LayerInfo],
    by: str,
    spec: str | Sequence[int],
    kinds: Sequence[str] | None = None,
) -> list[tuple[str, ...]]:
    """Groups of layer names to stack, for ``by`` in GROUPINGS; unselected layers are in none."""
    if by not in GROUPINGS:
        raise HarnessError(f"by: expected one of {', '.join(GROUPINGS)}, got {by!r}")
    family = FAMILIES[by]
    if kinds is not None:
        unknown = sorted(set(kinds) - set(family))
        if unknown:
            raise HarnessError(f"kinds: {unknown} are not stacked by by={by!r}; allowed: {', '.join(family)}")
        family = tuple(k for k in family if k in kinds)
    indexed = [layer for layer in layers if layer.index is not None]
    if not indexed:
        raise HarnessError("trawl: no decomposable layer has a layer index")
    n_layers = max(layer.index for layer in indexed) + 1
    selected = set(parse_layers(spec, n_layers))
    chosen = [layer for layer in indexed if layer.index in selected and layer.kind in family]
    if not chosen:
        raise HarnessError(f"trawl: no layer matches by={by!r}, layers={spec!r}, kinds={kinds!r}")
    groups = _bucket(chosen, key=_grouping_key(by, n_layers))
    if by in ("layer-mlp", "model-mlp", "thirds-mlp", "across-layers"):
        for group in groups:
            _require_one_shape(group, _describe(by, group[0]))
    return [tuple(layer.name for layer in group) for group in groups]


def _grouping_key(by: str, n_layers: int):
    """The bucket key of a layer under ``by``: layers with equal keys are stacked together."""
    segment = {i: s for s, seg in enumerate(thirds(n_layers)) for i in seg}
    keys = {
        "layer-attn": lambda layer: (layer.index, oriented_shape(layer)),
        "layer-mlp": lambda layer: layer.index,
        "model-attn": lambda layer: oriented_shape(layer),
        "model-mlp": lambda layer: "mlp",
        "thirds-attn": lambda layer: (segment[layer.index], oriented_shape(layer)),
        "thirds-mlp": lambda layer: segment[layer.index],
        "across-layers": lambda layer: layer.kind,
    }
    return keys[by]


def _describe(by: str, layer: LayerInfo) -> str:
    if by == "across-layers":
        return f"kind {layer.kind}"
    if by == "layer-mlp":
        return f"layer {layer.index}'s MLP"
    return "the MLP stack" if by == "model-mlp" else f"third with layer {layer.index}'s MLP"


def _bucket(layers: Iterable[LayerInfo], key) -> list[list[LayerInfo]]:
    """Layers bucketed by ``key``, buckets and members in first-seen (module) order."""
    buckets: dict = {}
    for layer in layers:
        buckets.setdefault(key(layer), []).append(layer)
    return list(buckets.values())


def _require_one_shape(group: Sequence[LayerInfo], what: str) -> None:
    shapes = {layer.name: oriented_shape(layer) for layer in group}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise HarnessError(f"trawl: cannot stack {what}: shapes differ ({listing}); matrices are never padded")


# ---------------------------------------------------------------- stack / unstack
def stack_shape(weights: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(S, m, n) of the stacked group; HarnessError where the oriented shapes differ."""
    shapes = {name: tuple(w.shape[::-1] if is_transposed(name) else w.shape) for name, w in weights.items()}
    if len(set(shapes.values())) != 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise HarnessError(f"trawl: cannot stack matrices of different shapes ({listing}); they are never padded")
    m, n = next(iter(shapes.values()))
    return len(shapes), m, n


def stack(weights: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The group's weights as one (S, m, n) tensor in ``dtype`` (default float32), MLP outputs transposed."""
    import torch

    stack_shape(weights)
    dtype = torch.float32 if dtype is None else dtype
    return torch.stack([(w.T if is_transposed(name) else w).to(dtype) for name, w in weights.items()])


def unstack(tensor: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inverse of ``stack``: slice s of ``tensor`` back in the stored (out, in) orientation."""
    return {name: (tensor[s].T if is_transposed(name) else tensor[s]).contiguous() for s, name in enumerate(names)}
