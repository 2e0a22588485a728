"""Budget arithmetic shared by rank allocators.

An *assignment* gives each factorization (group) a rank, or None: keep that
group's original dense weights. Allocators must never pick a rank that saves
nothing (``saves``); where the best rank would not, they return None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from harness.factorization import Factorization
from harness.targets import Target

Assignment = list[int | None]


def dense_total(facts: Sequence[Factorization]) -> int:
    """Parameters of every group's original dense weights."""
    return sum(f.dense_params for f in facts)


def group_params(fact: Factorization, rank: int | None) -> int:
    return fact.dense_params if rank is None else fact.params(rank)


def group_bytes(fact: Factorization, rank: int | None, dtype_bytes: int) -> int:
    return fact.dense_params * dtype_bytes if rank is None else fact.bytes(rank, dtype_bytes)


def assignment_params(facts: Sequence[Factorization], ranks: Sequence[int | None]) -> int:
    return sum(group_params(f, r) for f, r in zip(facts, ranks, strict=True))


def assignment_bytes(facts: Sequence[Factorization], ranks: Sequence[int | None], dtype_bytes: int) -> int:
    return sum(group_bytes(f, r, dtype_bytes) for f, r in zip(facts, ranks, strict=True))


def saves(fact: Factorization, rank: int) -> bool:
    """True where the factored group at ``rank`` holds fewer parameters than dense."""
    return fact.params(rank) < fact.dense_params


def largest_rank_within(fact: Factorization, params: float) -> int | None:
    """The largest supported rank whose cost fits ``params`` and saves something, else None."""
    best = None
    for rank in fact.ranks:
        if fact.params(rank) <= params and saves(fact, rank):
            best = rank
    return best


def fits(facts: Sequence[Factorization], ranks: Sequence[int | None], target: Target, dtype_bytes: int) -> bool:
    """Does ``ranks`` meet a ``params``, ``bytes`` or ``bits`` target?"""
    if target.kind == "params":
        return assignment_params(facts, ranks) <= target.value * dense_total(facts) + 1e-9
    if target.kind in ("bytes", "bits"):
        return assignment_bytes(facts, ranks, dtype_bytes) <= target.budget_bytes(dense_total(facts))
    raise ValueError(f"fits() does not apply to {target.kind} targets")


def largest_fitting(
    build: Callable[[float], Assignment],
    ok: Callable[[Assignment], bool],
    lo: float = 0.0,
    hi: float = 1.0,
    steps: int = 40,
) -> Assignment | None:
    """Bisect a monotone knob in [lo, hi]: the assignment of the largest knob with ``ok``.

    ``build(knob)`` must give assignments that grow with the knob. Returns None
    when even ``build(lo)`` does not fit.
    """
    best = build(lo)
    if not ok(best):
        return None
    if ok(top := build(hi)):
        return top
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = build(mid)
        if ok(candidate):
            lo, best = mid, candidate
        else:
            hi = mid
    return best
