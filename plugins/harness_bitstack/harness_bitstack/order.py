"""BitStack's global block order, and loading the longest prefix that fits a budget.

Every matrix first keeps ``min_blocks`` blocks (the repo: 1). Then, level by
level (all 2nd blocks before any 3rd, ...), the candidate blocks of a level
are ranked by a score, lower first:

- ``score = "loss"`` (the repo's ``--score_importance``): every matrix at
  ``level`` blocks, this one matrix at ``level + 1``; the calibration loss of
  that model (``AllocationContext.calibration_loss``). The repo measures the
  perplexity of the same configuration on 32 calibration samples; perplexity
  is monotone in the loss, so the order is the same. A NaN or infinite loss
  sorts last in its level.
- ``score = "proxy"`` (ours, labelled so in the cell's config): minus the
  reduction of ||W - W_r||_F^2 per byte the block costs. No data needed;
  not the paper's order.

Ties go to the earlier group. For a target's budget (``Target.budget``:
``bytes`` or ``bits``, the bytes of the dense weights it allows; ``params``, the
kept fraction of their parameters; each block counted by ``Target.cost``) the
allocator loads the longest prefix of the order whose total fits, never
exceeding it; a budget below the minimum configuration is a HarnessError. One order is computed per
set of factorizations and options and reused for every budget.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import harness

Score = Callable[[int, int, list[int]], float]
"""score(group, level, base assignment) -> lower loads first."""


def level_order(n_blocks: Sequence[int], min_blocks: int, score: Score, log=None) -> list[int]:
    """The global order of blocks beyond ``min_blocks``, as group indices (one entry per block).

    Entry j means "add the next block of that group"; within a group blocks are
    in level order, so every prefix is a valid configuration.
    """
    order: list[int] = []
    top = max(n_blocks, default=0)
    for level in range(min_blocks, top):
        base = [min(level, n) for n in n_blocks]
        candidates = [g for g, n in enumerate(n_blocks) if n > level]
        scores = {g: _finite(score(g, level, base)) for g in candidates}
        order.extend(sorted(candidates, key=lambda g: (scores[g], g)))
        if log is not None:
            log(f"bitstack-order: level {level + 1} of {top} ranked ({len(candidates)} blocks)")
    return order


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def longest_prefix(
    order: Sequence[int], base: list[int], cost: Callable[[int, int], float], limit: float
) -> list[int] | None:
    """``base`` plus the longest prefix of ``order`` whose total ``cost(group, rank)`` <= ``limit``."""
    ranks = list(base)
    total = sum(cost(g, r) for g, r in enumerate(ranks))
    if total > limit:
        return None
    for g in order:
        step = cost(g, ranks[g] + 1) - cost(g, ranks[g])
        if total + step > limit:
            break
        total += step
        ranks[g] += 1
    return ranks


def loss_score(facts, calibration_loss) -> Score:
    def score(g: int, level: int, base: list[int]) -> float:
        assignment = list(base)
        assignment[g] = level + 1
        return float(calibration_loss(assignment))

    return score


def proxy_score(facts, dtype_bytes: int) -> Score:
    def score(g: int, level: int, base: list[int]) -> float:
        f = facts[g]
        gain = f.error(level) - f.error(level + 1)
        return -gain / max(f.bytes(level + 1, dtype_bytes) - f.bytes(level, dtype_bytes), 1)

    return score


@dataclass(frozen=True)
class BitStackOrderOptions:
    score: Literal["loss", "proxy"] = "loss"
    """loss: the repo's calibration-loss order (needs calibration data); proxy: error reduction per byte."""
    min_blocks: int = field(default=1, metadata={"minimum": 0})
    """Blocks every matrix keeps before the order starts (the repo: 1)."""

    def __post_init__(self) -> None:
        if self.min_blocks < 0:
            raise harness.HarnessError(f"min_blocks: expected 0 or more, got {self.min_blocks}")


class BitStackOrder(harness.RankAllocator):
    name = "bitstack-order"
    Options = BitStackOrderOptions
    target_kinds = ("bytes", "bits", "params")
    uses_calibration = True
    description = "BitStack: global block order by calibration loss, longest prefix within a memory budget"

    def __init__(self) -> None:
        self._orders: dict[tuple, tuple[list, list[int]]] = {}

    def allocate(self, factorizations, target, options, ctx):
        facts = list(factorizations)
        n_blocks = [block_count(f) for f in facts]
        order = self.order(facts, options, ctx)
        base = [min(options.min_blocks, n) for n in n_blocks]
        if not self.takes(target.kind):
            raise harness.HarnessError(f"bitstack-order takes bytes, bits or params targets, not {target.kind}")
        limit = target.budget(facts, ctx.dtype_bytes)

        def cost(g, r):
            return target.cost(facts[g], r, ctx.dtype_bytes)

        ranks = longest_prefix(order, base, cost, limit)
        if ranks is None:
            least = sum(cost(g, r) for g, r in enumerate(base))
            raise harness.HarnessError(
                f"target {target.label}: {limit:.0f} {target.unit} is below the minimum of {options.min_blocks} "
                f"block(s) per matrix, {least} {target.unit}"
            )
        return ranks

    def order(self, facts: list, options: BitStackOrderOptions, ctx) -> list[int]:
        """The cached global order for this set of factorizations and options."""
        self._orders = {k: v for k, v in self._orders.items() if all(ref() is not None for ref in v[0])}
        key = (tuple(id(f) for f in facts), options.score, options.min_blocks, ctx.seed)
        cached = self._orders.get(key)
        if cached is not None and all(ref() is f for ref, f in zip(cached[0], facts)):
            return cached[1]
        if options.score == "loss":
            if ctx.calibration_loss is None:
                raise harness.HarnessError(
                    'bitstack-order: score = "loss" needs calibration data (the suite has none); '
                    'configure calibration or use score = "proxy"'
                )
            score = loss_score(facts, ctx.calibration_loss)
        else:
            ctx.log("bitstack-order: score=proxy (error reduction per byte), not the paper's calibration-loss order")
            score = proxy_score(facts, ctx.dtype_bytes)
        order = level_order([block_count(f) for f in facts], options.min_blocks, score, log=ctx.log)
        self._orders[key] = ([weakref.ref(f) for f in facts], order)
        return order


def block_count(fact) -> int:
    """Blocks of a factorization whose ranks are 0..N; HarnessError for any other."""
    ranks = list(fact.ranks)
    if ranks != list(range(len(ranks))):
        raise harness.HarnessError(
            f"bitstack-order works in blocks (ranks 0..N); {'+'.join(fact.names)} has ranks {ranks[:5]}..."
        )
    return len(ranks) - 1
