"""Global greedy allocation: singular directions across all groups by error reduction per unit of budget.

Every group starts at its floor (its cheapest choice, ``limits.Band``). A step
from choice a to choice b of one group is worth

.. math::  ρ = \\frac{e(a) - e(b)}{c(b) - c(a)},

with e the factorization's error (0 for dense) and c its cost under the
target (parameters, bytes, or rank). The last step of each group is the jump
from its largest saving rank to dense: a group only saves below break-even,
so past it the group is kept dense, and the dense cost counts. Error curves
need not be convex (the dense jump usually is not), so each group's choices
are replaced by the upper concave hull of (cost, error reduction): its
segments have decreasing ρ, and one heap over all groups' next segments pops
the best ρ first. A segment that fits is taken. One that does not fit any
more is not cut short at a point below the hull: the group forgets the
choices it can no longer afford (the budget only shrinks), its hull is
rebuilt over the rest and its next segment goes back on the heap at its true
ρ. The loop ends when no group has an affordable step left, so the budget
left is below every group's next step. The result is optimal (Lagrangian
argument) at every budget the greedy meets with whole segments of the full
hulls; in between it is a knapsack heuristic.

Cost: O(Σ K_g log(Σ K_g)) for G groups of K_g choices: the segments taken
before the first one that does not fit are found at once by one sort (the
order the heap would pop them in), then the heap takes over, rebuilding a hull
over the still affordable choices each time a segment stops fitting (near the
end of the budget, where few choices are affordable). 200 matrices of rank
4096: about a second.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import numpy as np

import harness
from harness_allocators import limits


def choice_error(fact: harness.Factorization, rank: int | None) -> float:
    return 0.0 if rank is None else fact.error(rank)


def concave_prefix(costs: list[float], gains: list[float]) -> int:
    """How many leading points already form a strictly concave chain with rising costs."""
    n = len(costs)
    if n < 3:
        return n if n < 2 or costs[1] > costs[0] else 1
    dc, dg = np.diff(np.asarray(costs, dtype=float)), np.diff(np.asarray(gains, dtype=float))
    last = n - 1  # index of the last point of the prefix
    if (flat := np.flatnonzero(dc <= 0)).size:
        last = min(last, int(flat[0]))
    if (dents := np.flatnonzero(dg[:-1] * dc[1:] <= dg[1:] * dc[:-1])).size:
        last = min(last, int(dents[0]) + 1)
    return last + 1


def upper_hull(costs: list[float], gains: list[float]) -> list[int]:
    """Indices of the upper concave hull of (cost, gain), from the first point; costs non-decreasing.

    A point is dropped where a later one costs no more (and, errors being
    non-increasing, gains at least as much) or where it lies on or below the
    chord between its neighbours. The concave leading run is taken at once.
    """
    start = concave_prefix(costs, gains)
    hull = list(range(start))
    for i in range(start, len(costs)):
        if len(hull) > 1 and costs[hull[-1]] >= costs[i]:
            hull.pop()
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (gains[b] - gains[a]) * (costs[i] - costs[a]) > (gains[i] - gains[a]) * (costs[b] - costs[a]):
                break
            hull.pop()
        hull.append(i)
    return hull


def ratio(gain: float, cost: float) -> float:
    return float("inf") if cost <= 0 else gain / cost


class Chain:
    """One group's choices, their costs and errors, and the upper hull of those still affordable."""

    def __init__(self, fact: harness.Factorization, band: limits.Band, target: harness.Target, dtype_bytes: int):
        self.choices = band.choices
        self.costs = [*target.costs(fact, band.ranks, dtype_bytes)]
        self.costs.append(target.cost(fact, None, dtype_bytes))
        errors = [fact.error(r) for r in band.ranks] + [0.0]
        self.gains = [errors[0] - e for e in errors]
        self.at = 0  # current choice index
        self.rehull(len(self.choices))

    def rehull(self, stop: int) -> None:
        """The hull from the current choice over the choices before ``stop``."""
        hull = upper_hull(self.costs[self.at : stop], self.gains[self.at : stop])
        self.hull = [self.at + i for i in hull]
        self.step = 0

    def segments(self) -> tuple[np.ndarray, np.ndarray]:
        """(ρ, extra cost) of each hull segment ahead, as arrays."""
        hull = np.asarray(self.hull[self.step :], dtype=np.int64)
        dc = np.diff(np.asarray(self.costs, dtype=float)[hull])
        dg = np.diff(np.asarray(self.gains, dtype=float)[hull])
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(dc > 0, dg / np.where(dc > 0, dc, 1.0), np.inf)
        return rho, dc

    def next_segment(self) -> tuple[float, int] | None:
        """(ρ, end choice index) of the next hull segment, or None at the end."""
        if self.step + 1 >= len(self.hull):
            return None
        a, b = self.hull[self.step], self.hull[self.step + 1]
        return ratio(self.gains[b] - self.gains[a], self.costs[b] - self.costs[a]), b

    def advance(self, steps: int = 1) -> None:
        self.step += steps
        self.at = self.hull[self.step]

    def shrink(self, allowance: float) -> None:
        """Forget the choices costing more than ``allowance`` above the current one (the budget only shrinks)."""
        self.rehull(bisect.bisect_right(self.costs, self.costs[self.at] + allowance, self.at + 1))


