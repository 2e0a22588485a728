"""SFSD's surgical rank search (nyunAI/SFSD-LLM ``perplexity_test.py``), bounded by the suite's target.

The code's rule, for the N decomposable groups in module order (i = 0 .. N-1):

1. Groups are visited from the last to the first; the first ``start`` (the code's
   hard-coded 28 of 224 Linears: the first 4 of 32 blocks) are never compressed.
2. Group i tries the candidate ranks 1, int(0.1 k), ..., int(0.9 k) in increasing
   order, with every later group at the rank it was given and every earlier one dense;
   k = int(m n / (m + n)) is the group's break-even rank (the code's ``max_rank``). The
   first candidate whose perplexity on the search data is at most
   ppl_0 (1 + growth)^(N - i) is kept (ppl_0: the dense model's; growth 0.005). The
   last candidate of the code's set, k itself, keeps the layer dense, as does a group
   where no candidate passes.

So the permitted perplexity grows by the factor 1 + growth per group visited: each
group may add 0.5 % plus whatever slack the later groups left; in loss terms
(ppl = exp(mean token loss)) the test is loss <= loss_0 + (N - i) ln(1 + growth).

The suite's target bounds the total, as the code's budget checkpoints do: the code
sweeps the whole model and saves the model the moment its parameters first fall
under a budget (``budget_90``, ``budget_80``); here the sweep stops as soon as the
assignment meets the target (the earlier groups stay dense). Where a whole sweep
ends above the target (the tolerance too tight for it), the growth is multiplied by
``relax`` and the sweep starts again from the dense model, up to ``sweeps`` times
(a deviation: the code would end over the budget).

Reference ranks (``[calibration] inputs = "propagated"``): the pipeline asks the
cell's allocator for the ranks of one block's groups at a time (their share of the
target) to compress the model its later statistics are collected on. The code
collects them with every layer at its break-even rank k; with ``reference =
"break-even"`` (default) this allocator answers such a call (one given fewer groups
than the model's layers, ``ctx.layers``) with k for every group; ``"search"`` runs
the rule on the block's groups instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import harness

FRACTIONS = tuple(0.1 + i * 0.1 for i in range(10))
"""The code's ``np.arange(0.1, 1.1, 0.1)``, element for element (numpy fills start + i * step)."""


@dataclass(frozen=True)
class SurgicalOptions:
    growth: float = field(default=0.005, metadata={"exclusive_minimum": 0})
    """Permitted perplexity growth per group visited: ppl_i <= ppl_0 (1 + growth)^(N - i) (the code's 1.005)."""
    start: float = field(default=0.125, metadata={"minimum": 0, "exclusive_maximum": 1})
    """Fraction of the groups, from the first in module order, never compressed (the code: 28 of 224)."""
    relax: float = field(default=2.0, metadata={"exclusive_minimum": 1})
    """Where a sweep ends above the target, the growth is multiplied by this and the sweep restarts."""
    sweeps: int = field(default=6, metadata={"minimum": 1})
    """Sweeps at most (growth, growth x relax, ...) before the target is declared out of the rule's reach."""
    reference: Literal["break-even", "search"] = "break-even"
    """Reference ranks for propagated statistics: every group at its break-even rank (the code), or the rule."""

    def __post_init__(self) -> None:
        if not self.growth > 0:
            raise ValueError(f"growth: expected a number > 0, got {self.growth!r}")
        if not 0 <= self.start < 1:
            raise ValueError(f"start: expected a fraction in [0, 1), got {self.start!r}")
        if not self.relax > 1:
            raise ValueError(f"relax: expected a number > 1, got {self.relax!r}")
        if self.sweeps < 1:
            raise ValueError(f"sweeps: expected a positive integer, got {self.sweeps!r}")


def break_even(fact: harness.Factorization) -> int:
    """The code's ``max_rank``: int(m n / (m + n)) of the group's matrices (summed), within its ranks."""
    width = sum(m + n for m, n in fact.shapes)
    kappa = fact.dense_params // width if width else 0
    return max((r for r in fact.ranks if r <= kappa), default=fact.ranks[0])


