"""TRAWL's rank choice: the one rank R, common to every stacked group, that scores best on held-out data.

The authors sweep R (e.g. ``range(30, 81, 2)`` in ``src/TASER_intervention_gptj_bbh_qa.py`` of
HettyPatel/Laser_T), apply the intervention at each R, and report the R whose accuracy on a
validation split (the first 20% of the task's examples, ``validate(predictions, split=0.2)``) is
best, with the accuracy on the remaining 80% as the test figure. Here the score is the language
model loss on the suite's calibration windows (``AllocationContext.calibration_loss``, the first
``calibration.loss_samples`` windows), lowest first: a suite keeps that data held out by choosing a
``calibration.source`` that none of its evaluators reads.

Every candidate that meets the target is measured (one decomposition per group and rank, cached by
the decomposer, and one loss pass each); ties go to the smaller rank. In TRAWL's ``denoise`` mode no
rank saves parameters, so this allocator does not apply the "never a rank that saves nothing" rule of
the compression allocators: a ``params`` target of 1 (``targets = [1.0]``) accepts every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import harness

MAX_CANDIDATES = 64


@dataclass(frozen=True)
class TrawlValidationOptions:
    ranks: list[int] | None = field(default=None, metadata={"minimum": 1, "min_items": 1})
    """Candidate ranks; None: every rank all groups offer (TRAWL's ``ranks`` option), at most 64."""

    def __post_init__(self) -> None:
        if self.ranks is not None and (not self.ranks or any(r < 1 for r in self.ranks)):
            raise ValueError(f"ranks: expected a non-empty list of positive integers, got {self.ranks}")


def candidates(factorizations: Sequence[harness.Factorization], wanted: Sequence[int] | None) -> list[int]:
    """The ranks every group offers (restricted to ``wanted`` where given), ascending."""
    common = set.intersection(*(set(f.ranks) for f in factorizations)) - {0}
    if wanted is not None:
        missing = sorted(set(wanted) - common)
        if missing:
            raise harness.HarnessError(
                f"allocator 'trawl-validation': ranks {missing} are not offered by every group "
                f"(common ranks: {sorted(common)[:20]})"
            )
        common = set(wanted)
    if len(common) > MAX_CANDIDATES:
        raise harness.HarnessError(
            f"allocator 'trawl-validation': {len(common)} candidate ranks, more than {MAX_CANDIDATES} loss passes; "
            "list the candidates in its option 'ranks'"
        )
    return sorted(common)


class TrawlValidation(harness.RankAllocator):
    name = "trawl-validation"
    Options = TrawlValidationOptions
    uses_calibration = True
    description = "TRAWL: the one rank for every group with the lowest loss on held-out calibration windows"

    def allocate(self, factorizations, target, options, ctx):
        if ctx.calibration_loss is None:
            raise harness.HarnessError(
                f"allocator {self.name!r} measures the calibration loss, but this suite has no calibration data"
            )
        facts = list(factorizations)
        if not facts:
            return []
        scored = []
        for rank in candidates(facts, options.ranks):
            assignment = [rank] * len(facts)
            if not target.fits(facts, assignment, ctx.dtype_bytes):
                continue
            loss = float(ctx.calibration_loss(assignment))
            ctx.log(f"{self.name}: rank {rank}: calibration loss {loss:.6g}")
            scored.append((loss, rank))
        if not scored:
            raise harness.HarnessError(
                f"allocator {self.name!r}, target {target.label}: no candidate rank meets the target"
            )
        loss, rank = min(scored)
        measured = sorted(r for _, r in scored)
        ctx.log(f"{self.name}: chose rank {rank} (loss {loss:.6g}) of {measured}")
        return [rank] * len(facts)
