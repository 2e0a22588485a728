"""Energy allocation: each group keeps the smallest rank that holds a common fraction of its energy.

The energy a group keeps at rank k is read off its error curve,

.. math::  E(k) = \\frac{e(k_0) - e(k)}{e(k_0)},

with ``e = Factorization.error`` and k_0 its smallest rank (0 for the SVD
family, where E(k) is the kept fraction of the sum of squared singular
values, Σ_{i<k} σ_i² / Σ σ_i²; of the whitened ones for whitened methods). For
a fraction f each group takes the smallest k with E(k) >= f, raised to its
floor, dense past its ceiling or where that rank saves nothing
(``limits.Band``). The common f is the
largest that meets the target (bisection), then groups changing at the
boundary are raised while the budget allows (``limits.fit_knob``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import harness
from harness_allocators import limits


def energy_curve(fact: harness.Factorization) -> tuple[list[int], list[float]]:
    """(ranks, kept energy at each rank), energy non-decreasing in [0, 1]."""
    ranks = list(fact.ranks)
    errors = [fact.error(r) for r in ranks]
    total = errors[0]
    if total <= 0:
        return ranks, [1.0] * len(ranks)
    kept, curve = 0.0, []
    for error in errors:
        kept = max(kept, min(1.0, (total - error) / total))
        curve.append(kept)
    return ranks, curve


def energy_rank(ranks: list[int], curve: list[float], fraction: float) -> int:
    """The smallest rank keeping at least ``fraction`` of the energy."""
    return ranks[min(bisect.bisect_left(curve, fraction), len(ranks) - 1)]


@dataclass(frozen=True)
class EnergyOptions(limits.LimitOptions):
    pass


class Energy(harness.RankAllocator):
    name = "energy"
    saving_ranks_only = True
    Options = EnergyOptions
    description = "smallest rank keeping a common fraction of each matrix's energy, solved for the target"

    def allocate(self, factorizations, target, options, ctx):
        limits.check_kind(self, target)
        facts = list(factorizations)
        groups = limits.bands(facts, options)
        curves = [energy_curve(f) for f in facts]

        def build(fraction: float) -> harness.Assignment:
            return [energy_rank(ranks, curve, fraction) for ranks, curve in curves]

        ranks, fraction = limits.fit_knob(self.name, facts, groups, target, ctx.dtype_bytes, build)
        ctx.log(f"energy: common kept energy fraction {fraction:.6g} for {target.label}")
        return ranks
