"""How much of each factorization a method's cells can use, and keeping only that (issue 16, point 2).

A cell materializes the rank its allocator picks for its target. Allocators
that declare ``saving_ranks_only`` (every built-in one but BitStack's order)
pick only ranks that save parameters, at most the break-even rank
(``Factorization.saving_rank``; for one m x n matrix ``harness.break_even_rank``),
or, under a target with a per-matrix rule (``Target.per_matrix``: a ``rank``
target keeps ``round(value * full_rank)`` of every matrix), that rule's rank.
Any other allocator may pick any rank, so its methods keep every rank.

``keep`` compacts a fresh factorization to the largest rank any (allocator,
target) pair of the method can choose, in the suite's storage dtype, in host
memory (``Factorization.compact``); what allocators read (ranks, errors,
costs) is unchanged, and materialized factors are those of the uncompacted
factorization (see ``harness/factorization.py``). Under ``[factorization] keep =
"disk"`` it writes each compacted factorization to its group file and keeps the
memory-mapped reading instead (``harness.factorfiles``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from harness.offload import materialized
from harness.ray import factstore
from harness.surgery import bias_of, weights_of

if TYPE_CHECKING:
    from harness.api import FactorizeContext, RankAllocator
    from harness.factorfiles import MethodFiles
    from harness.factorization import Factorization
    from harness.targets import Target

STORAGE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
HOST = torch.device("cpu")


def reach(fact: Factorization, target: Target, allocator: RankAllocator) -> int:
    """The largest rank of ``fact`` that ``allocator`` can materialize for ``target``."""
    if not getattr(allocator, "saving_ranks_only", False):
        return fact.full_rank
    top = fact.saving_rank
    own = target.per_matrix([fact])
    if own is not None and own[0] is not None:
        top = max(top, own[0])
    return min(top, fact.full_rank)


def max_rank(fact: Factorization, targets: Iterable[Target], allocators: Iterable[RankAllocator]) -> int:
    """The largest rank of ``fact`` any (allocator, target) pair can choose (``full_rank`` where there is none)."""
    allocators = list(allocators)
    reaches = [reach(fact, target, allocator) for target in targets for allocator in allocators]
    return max(reaches, default=fact.full_rank)


def keep(
    fact: Factorization,
    targets: Iterable[Target],
    allocators: Iterable[RankAllocator],
    storage_dtype: str = "float32",
    device: torch.device | str = HOST,
    files: MethodFiles | None = None,
) -> Factorization:
    """``fact`` compacted for ``targets`` x ``allocators``, kept in ``storage_dtype`` on ``device`` (the host).

    With ``files`` (``[factorization] keep = "disk"``: ``harness.run.diskfactors.method_files``), the
    compacted factorization is written as the method's next group file and what is kept is its
    memory-mapped reading (no factor in memory); ``diskfactors.store`` writes the manifest afterwards.
    """
    kept = fact.compact(max_rank(fact, targets, allocators), dtype=STORAGE_DTYPES[storage_dtype], device=device)
    if files is None:
        return kept
    try:
        return files.put(kept)
    except factstore.Unsupported:  # kept in memory; diskfactors.store says so once and writes no manifest
        return kept


def factorize_group(decomposer, model: torch.nn.Module, group, stats: dict, options, ctx: FactorizeContext):
    """One group's factorization from the model's weights and the members' statistics (both paths)."""
    with materialized(model.get_submodule(name) for name in group):  # offloaded weights: here for the call
        # each layer's statistics with its Linear's bias (a new LayerStats: the collected ones may be shared)
        group_stats = {name: replace(stats[name], bias=bias_of(model, name)) for name in group if name in stats}
        return decomposer.factorize(weights_of(model, group), group_stats, options, ctx)
