"""Uniform allocation: the same kept fraction for every matrix (SVD-LLM's default).

Where the target applies to every matrix on its own (``Target.per_matrix``),
each group meets it alone:

- ``params`` target ``keep``: each group gets the largest rank costing at most
  ``keep`` of its dense parameters (SVD-LLM: k = int(m n keep / (m + n))).
- ``rank`` target: each group keeps ``round(value * full_rank)`` (at least 1).

For a budget of the whole model only (``bytes``, ``bits``, any kind without a
per-matrix rule): the largest common kept fraction of parameters whose
assignment fits the target (``Target.fits``).

A rank that would save nothing is never chosen: that group stays dense (None).
"""

from __future__ import annotations

from dataclasses import dataclass

import harness


def uniform_ranks(facts, keep: float) -> harness.Assignment:
    """Largest saving rank within ``keep`` of each group's dense size; keep >= 1 keeps all dense."""
    return harness.keep_fraction(facts, keep)


@dataclass(frozen=True)
class UniformOptions:
    pass


class Uniform(harness.RankAllocator):
    name = "uniform"
    saving_ranks_only = True
    Options = UniformOptions
    description = "same kept fraction for every matrix"

    def allocate(self, factorizations, target, options, ctx):
        facts = list(factorizations)
        if (ranks := target.per_matrix(facts)) is not None:
            return ranks
        found = harness.largest_fitting(
            lambda keep: uniform_ranks(facts, keep),
            lambda ranks: target.fits(facts, ranks, ctx.dtype_bytes),
            steps=40,
        )
        if found is None:
            raise harness.HarnessError(f"target {target.label}: smaller than the smallest factorization of the model")
        return found.ranks
