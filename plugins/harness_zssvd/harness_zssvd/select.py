"""ZS-SVD's zero-sum global selection of singular components (Algorithm 1 of the paper; torch-free).

Every singular component of every matrix is a candidate, scored by its
predicted loss change Delta L_i = -sigma_i dL/dsigma_i (``harness_zssvd.scores``).
Within a matrix components go smallest singular value first (the whitened
truncation stays a prefix, so each matrix keeps SVD-LLM's optimal rank-k
factors); across matrices, the next matrix to lose a component is chosen by
the zero-sum rule on the running sum S of the Delta L already taken:

- S <= 0: the candidate with the smallest Delta L >= 0 (the smallest
  predicted increase), else, if none is left, the one with the smallest |Delta L|;
- S > 0: the candidate with the smallest |Delta L| among those with
  Delta L < 0 (a predicted decrease), else the smallest positive one.

Only each matrix's next component is a candidate, so two heaps (positive and
negative, by |Delta L|) over one head per matrix make a step O(log G). Steps
go on until the target is met: a matrix's cost is its dense cost until its
rank falls to a saving one (break-even), so components taken from a matrix
that ends above break-even save nothing and the matrix stays dense (the
official code's revert). While candidates of both signs remain, the rule keeps
|S| at most the largest |Delta L| taken (each step moves S toward zero or
across it by at most one score): the cumulative predicted change stays near
zero, and ranks come out heterogeneous with no per-matrix ratio.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import harness

SCORES = "_zs_delta"
"""``Factorization.info`` key of the predicted loss changes Delta L_i, largest singular value first.
The leading underscore keeps the vector out of the cell record (it travels with the factorization only)."""


@dataclass(frozen=True)
class Step:
    """One component taken: its matrix (index into the factorizations), its Delta L, the running sum after it."""

    group: int
    delta: float
    total: float


class Heads:
    """The next candidate of each matrix, in a positive and a negative heap ordered by |Delta L|."""

    def __init__(self) -> None:
        self.positive: list[tuple[float, int, int]] = []
        self.negative: list[tuple[float, int, int]] = []
        self.pushed = 0

    def push(self, group: int, delta: float) -> None:
        heap = self.positive if delta >= 0 else self.negative
        heapq.heappush(heap, (abs(delta), self.pushed, group))  # ties: first pushed first
        self.pushed += 1

    def pop(self, prefer_positive: bool) -> int | None:
        """The group of the smallest |Delta L| of the preferred sign, else of the other; None when empty."""
        first, other = (self.positive, self.negative) if prefer_positive else (self.negative, self.positive)
        heap = first if first else other
        return heapq.heappop(heap)[2] if heap else None


def scores_of(fact: harness.Factorization, index: int) -> list[float]:
    """The Delta L vector of factorization ``index``, checked against its ranks (0 .. full rank, contiguous)."""
    scores = fact.info.get(SCORES)
    name = "+".join(fact.names)
    if scores is None:
        raise harness.HarnessError(
            f"allocator 'zs-svd': {name} has no first-order scores (info[{SCORES!r}]); use it with the "
            f"'zs-svd' method, whose decomposer computes them from the 'grad' statistic"
        )
    if list(fact.ranks) != list(range(len(scores) + 1)):
        raise harness.HarnessError(
            f"allocator 'zs-svd': {name} has {len(scores)} scores for ranks {fact.ranks[0]}..{fact.full_rank}"
        )
    if not all(math.isfinite(x) for x in scores):
        raise harness.HarnessError(f"allocator 'zs-svd': {name} has non-finite first-order scores")
    return [float(x) for x in scores]


def floor_rank(fact: harness.Factorization, min_rank: int, keep_rank_ratio: float) -> int:
    """No matrix goes below max(min_rank, ceil(keep_rank_ratio * break-even rank)), nor above its full rank."""
    (m, n), *_ = fact.shapes
    ratio_floor = math.ceil(keep_rank_ratio * harness.break_even_rank(m, n)) if keep_rank_ratio > 0 else 0
    return min(max(min_rank, ratio_floor), fact.full_rank)


def zero_sum_select(
    facts: Sequence[harness.Factorization],
    scores: Sequence[Sequence[float]],
    floors: Sequence[int],
    target: harness.Target,
    dtype_bytes: int,
) -> tuple[harness.Assignment, list[Step]]:
    """The ranks the zero-sum rule reaches when ``target`` is first met, and every step taken.

    ``scores[g][i]`` is Delta L of component i (0: largest singular value) of
    ``facts[g]``; ``floors[g]`` its lowest rank. HarnessError where even every
    matrix at its floor does not meet the target.
    """
    ranks = [fact.full_rank for fact in facts]

    def chosen(g: int) -> int | None:
        return ranks[g] if harness.saves(facts[g], ranks[g]) else None

    costs = [target.cost(fact, chosen(g), dtype_bytes) for g, fact in enumerate(facts)]
    spent, limit = sum(costs), target.limit(facts, dtype_bytes)
    heads = Heads()
    for g in range(len(facts)):
        if ranks[g] > floors[g]:
            heads.push(g, scores[g][ranks[g] - 1])
    steps: list[Step] = []
    total = 0.0
    while spent > limit:
        g = heads.pop(prefer_positive=total <= 0)
        if g is None:
            raise harness.HarnessError(
                f"allocator 'zs-svd', target {target.label}: every matrix at its floor rank still spends "
                f"{spent:,.0f} {target.unit}, over the {limit:,.0f} allowed; lower min_rank or keep_rank_ratio"
            )
        ranks[g] -= 1
        delta = scores[g][ranks[g]]
        total += delta
        steps.append(Step(g, delta, total))
        cost = target.cost(facts[g], chosen(g), dtype_bytes)
        spent, costs[g] = spent + cost - costs[g], cost
        if ranks[g] > floors[g]:
            heads.push(g, scores[g][ranks[g] - 1])
    return [chosen(g) for g in range(len(facts))], steps
