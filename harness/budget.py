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


# ---------------------------------------------------------------- any target kind
# A target as an additive cost per group and a total budget, so that one
# allocator serves every kind:
#
# - ``params``: parameters kept; budget ``value`` x dense parameters.
# - ``bytes`` / ``bits``: bytes kept; budget ``Target.budget_bytes``.
# - ``rank``: rank kept (a dense group keeps its full rank); budget ``value`` x
#   the sum of full ranks, i.e. a rank-weighted mean kept fraction of rank
#   (WeLore's convention: removed rank / total rank over all matrices).

COST_KINDS = ("params", "bytes", "bits", "rank")


def group_cost(fact: Factorization, rank: int | None, target: Target, dtype_bytes: int) -> float:
    """What ``fact`` at ``rank`` (None: dense) spends of a ``target`` budget."""
    if target.kind == "params":
        return group_params(fact, rank)
    if target.kind in ("bytes", "bits"):
        return group_bytes(fact, rank, dtype_bytes)
    if target.kind == "rank":
        return fact.full_rank if rank is None else rank
    raise ValueError(f"no cost for {target.kind} targets")


def target_budget(facts: Sequence[Factorization], target: Target, dtype_bytes: int) -> float:
    """The largest total ``group_cost`` that meets ``target`` (same tolerance as ``fits``)."""
    if target.kind == "params":
        return target.value * dense_total(facts) + 1e-9
    if target.kind in ("bytes", "bits"):
        return target.budget_bytes(dense_total(facts))
    if target.kind == "rank":
        return target.value * sum(f.full_rank for f in facts) + 1e-9
    raise ValueError(f"no budget for {target.kind} targets")


def assignment_cost(
    facts: Sequence[Factorization], ranks: Sequence[int | None], target: Target, dtype_bytes: int
) -> float:
    return sum(group_cost(f, r, target, dtype_bytes) for f, r in zip(facts, ranks, strict=True))


def within(facts: Sequence[Factorization], ranks: Sequence[int | None], target: Target, dtype_bytes: int) -> bool:
    """Does ``ranks`` meet ``target`` of any kind (``fits`` plus ``rank`` targets)?"""
    return assignment_cost(facts, ranks, target, dtype_bytes) <= target_budget(facts, target, dtype_bytes)


def kept_rank_fraction(facts: Sequence[Factorization], ranks: Sequence[int | None]) -> float:
    """Rank kept over full rank, summed over groups (dense groups keep their full rank)."""
    full = sum(f.full_rank for f in facts)
    kept = sum(f.full_rank if r is None else r for f, r in zip(facts, ranks, strict=True))
    return kept / full if full else 1.0


def bracket_fitting(
    build: Callable[[float], Assignment],
    ok: Callable[[Assignment], bool],
    lo: float = 0.0,
    hi: float = 1.0,
    steps: int = 50,
) -> tuple[Assignment, Assignment | None, float] | None:
    """Like ``largest_fitting``, but also the assignment just past the boundary.

    Returns ``(fitting, over, knob)``: the assignment of the largest knob found
    with ``ok``, that of the smallest knob found without it (None when
    ``build(hi)`` fits), and the fitting knob. Returns None when ``build(lo)``
    does not fit.
    """
    best = build(lo)
    if not ok(best):
        return None
    top = build(hi)
    if ok(top):
        return top, None, hi
    over = top
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = build(mid)
        if ok(candidate):
            lo, best = mid, candidate
        else:
            hi, over = mid, candidate
    return best, over, lo


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
