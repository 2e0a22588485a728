"""Uniform allocation: the same kept fraction for every matrix (SVD-LLM's default).

- ``params`` target ``keep``: each group gets the largest rank costing at most
  ``keep`` of its dense parameters (SVD-LLM: k = int(m n keep / (m + n))).
- ``rank`` target: each group keeps ``round(value * full_rank)`` (at least 1).
- ``bytes`` / ``bits``: the largest common kept fraction whose bytes fit.

A rank that would save nothing is never chosen: that group stays dense (None).
"""

from __future__ import annotations

from dataclasses import dataclass

import harness
from harness import budget


def uniform_ranks(facts, keep: float) -> budget.Assignment:
    """Largest saving rank within ``keep`` of each group's dense size; keep >= 1 keeps all dense."""
    if keep >= 1:
        return [None] * len(facts)
    return [budget.largest_rank_within(f, keep * f.dense_params) for f in facts]


def uniform_rank_fraction(facts, fraction: float) -> budget.Assignment:
    ranks: budget.Assignment = []
    for fact in facts:
        rank = max(1, round(fraction * fact.full_rank))
        rank = min((r for r in fact.ranks if r >= rank), default=fact.full_rank)
        ranks.append(None if fraction >= 1 else rank)
    return ranks


@dataclass(frozen=True)
class UniformOptions:
    pass


class Uniform(harness.RankAllocator):
    name = "uniform"
    Options = UniformOptions
    description = "same kept fraction for every matrix"

    def allocate(self, factorizations, target, options, ctx):
        facts = list(factorizations)
        if target.kind == "params":
            return uniform_ranks(facts, target.value)
        if target.kind == "rank":
            return uniform_rank_fraction(facts, target.value)
        ranks = budget.largest_fitting(
            lambda keep: uniform_ranks(facts, keep),
            lambda ranks: budget.fits(facts, ranks, target, ctx.dtype_bytes),
        )
        if ranks is None:
            raise harness.HarnessError(f"target {target.label}: smaller than the smallest factorization of the model")
        return ranks
