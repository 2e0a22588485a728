"""Which layers share a basis: one matrix kind over runs of consecutive layers.

Basis Sharing groups the same projection kind (e.g. every ``q_proj``) of
``group_size`` consecutive decoder layers: [0, 1], [2, 3], ...; where the
number of layers is not a multiple, the last group holds the rest (the
official code's ``create_model``). Kinds not listed in ``share`` are
"private": each of their layers is its own group of one, which is plain
whitened SVD (SVD-LLM). The output head (no layer index) is always private.

Pure Python on ``harness.LayerInfo``: importing it loads no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from harness import HarnessError, LayerInfo

DEFAULT_SHARE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1")
"""The official configs' ``share_part`` for LLaMA-7B (q, k, v, up, gate) and OPT-6.7B (q, k, v, fc1);
``o_proj`` / ``out_proj`` and ``down_proj`` / ``fc2`` stay private. Kinds a model lacks are skipped."""


def shared_kinds(layers: Sequence[LayerInfo], share: Sequence[str] | None) -> set[str]:
    """The kinds whose layers share a basis; HarnessError where ``share`` names a kind the model lacks."""
    present = {layer.kind for layer in layers if layer.index is not None}
    if share is None:
        return present & set(DEFAULT_SHARE)
    missing = sorted(set(share) - present)
    if missing:
        raise HarnessError(
            f"basis-sharing: share: expected kinds of this model's layers ({', '.join(sorted(present))}), "
            f"got {', '.join(map(repr, missing))}"
        )
    return set(share)


def share_groups(layers: Sequence[LayerInfo], group_size: int, share: Sequence[str] | None) -> list[tuple[str, ...]]:
    """Groups of layer names, in the module order of each group's first member.

    A shared kind's layers (sorted by layer index) are cut into consecutive
    runs of ``group_size``; every other layer is a group of its own. Members
    of one group must have one shape (HarnessError otherwise).
    """
    kinds = shared_kinds(layers, share)
    runs: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        if layer.kind in kinds and layer.index is not None:
            runs.setdefault(layer.kind, []).append(layer)
    group_of: dict[str, tuple[str, ...]] = {}
    for members in runs.values():
        members.sort(key=lambda layer: layer.index)
        for start in range(0, len(members), group_size):
            chunk = members[start : start + group_size]
            _require_one_shape(chunk)
            names = tuple(layer.name for layer in chunk)
            group_of.update({name: names for name in names})
    groups, emitted = [], set()
    for layer in layers:
        group = group_of.get(layer.name, (layer.name,))
        if group not in emitted:
            emitted.add(group)
            groups.append(group)
    return groups


def _require_one_shape(members: Sequence[LayerInfo]) -> None:
    shapes = {tuple(layer.shape) for layer in members}
    if len(shapes) > 1:
        listing = ", ".join(f"{layer.name} {tuple(layer.shape)}" for layer in members)
        raise HarnessError(f"basis-sharing: a shared basis needs one shape per group, got {listing}")
