"""ASVD's sensitivity allocation (hahnyuan/ASVD4LLM: ``sensitivity.calib_sensitivity_ppl``,
``binary_search.binary_search_truncation_rank``).

1. Measure: for each group alone, at each kept fraction p of its parameters
   (``kept_fractions``; ASVD's ``param_ratio`` candidates), the calibration
   loss with only that group truncated to the largest rank costing at most
   p of its dense parameters (moved into its floor/ceiling band) and every
   other group dense.
2. Threshold: sort every (group, rank, loss) by loss, least harmful first;
   allowing the first j entries gives each group the smallest rank among its
   allowed entries (dense where none is allowed). The cost falls as j grows;
   the smallest j that meets the target is found by binary search, i.e. one
   global threshold on the loss.

Two departures from ASVD's code, both to meet the target exactly: ASVD's
search stops at the first index over its ratio target and can exceed it, here
the last entry admitted is the first one that meets the target; and that
entry's group is then raised to the largest rank in its band that still fits
(ASVD leaves it at the candidate's ratio), so the budget left is below one
rank step. ASVD scores with perplexity; the calibration loss orders the same.

The measurements (groups x fractions calls to ``ctx.calibration_loss``) depend
on neither the target nor the seed, so they are kept in memory per set of
factorization objects and candidate ranks: every target of a suite that
shares one factorization reuses them.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import harness
from harness_allocators import limits

CACHE_SIZE = 8

Entry = tuple[float, int, int]
"""(loss, group index, rank)."""


@dataclass(frozen=True)
class SensitivityOptions(limits.LimitOptions):
    kept_fractions: tuple[float, ...] = field(
        default=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        metadata={"exclusive_minimum": 0, "exclusive_maximum": 1, "min_items": 1},
    )
    """Fractions of each group's parameters kept at which its sensitivity is measured."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kept_fractions or not all(0 < p < 1 for p in self.kept_fractions):
            raise ValueError(f"kept_fractions: expected fractions in (0, 1), got {list(self.kept_fractions)}")


def candidate_ranks(fact: harness.Factorization, band: limits.Band, fractions: Sequence[float]) -> list[int]:
    """The distinct ranks measured for ``fact``, largest first."""
    ranks = list(fact.ranks)
    found = set()
    for fraction in sorted(fractions):
        i = bisect.bisect_right(ranks, fraction * fact.dense_params, key=fact.params) - 1
        rank = band.clamp(ranks[max(i, 0)])
        if rank is not None:
            found.add(rank)
    return sorted(found, reverse=True)


def threshold_assignment(entries: Sequence[Entry], count: int, groups: int) -> harness.Assignment:
    """Each group's smallest rank among the first ``count`` entries (None: none allowed)."""
    ranks: harness.Assignment = [None] * groups
    for _, g, rank in entries[:count]:
        ranks[g] = rank if ranks[g] is None else min(ranks[g], rank)
    return ranks


class MeasurementCache:
    """Sensitivity measurements kept per (factorization objects, candidate ranks), a few at a time."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.entries: dict[tuple, tuple[tuple, list[Entry]]] = {}

    @staticmethod
    def refs(facts: Sequence[harness.Factorization]) -> tuple:
        try:
            return tuple(weakref.ref(f) for f in facts)
        except TypeError:  # no weak references on this class: hold the objects
            return tuple(facts)

    def get(self, facts, candidates) -> list[Entry] | None:
        key = (tuple(id(f) for f in facts), candidates)
        if (hit := self.entries.get(key)) is None:
            return None
        refs, entries = hit
        alive = [r() if isinstance(r, weakref.ref) else r for r in refs]
        if any(a is not f for a, f in zip(alive, facts, strict=True)):  # an id reused by a new object
            del self.entries[key]
            return None
        return entries

    def put(self, facts, candidates, entries: list[Entry]) -> None:
        while len(self.entries) >= self.size:
            del self.entries[next(iter(self.entries))]
        self.entries[(tuple(id(f) for f in facts), candidates)] = (self.refs(facts), entries)


class Sensitivity(harness.RankAllocator):
    name = "sensitivity"
    saving_ranks_only = True
    Options = SensitivityOptions
    uses_calibration = True
    description = "ASVD: per-layer calibration loss at each kept fraction, then one global threshold"

    def __init__(self) -> None:
        self.cache = MeasurementCache()

    def measure(self, facts, candidates, ctx) -> list[Entry]:
        """Every (loss, group, rank), sorted least harmful first (cached)."""
        if (entries := self.cache.get(facts, candidates)) is not None:
            ctx.log(f"sensitivity: reusing {len(entries)} measurements")
            return entries
        entries = []
        for g, ranks in enumerate(candidates):
            for rank in ranks:
                assignment: harness.Assignment = [None] * len(facts)
                assignment[g] = rank
                entries.append((float(ctx.calibration_loss(assignment)), g, rank))
        entries.sort(key=lambda e: (e[0], e[1], -e[2]))
        ctx.log(f"sensitivity: measured {len(entries)} (group, rank) losses")
        self.cache.put(facts, candidates, entries)
        return entries

    def allocate(self, factorizations, target, options, ctx):
        limits.check_kind(self, target)
        if ctx.calibration_loss is None:
            raise harness.HarnessError(
                f"allocator {self.name!r} measures the calibration loss, but this suite has no calibration data"
            )
        facts = list(factorizations)
        groups = limits.bands(facts, options)
        candidates = tuple(tuple(candidate_ranks(f, b, options.kept_fractions)) for f, b in zip(facts, groups))
        entries = self.measure(facts, candidates, ctx)
        return self.select(facts, groups, entries, target, options, ctx)

    def select(self, facts, groups, entries, target, options, ctx) -> harness.Assignment:
        cost = limits.cost_of(target, ctx.dtype_bytes)
        limit = target.limit(facts, ctx.dtype_bytes)

        def ok(count: int) -> bool:
            ranks = threshold_assignment(entries, count, len(facts))
            return target.assignment_cost(facts, ranks, ctx.dtype_bytes) <= limit

        if not ok(len(entries)):
            lowest = target.assignment_cost(
                facts, threshold_assignment(entries, len(entries), len(facts)), ctx.dtype_bytes
            )
            raise harness.HarnessError(
                f"allocator {self.name!r}, target {target.label}: even every measured rank (kept_fractions "
                f"{list(options.kept_fractions)}) costs {lowest:.6g} {target.unit}, over the budget "
                f"of {limit:.6g}; add smaller kept_fractions or lower the rank floors"
            )
        low, high = 0, len(entries)
        while low < high:
            mid = (low + high) // 2
            if ok(mid):
                high = mid
            else:
                low = mid + 1
        ranks = threshold_assignment(entries, low, len(facts))
        if low > 0:
            before = threshold_assignment(entries, low - 1, len(facts))
            ranks = harness.top_up(facts, ranks, before, [band.choices for band in groups], cost, limit)
            ctx.log(f"sensitivity: loss threshold {entries[low - 1][0]:.6g} ({low} of {len(entries)} entries)")
        return ranks
