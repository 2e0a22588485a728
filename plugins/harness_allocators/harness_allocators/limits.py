"""Per-group rank floors and ceilings, and the choices they leave each group.

Every allocator here picks, for each group, one of its *choices*: a supported
rank r with ``floor <= r <= ceiling`` that saves parameters
(``harness.saves``), or None (keep the group dense). Choices are listed in
increasing cost, dense last (a rank that saves costs less than dense). A
ceiling limits the rank a group is *factored* at; a group that would need
more stays dense, exactly as past break-even.

- floor: ``max(min_rank, ceil(min_rank_fraction * full_rank))``
- ceiling: ``floor(max_rank_fraction * full_rank)``

A group whose floor does not save has only one choice: dense.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import harness

if TYPE_CHECKING:
    from harness import Assignment, Factorization, Target

EPS = 1e-9


@dataclass(frozen=True)
class LimitOptions:
    """Floors and ceilings shared by the allocators (fractions of each group's full rank)."""

    min_rank_fraction: float = field(default=0.0, metadata={"minimum": 0, "maximum": 1})
    """No group is factored below this fraction of its full rank."""
    max_rank_fraction: float = field(default=1.0, metadata={"minimum": 0, "maximum": 1})
    """No group is factored above this fraction of its full rank (one that would need more stays dense)."""
    min_rank: int = field(default=1, metadata={"minimum": 0})
    """No group is factored below this rank (0 allows removing a group entirely)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_rank_fraction <= self.max_rank_fraction <= 1:
            raise ValueError(
                "expected 0 <= min_rank_fraction <= max_rank_fraction <= 1, "
                f"got {self.min_rank_fraction:g} and {self.max_rank_fraction:g}"
            )
        if self.min_rank < 0:
            raise ValueError(f"min_rank: expected a rank >= 0, got {self.min_rank}")


def rank_bounds(fact: Factorization, options: LimitOptions) -> tuple[int, int]:
    """(floor, ceiling) of ``fact``'s rank under ``options``."""
    full = fact.full_rank
    floor = max(options.min_rank, math.ceil(options.min_rank_fraction * full - EPS))
    ceiling = math.floor(options.max_rank_fraction * full + EPS)
    return floor, ceiling


class Band:
    """One group's choices under the floors and ceilings, with fast clamping.

    ``choices``: allowed ranks ascending, then None (dense). ``clamp(rank)``
    maps a desired rank (None: full) to the cheapest choice at or above it: a
    rank below the floor rises to the floor; one above every allowed rank (past
    the ceiling, or past break-even) keeps the group dense, as in the greedy's
    chain, where the step after the last allowed rank is dense. ``allow`` (a
    rule's own condition, true on a prefix of the ranks) removes the ranks
    above it from the choices.
    """

    def __init__(self, fact: Factorization, options: LimitOptions, allow: Callable[[int], bool] | None = None) -> None:
        floor, ceiling = rank_bounds(fact, options)
        self.fact, self.floor, self.ceiling = fact, floor, ceiling
        ranks = fact.ranks
        inside = list(ranks[bisect.bisect_left(ranks, floor) : bisect.bisect_right(ranks, ceiling)])
        # costs grow with rank, so the saving ranks are a prefix (harness.saves)
        saving = bisect.bisect_left(inside, fact.dense_params, key=fact.params)
        self.ranks = [r for r in inside[:saving] if allow(r)] if allow else inside[:saving]
        self.choices: list[int | None] = [*self.ranks, None]

    def clamp(self, rank: int | None) -> int | None:
        if rank is None or not self.ranks or rank > self.ranks[-1]:
            return None
        return self.ranks[bisect.bisect_left(self.ranks, max(rank, self.floor))]


def bands(facts: Sequence[Factorization], options: LimitOptions) -> list[Band]:
    return [Band(f, options) for f in facts]


def check_kind(allocator: harness.RankAllocator, target: Target) -> None:
    if not allocator.takes(target.kind):
        raise harness.HarnessError(
            f"allocator {allocator.name!r} takes {', '.join(allocator.target_kinds)} targets, "
            f"got a {target.kind} target ({target.label})"
        )


def cost_of(target: Target, dtype_bytes: int) -> Callable[[Factorization, int | None], float]:
    return lambda fact, rank: target.cost(fact, rank, dtype_bytes)


def infeasible(
    allocator: str, target: Target, facts: Sequence[Factorization], smallest: float, limit: float
) -> Exception:
    return harness.HarnessError(
        f"allocator {allocator!r}, target {target.label}: the smallest assignment the rank floors allow "
        f"costs {smallest:.6g} {target.unit}, over the budget of {limit:.6g} over {len(facts)} groups; "
        "lower min_rank / min_rank_fraction or raise the target"
    )


def smallest(groups: Sequence[Band]) -> Assignment:
    """Every group at its cheapest choice."""
    return [band.choices[0] for band in groups]


def fit_knob(
    allocator: str,
    facts: Sequence[Factorization],
    groups: Sequence[Band],
    target: Target,
    dtype_bytes: int,
    build: Callable[[float], Assignment],
    lo: float = 0.0,
    hi: float = 1.0,
) -> tuple[Assignment, float]:
    """The assignment of the largest knob in [lo, hi] that meets ``target``, topped up, and that knob.

    ``build(knob)`` gives desired ranks (None: full) that grow with the knob;
    they are clamped into each group's band. The knob is bisected
    (``harness.largest_fitting``); groups that change between the last fitting
    and the first failing knob are then raised one at a time while the budget
    allows (``harness.top_up``), so the budget left is below one step of some
    group. Raises HarnessError where even the floors are over budget.
    """
    cost = cost_of(target, dtype_bytes)
    limit = target.limit(facts, dtype_bytes)

    def ok(ranks: Assignment) -> bool:
        return sum(cost(f, r) for f, r in zip(facts, ranks, strict=True)) <= limit

    def clamped(knob: float) -> Assignment:
        return [band.clamp(r) for band, r in zip(groups, build(knob), strict=True)]

    floor = smallest(groups)
    if not ok(floor):
        raise infeasible(allocator, target, facts, target.assignment_cost(facts, floor, dtype_bytes), limit)
    found = harness.largest_fitting(clamped, ok, lo, hi)
    if found is None:  # even the knob's lowest setting is over budget: top up from the floors
        found = (floor, clamped(lo), lo)
    fitting, over, knob = found
    if over is not None:
        fitting = harness.top_up(facts, fitting, over, [band.choices for band in groups], cost, limit)
    return fitting, knob
