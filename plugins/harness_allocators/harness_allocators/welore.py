"""WeLore's heavy-tail rule (VITA-Group/WeLore, ``utils.adaptive_rank_pruning``), with τ solved.

Data-free. Each group's singular values are min-max normalized,

.. math::  \\hat\\sigma_i = \\frac{\\sigma_i - \\min_j \\sigma_j}{\\max_j \\sigma_j - \\min_j \\sigma_j},

and the directions with :math:`\\hat\\sigma_i < τ` are dropped: the group keeps
``full_rank - #{i : σ̂_i < τ}``. A group whose removed fraction of rank is at
most ``min_removed_fraction`` stays dense (WeLore's ``--min_ratio``, default 0:
a group losing nothing is left alone). The ranks then go through the
floor/ceiling band (``limits.Band``): raised to the floor, dense past the
ceiling or where they would save nothing.

The singular values come from the error curve: σ_i² = e(i) - e(i+1) (between
non-consecutive supported ranks, the drop shared evenly); for whitened methods
they are the whitened ones. WeLore hard-codes τ per model and target (0.175
for 50% of rank removed on LLaMA-2-7B); here τ is the smallest threshold that
meets the target (bisection), and groups changing at the boundary are raised
while the budget allows.

Targets: ``rank`` is WeLore's own — kept rank over total rank, summed over
all matrices, dense ones counting as full (``rank = 0.5`` is "50% of rank
removed"); ``params``, ``bytes`` and ``bits`` work the same way.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

import harness
from harness_allocators import limits

TAU_MAX = 1.0 + 1e-6
"""Just above 1: every direction is below it, so the bisection can reach rank 0 (or the floor)."""


def singular_values(fact: harness.Factorization) -> list[float]:
    """σ per direction from ``fact``'s error curve, one per rank step above its smallest rank."""
    ranks = list(fact.ranks)
    values: list[float] = []
    for low, high in itertools.pairwise(ranks):
        drop = max(0.0, fact.error(low) - fact.error(high)) / (high - low)
        values += [math.sqrt(drop)] * (high - low)
    return values


def normalized(values: list[float]) -> list[float]:
    """Min-max normalized to [0, 1]; a flat spectrum normalizes to all ones."""
    if not values:
        return []
    low, high = min(values), max(values)
    if high <= low:
        return [1.0] * len(values)
    return [(v - low) / (high - low) for v in values]


class HeavyTail:
    """One group's sorted normalized spectrum: the rank kept at any τ."""

    def __init__(self, fact: harness.Factorization, min_removed_fraction: float) -> None:
        self.base, self.full = fact.ranks[0], fact.full_rank
        self.sorted = sorted(normalized(singular_values(fact)))
        self.min_removed = min_removed_fraction

    def rank(self, tau: float) -> int | None:
        dropped = bisect.bisect_left(self.sorted, tau)
        if self.full == 0 or dropped / self.full <= self.min_removed:
            return None
        return self.base + len(self.sorted) - dropped


@dataclass(frozen=True)
class WeLoreOptions(limits.LimitOptions):
    min_removed_fraction: float = field(default=0.0, metadata={"minimum": 0, "exclusive_maximum": 1})
    """A group losing at most this fraction of its rank stays dense (WeLore's ``--min_ratio``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.min_removed_fraction < 1:
            raise ValueError(f"min_removed_fraction: expected a fraction in [0, 1), got {self.min_removed_fraction:g}")


def solve_tau(facts, target, options, dtype_bytes: int) -> tuple[harness.Assignment, float]:
    """Ranks and the smallest τ whose rule (then topped up) meets ``target``."""

    def band(fact: harness.Factorization) -> limits.Band:  # a group losing too little stays dense
        full, least = fact.full_rank, options.min_removed_fraction
        return limits.Band(fact, options, lambda r: (full - r) / full > least)

    groups = [band(f) for f in facts]
    tails = [HeavyTail(f, options.min_removed_fraction) for f in facts]

    def build(knob: float) -> harness.Assignment:  # knob 0 -> τ just above 1, knob 1 -> τ = 0
        tau = (1 - knob) * TAU_MAX
        return [tail.rank(tau) for tail in tails]

    ranks, knob = limits.fit_knob("welore", facts, groups, target, dtype_bytes, build)
    return ranks, (1 - knob) * TAU_MAX


class WeLore(harness.RankAllocator):
    name = "welore"
    saving_ranks_only = True
    Options = WeLoreOptions
    description = "WeLore: drop min-max normalized singular values below one global threshold, solved for the target"

    def allocate(self, factorizations, target, options, ctx):
        limits.check_kind(self, target)
        facts = list(factorizations)
        ranks, tau = solve_tau(facts, target, options, ctx.dtype_bytes)
        removed = 1 - harness.kept_rank_fraction(facts, ranks)
        ctx.log(f"welore: τ = {tau:.6g}, {removed:.1%} of rank removed for {target.label}")
        return ranks
