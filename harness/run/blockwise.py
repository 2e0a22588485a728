"""The layer-sequential pipeline's side of a session: one pass
(``harness.run.pipeline.run_blocks``) factorizing every method that needs only
forward statistics, its factorizations kept for the session's later calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from harness.api import FactorizeContext, LayerInfo
from harness.errors import HarnessError
from harness.factorization import StoredLowRank
from harness.provenance import seed_everything
from harness.run import blocks, calibration, pipeline
from harness.run.env import RunEnv, log
from harness.run.factors import factorize_group, keep
from harness.run.memory import out_of_memory_as

if TYPE_CHECKING:
    from harness.factorization import Factorization
    from harness.models import LoadedModel
    from harness.suite import Method


class BlockFactorizer:
    def __init__(
        self,
        env: RunEnv,
        loaded: LoadedModel,
        layers: list[LayerInfo],
        batches: Callable[[], torch.Tensor],
        calibration_oom: Callable[[set[str], BaseException], str],
    ) -> None:
        self.env = env
        self.loaded = loaded
        self.layers = layers
        self.batches = batches
        self.calibration_oom = calibration_oom
        self._expected: list[Method] | None = None
        self._plan: blocks.BlockPlan | str | None = None
        self._jobs: dict[str, pipeline.Job] = {}
        self.tracker: pipeline.LiveStats | None = None
        """Tests and benchmarks: counts the pipeline's statistics alive (``harness.run.pipeline.LiveStats``)."""

    def expect(self, methods: Sequence[Method]) -> None:
        """The methods the session will ask ``factorize`` for: the pipeline's one pass serves them all."""
        self._expected = list(methods)

    def block_plan(self) -> blocks.BlockPlan | None:
        """The model's blocks for the pipeline; None (logged once) where it cannot find them."""
        if self._plan is None:
            self._plan = blocks.block_plan(self.loaded.model, self.layers)
            if isinstance(self._plan, str):
                log(f"calibration: pipeline 'blocks' unsupported for this model ({self._plan}); using 'whole'")
        return None if isinstance(self._plan, str) else self._plan

    def serves(self, needs: set[str]) -> bool:
        """True where a method needing ``needs`` is served by the pipeline (it needs no whole-model statistics)."""
        if self.env.suite.calibration.pipeline != "blocks" or not needs or not needs <= calibration.FORWARD_KINDS:
            return False
        return self.block_plan() is not None

    def factorize(self, method: Method) -> tuple[list[Factorization], float]:
        if method.label not in self._jobs:
            candidates = self._expected or []  # without ``expect``: the asked method alone (Ray's tasks ask one each)
            todo = [m for m in candidates if m.label not in self._jobs and m.label != method.label]
            todo = [method, *(m for m in todo if self.serves(set(self.env.plugins.get("decomposer", m.name).needs)))]
            self.run(todo)
        job = self._jobs[method.label]
        if job.error is not None:
            raise job.error
        pipeline._set_rng_state(job.rng)  # the random state factorizing the method alone leaves
        device = torch.device(self.env.device)
        factorizations = job.factorizations
        if device.type != "cpu":  # back to the device: those the pass offloaded (not the compacted ones)
            factorizations = [on_device(f, device) for f in factorizations]
        return factorizations, job.seconds

    def run(self, methods: Sequence[Method]) -> None:
        """One layer-sequential pass factorizing every method of ``methods``; each one's result in ``_jobs``."""
        suite, model = self.env.suite, self.loaded.model
        host = torch.device("cpu")
        offload = torch.device(self.env.device).type != "cpu"
        jobs = []
        for method in methods:
            decomposer = self.env.plugins.get("decomposer", method.name)
            ctx = FactorizeContext(seed=suite.seed, device=self.env.device, log=log)

            allocators = [self.env.plugins.get("allocator", a.name) for a in method.allocators]

            def factorize(group, stats, decomposer=decomposer, method=method, ctx=ctx, allocators=allocators):
                raw = factorize_group(decomposer, model, group, stats, method.options, ctx)
                fact = keep(raw, method.targets, allocators, suite.factorization.storage_dtype)
                # a compacted factorization is on the host already and brings its factors to the device itself
                return blocks.move_tensors(fact, host) if offload and fact is raw else fact

            groups = decomposer.groups(self.layers, method.options)
            jobs.append(pipeline.Job(method.label, frozenset(decomposer.needs), groups, factorize))
        needs = set().union(*(job.needs for job in jobs))
        labels = ", ".join(job.label for job in jobs)
        log(f"calibration: {', '.join(sorted(needs))} block by block for {labels}")
        try:
            with out_of_memory_as(lambda exc: self.calibration_oom(needs, exc)):
                pipeline.run_blocks(
                    model,
                    self.layers,
                    self.batches(),
                    jobs,
                    device=self.env.device,
                    batch_size=suite.calibration.batch_size,
                    seed=lambda: seed_everything(suite.seed),
                    plan=self.block_plan(),
                    progress=self.env.options.progress,
                    log=log,
                    tracker=self.tracker,
                    desc=f"calibration (blocks), factorize {labels}",
                )
        except HarnessError:
            raise
        except Exception as exc:  # the pass failed: so does every method it served, as a failed collection would
            for job in jobs:
                job.error = job.error or exc
        self._jobs.update({job.label: job for job in jobs})


def on_device(fact: Factorization, device: torch.device) -> Factorization:
    """``fact`` with its tensors on ``device``; a compacted one stays on the host (it moves what a cell needs)."""
    return fact if isinstance(fact, StoredLowRank) else blocks.move_tensors(fact, device)