def candidates(fact: harness.Factorization) -> list[int]:
    """The code's search space less its last entry (k: kept dense), as ranks that save parameters, ascending."""
    kappa = break_even(fact)
    supported = set(fact.ranks)
    wanted = {1, *(int(f * kappa) for f in FRACTIONS[:-1])}
    return sorted(r for r in wanted if r >= 1 and r in supported and harness.saves(fact, r))


def frozen(groups: int, start: float) -> int:
    """How many groups, from the first, the search leaves dense."""
    return math.floor(start * groups + 1e-9)


def sweep(
    choices: Sequence[Sequence[int]],
    loss: Callable[[Sequence[int | None]], float],
    growth: float,
    start: int,
    fits: Callable[[Sequence[int | None]], bool],
) -> tuple[list[int | None], bool]:
    """One pass of the rule, last group to group ``start``, stopping once ``fits``: (ranks, whether it fits)."""
    n = len(choices)
    ranks: list[int | None] = [None] * n
    if fits(ranks):
        return ranks, True
    base, step = loss(ranks), math.log1p(growth)
    for i in reversed(range(start, n)):
        allowed = base + (n - i) * step
        for rank in choices[i]:
            trial = [*ranks[:i], rank, *ranks[i + 1 :]]
            if loss(trial) <= allowed:
                ranks = trial
                break
        if fits(ranks):
            return ranks, True
    return ranks, False


class Surgical(harness.RankAllocator):
    name = "surgical"
    Options = SurgicalOptions
    uses_calibration = True
    saving_ranks_only = False  # reference ranks at break-even save nothing
    description = "SFSD: last layer to first, smallest candidate rank within a growing perplexity tolerance"

    def allocate(self, factorizations, target, options, ctx):
        facts = list(factorizations)
        if options.reference == "break-even" and is_reference_call(facts, ctx):
            ctx.log(f"surgical: reference ranks for {len(facts)} groups at break-even (the code's max_rank)")
            return [break_even(f) for f in facts]
        if ctx.calibration_loss is None:
            raise harness.HarnessError(
                f"allocator {self.name!r} measures the calibration loss, but this suite has no calibration data"
            )
        limit = target.limit(facts, ctx.dtype_bytes)

        def fits(ranks: Sequence[int | None]) -> bool:
            return target.assignment_cost(facts, ranks, ctx.dtype_bytes) <= limit

        choices = [candidates(f) for f in facts]
        start = frozen(len(facts), options.start)
        smallest = [None if i < start or not c else c[0] for i, c in enumerate(choices)]
        if not fits(smallest):
            cost = target.assignment_cost(facts, smallest, ctx.dtype_bytes)
            raise harness.HarnessError(
                f"allocator {self.name!r}, target {target.label}: even the smallest candidate ranks cost "
                f"{cost:.6g} {target.unit}, over the budget of {limit:.6g} (the first {start} groups stay dense: "
                "lower the allocator's start or raise the target)"
            )
        loss = cached(ctx.calibration_loss)
        growth = options.growth
        for attempt in range(options.sweeps):
            ranks, met = sweep(choices, loss, growth, start, fits)
            ctx.log(
                f"surgical: sweep {attempt + 1} at growth {growth:g}: {sum(r is not None for r in ranks)} of "
                f"{len(facts)} groups compressed, {'meets' if met else 'misses'} {target.label}"
            )
            if met:
                return ranks
            growth *= options.relax
        raise harness.HarnessError(
            f"allocator {self.name!r}, target {target.label}: {options.sweeps} sweeps up to growth "
            f"{growth / options.relax:g} per group did not meet the target; raise growth or sweeps"
        )


def is_reference_call(facts: Sequence[harness.Factorization], ctx: harness.AllocationContext) -> bool:
    """True where the groups cover only some of the model's layers: the propagated pass asks for one block."""
    covered = {name for fact in facts for name in fact.names}
    return bool(ctx.layers) and covered < set(ctx.layers)


def cached(loss: Callable[[Sequence[int | None]], float]) -> Callable[[Sequence[int | None]], float]:
    """``loss`` evaluated once per assignment (sweeps repeat the dense model and their first steps)."""
    seen: dict[tuple, float] = {}

    def once(ranks: Sequence[int | None]) -> float:
        key = tuple(ranks)
        if key not in seen:
            seen[key] = float(loss(list(ranks)))
        return seen[key]

    return once
