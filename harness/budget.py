"""Budget arithmetic shared by rank allocators, independent of the target's kind.

An *assignment* gives each factorization (group) a rank, or None: keep that
group's original dense weights. Allocators must never pick a rank that saves
nothing (``saves``); where the best rank would not, they return None. What an
assignment costs under a target, and the budget it must meet, are the
target's (``harness.Target.cost``, ``.limit``, ``.fits``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from harness.factorization import Factorization

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


def keep_fraction(facts: Sequence[Factorization], keep: float) -> Assignment:
    """Each group's largest saving rank within ``keep`` of its dense parameters; keep >= 1 keeps all dense."""
    if keep >= 1:
        return [None] * len(facts)
    return [largest_rank_within(f, keep * f.dense_params) for f in facts]


def kept_rank_fraction(facts: Sequence[Factorization], ranks: Sequence[int | None]) -> float:
    """Rank kept over full rank, summed over groups (dense groups keep their full rank)."""
    full = sum(f.full_rank for f in facts)
    kept = sum(f.full_rank if r is None else r for f, r in zip(facts, ranks, strict=True))
    return kept / full if full else 1.0


class Fitting(NamedTuple):
    """What ``largest_fitting`` found."""

    ranks: Assignment
    """The assignment of the largest knob found that fits."""
    over: Assignment | None
    """The assignment of the smallest knob found that does not (None: ``build(hi)`` fits)."""
    knob: float
    """The knob of ``ranks``."""


def largest_fitting(
    build: Callable[[float], Assignment],
    ok: Callable[[Assignment], bool],
    lo: float = 0.0,
    hi: float = 1.0,
    steps: int = 50,
) -> Fitting | None:
    """Bisect a monotone knob in [lo, hi] for the largest whose assignment is ``ok``.

    ``build(knob)`` must give assignments that grow with the knob. Returns
    ``build(hi)`` when it fits; otherwise ``steps`` halvings keep the last
    fitting and the last failing assignment (``Fitting``). Returns None when
    even ``build(lo)`` does not fit.
    """
    best = build(lo)
    if not ok(best):
        return None
    top = build(hi)
    if ok(top):
        return Fitting(top, None, hi)
    over = top
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = build(mid)
        if ok(candidate):
            lo, best = mid, candidate
        else:
            hi, over = mid, candidate
    return Fitting(best, over, lo)


def top_up(
    facts: Sequence[Factorization],
    fitting: Assignment,
    over: Assignment,
    choices: Sequence[Sequence[int | None]],
    cost: Callable[[Factorization, int | None], float],
    budget: float,
) -> Assignment:
    """Raise the groups where ``fitting`` and ``over`` differ, in order, as far as the budget allows.

    ``choices[i]`` lists group i's allowed ranks in increasing cost (None,
    dense, last). Each differing group moves to the largest choice between its
    two ranks (up to ``over``'s) that still fits. After this, the budget left
    is smaller than the next step of some group that could not be raised.
    """
    ranks = list(fitting)
    spent = sum(cost(f, r) for f, r in zip(facts, ranks, strict=True))
    for i, (low, high) in enumerate(zip(fitting, over, strict=True)):
        if low == high:
            continue
        options = list(choices[i])
        start, stop = options.index(low), options.index(high)
        base = cost(facts[i], low)
        for choice in reversed(options[start + 1 : stop + 1]):
            extra = cost(facts[i], choice) - base
            if spent + extra <= budget:
                ranks[i], spent = choice, spent + extra
                break
    return ranks