def take_fitting_prefix(chains: list[Chain], spent: float, limit: float) -> float:
    """Take, at once, the segments the heap would pop before the first that does not fit; the new spend.

    The heap pops segments by (-ρ, group): within a group ρ falls strictly
    along the hull, so that order is one sort of every group's segments.
    """
    parts = [(g, *chain.segments()) for g, chain in enumerate(chains)]
    groups = np.concatenate([np.full(len(rho), g) for g, rho, _ in parts])
    if not len(groups):
        return spent
    ratios = np.concatenate([rho for _, rho, _ in parts])
    extras = np.concatenate([extra for _, _, extra in parts])
    order = np.lexsort((groups, -ratios))
    running = spent + np.cumsum(extras[order])
    over = np.flatnonzero(running > limit)
    taken = int(over[0]) if over.size else len(order)
    steps = np.bincount(groups[order[:taken]], minlength=len(chains))
    for chain, step in zip(chains, steps.tolist(), strict=True):
        chain.advance(step)
    return float(running[taken - 1]) if taken else spent


def greedy(facts, groups, target: harness.Target, dtype_bytes: int) -> harness.Assignment:
    """Greedy over all groups' hull segments, best ρ first, within ``target``'s budget."""
    limit = target.limit(facts, dtype_bytes)
    chains = [Chain(f, band, target, dtype_bytes) for f, band in zip(facts, groups, strict=True)]
    spent = take_fitting_prefix(chains, sum(chain.costs[0] for chain in chains), limit)
    heap = [(-segment[0], g) for g, chain in enumerate(chains) if (segment := chain.next_segment()) is not None]
    heapq.heapify(heap)
    while heap:
        _, g = heapq.heappop(heap)
        chain = chains[g]
        _, end = chain.next_segment()
        extra = chain.costs[end] - chain.costs[chain.at]
        if spent + extra <= limit:
            spent += extra
            chain.advance()
        else:  # the segment no longer fits: re-hull over what still does, at its true ratios
            chain.shrink(limit - spent)
        if (segment := chain.next_segment()) is not None:
            heapq.heappush(heap, (-segment[0], g))
    return [chain.choices[chain.at] for chain in chains]


@dataclass(frozen=True)
class GreedyOptions(limits.LimitOptions):
    pass


class GlobalGreedy(harness.RankAllocator):
    name = "global-greedy"
    saving_ranks_only = True
    Options = GreedyOptions
    description = "singular directions across all matrices by error reduction per parameter (or byte, or rank)"

    def allocate(self, factorizations, target, options, ctx):
        limits.check_kind(self, target)
        facts = list(factorizations)
        groups = limits.bands(facts, options)
        limit = target.limit(facts, ctx.dtype_bytes)
        floor = limits.smallest(groups)
        if (lowest := target.assignment_cost(facts, floor, ctx.dtype_bytes)) > limit:
            raise limits.infeasible(self.name, target, facts, lowest, limit)
        return greedy(facts, groups, target, ctx.dtype_bytes)
