"""SVD-LLM V2's heterogeneous compression-ratio allocation (Algorithm 1 of the paper).

Matrices are grouped by type (``LayerInfo.kind``: every ``q_proj`` across
layers is one group). At the target's removed fraction R, each matrix's
theoretical truncation loss L_i is its factorization's own error at the
uniform rank (SVD-LLM's rank for R: the largest saving rank within (1 - R)
of its parameters), as a Frobenius norm, L_i = sqrt(error). The paper
normalizes by s_i = 1 / ln(L_i) and gives matrix i of a group of N the
removed fraction

.. math:: r_i = N \\, R \\, s_i / \\textstyle\\sum_j s_j ,

so a matrix that loses more at the uniform ratio is compressed less, and the
group's mean removed fraction stays R. Here the mean is weighted by dense
parameters, r_i = R s_i sum_j P_j / sum_j s_j P_j: the same numbers for a
group of equal shapes (every type in a transformer), and a group's removed
parameters stay R of its dense parameters for any shapes. Each matrix then
keeps the largest saving rank within (1 - r_i) of its parameters (SVD-LLM's
rank rule, per matrix), so no group spends more than its budget.

Where the formula is undefined the rule is completed (README, deviations):
a zero loss counts as the group's smallest positive loss; a group whose
smallest loss is below e (ln L < 1, e.g. little calibration data, small
activations) has its losses rescaled by one common factor so that the smallest
is e; r_i is clipped to [0, 1].
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import harness


@dataclass(frozen=True)
class GroupReport:
    """What the rule did in one type group (for the log)."""

    kind: str
    size: int
    rescale: float
    """The common factor applied to the group's losses (1.0: the paper's formula as written)."""
    removed: tuple[float, ...]
    """r_i per matrix, in the group's order."""


def layer_kind(fact: harness.Factorization, layers: dict[str, harness.LayerInfo]) -> str:
    """A factorization's type: its layers' kinds (the last name component where a layer is unknown)."""
    kinds = [layers[name].kind if name in layers else name.rsplit(".", 1)[-1] for name in fact.names]
    return "+".join(dict.fromkeys(kinds))


def rank_within(fact: harness.Factorization, keep: float, min_rank: int) -> int | None:
    """The largest saving rank costing at most ``keep`` of ``fact``'s dense parameters, raised to ``min_rank``.

    None (dense) where ``keep >= 1`` or where no rank at or above the floor saves.
    """
    if keep >= 1:
        return None
    ranks = fact.ranks  # ascending; costs grow with rank, so bisect on them
    limit = min(keep * fact.dense_params, fact.dense_params - 1)  # saving: strictly below dense
    i = bisect.bisect_right(ranks, limit, key=fact.params) - 1
    rank = ranks[max(i, 0)]
    floor = next((r for r in ranks if r >= min_rank), None)
    if floor is not None and rank < floor:
        rank = floor
    return rank if harness.saves(fact, rank) else None


def uniform_loss(fact: harness.Factorization, keep: float) -> float:
    """L = sqrt(error) at SVD-LLM's uniform rank for ``keep`` (0 where that keeps the matrix dense)."""
    rank = rank_within(fact, keep, 0)
    return 0.0 if rank is None else math.sqrt(max(fact.error(rank), 0.0))


def inverse_log_scores(losses: Sequence[float]) -> tuple[list[float], float]:
    """s_i = 1 / ln(c L_i) and the common factor c (1 where every L_i >= e: the paper's formula).

    A zero loss counts as the smallest positive one; all zero: equal scores
    (the group stays uniform).
    """
    positive = [x for x in losses if x > 0]
    if not positive:
        return [1.0] * len(losses), 1.0
    least = min(positive)
    filled = [max(x, least) for x in losses]
    scale = 1.0 if least >= math.e else math.e / least
    return [1.0 / math.log(scale * x) for x in filled], scale


def removed_fractions(facts: Sequence[harness.Factorization], removed: float, keep: float) -> tuple[list[float], float]:
    """r_i of one type group for the target's removed fraction ``removed`` (= 1 - keep), and the rescale used."""
    scores, scale = inverse_log_scores([uniform_loss(f, keep) for f in facts])
    dense = [f.dense_params for f in facts]
    weighted = sum(s * p for s, p in zip(scores, dense, strict=True))
    if weighted <= 0:
        return [removed] * len(facts), scale
    total = sum(dense)
    return [min(1.0, max(0.0, removed * s * total / weighted)) for s in scores], scale


def type_groups(facts: Sequence[harness.Factorization], layers: dict[str, harness.LayerInfo]) -> dict[str, list[int]]:
    """Indices of ``facts`` per type, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        groups.setdefault(layer_kind(fact, layers), []).append(i)
    return groups


def heterogeneous_ranks(
    facts: Sequence[harness.Factorization],
    groups: dict[str, list[int]],
    keep: float,
    min_rank: int,
) -> tuple[harness.Assignment, list[GroupReport]]:
    """Every group's ranks under the rule at kept fraction ``keep`` (removed R = 1 - keep)."""
    ranks: harness.Assignment = [None] * len(facts)
    reports: list[GroupReport] = []
    if keep >= 1:
        return ranks, reports
    if keep <= 0:  # everything removed: every matrix at its floor (the bisection's lower end)
        return [rank_within(fact, 0.0, min_rank) for fact in facts], reports
    for kind, members in groups.items():
        group = [facts[i] for i in members]
        removed, scale = removed_fractions(group, 1.0 - keep, keep)
        for i, fact, r in zip(members, group, removed, strict=True):
            ranks[i] = rank_within(fact, 1.0 - r, min_rank)
        reports.append(GroupReport(kind, len(members), scale, tuple(removed)))
    return ranks, reports


def allocate(
    facts: Sequence[harness.Factorization],
    target: harness.Target,
    layers: dict[str, harness.LayerInfo],
    dtype_bytes: int,
    min_rank: int,
    log: Callable[[str], None],
) -> harness.Assignment:
    """The rule at the target's own ratio where that fits (a ``params`` target), else at the largest ratio that does.

    A ``params`` target ``keep`` is the paper's R = 1 - keep. Other kinds
    (``rank``, ``bytes``, ``bits``), and a ``params`` target that the rank
    floors push over budget, bisect one common kept fraction (the same R for
    every type) for the largest assignment that meets the target.
    """
    groups = type_groups(facts, layers)

    def fits(ranks: harness.Assignment) -> bool:
        return target.fits(facts, ranks, dtype_bytes)

    def build(keep: float) -> harness.Assignment:
        return heterogeneous_ranks(facts, groups, keep, min_rank)[0]

    keep = target.value if target.kind == "params" else None
    if keep is None or not fits(build(keep)):
        found = harness.largest_fitting(build, fits, 0.0, 1.0, steps=40)
        if found is None:
            raise harness.HarnessError(
                f"allocator 'svd-llm-v2', target {target.label}: even the smallest ranks the rule gives "
                f"(min_rank = {min_rank}) are over budget; lower min_rank or raise the target"
            )
        keep = found.knob
    ranks, reports = heterogeneous_ranks(facts, groups, keep, min_rank)
    for report in reports:
        spread = f"{min(report.removed):.3f}..{max(report.removed):.3f}" if report.removed else "-"
        note = "" if report.rescale == 1.0 else f", losses rescaled x{report.rescale:.3g} (smallest below e)"
        log(f"svd-llm-v2: {report.kind} ({report.size}): removed fraction {spread} around {1 - keep:.4g}{note}")
    return ranks
