"""Scale fusion (the repo's default ``fuse_scale=True``): which weights get which scales.

The repo (``bitstack/utils/scale_utils.py``) scales every Linear's input
columns by its activation statistic s and folds the inverse into whatever
produces that input (``auto_scale_block`` lines 125-165, ``apply_scale``
lines 171-206):

- q/k/v and gate/up: ``scale_ln_fcs`` divides the preceding RMSNorm's weight
  by s (free: the norm is not decomposed);
- o_proj: ``scale_fc_fc`` divides v_proj's output rows by s_o (line 85),
  only where ``v_proj.weight.shape == o_proj.weight.shape`` (line 141:
  multi-head attention; with grouped-query attention one v channel feeds
  several o_proj channels, and o_proj is not scaled at all);
- down_proj: ``scale_fc_fc`` divides up_proj's output rows by s_down.

Then every weight is decomposed as it now stands, so up_proj is decomposed as
diag(s_down)^-1 W_up diag(s_in) and v_proj (multi-head) as
diag(s_o)^-1 W_v diag(s_in). Attention mixes tokens, not channels, and
act(gate) * up is channel-wise, so the model's function is unchanged at full
precision. The harness replaces one Linear at a time, each approximating its
own original weight: a fused weight keeps its row scales r (fp16) and is
rebuilt as diag(r) (blocks) diag(s)^-1, which computes what the repo's pair
computes.

To see the partner's statistics, a fused weight's group carries the partner
as a second, statistics-only member: (up_proj, down_proj), (v_proj, o_proj),
and (o_proj, v_proj) (o_proj needs v_proj's shape to tell grouped-query
attention). The Factorization covers the first member only.
"""

from __future__ import annotations

from collections.abc import Sequence

PARTNER = {"up_proj": "down_proj", "v_proj": "o_proj", "o_proj": "v_proj"}
"""Layer kind -> the kind whose statistics or shape its fusion needs (same block)."""


def partner_name(name: str) -> str | None:
    """The dotted name of ``name``'s fusion partner (same parent module), or None for other kinds."""
    parent, _, kind = name.rpartition(".")
    other = PARTNER.get(kind)
    return None if other is None else f"{parent}.{other}" if parent else other


def fusion_groups(layers: Sequence) -> list[tuple[str, ...]]:
    """One group per layer, (layer, partner) where the partner is decomposed too (else the layer alone)."""
    names = {layer.name for layer in layers}
    groups = []
    for layer in layers:
        partner = partner_name(layer.name)
        groups.append((layer.name, partner) if partner in names else (layer.name,))
    return groups


def kind_of(name: str) -> str:
    return name.rpartition(".")[2]


def multi_head(v_shape: tuple[int, int], o_shape: tuple[int, int]) -> bool:
    """The repo's test for folding o_proj's scales into v_proj (``scale_utils.py`` line 141)."""
    return tuple(v_shape) == tuple(o_shape)
