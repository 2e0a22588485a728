"""The layer-sequential pipeline's side of a session: one pass
(``harness.run.pipeline.run_blocks``) factorizing every method that needs only
forward statistics, its factorizations kept for the session's later calls
until ``release``.

With ``calibration.inputs = "propagated"`` the pass is ``run_propagated``: one
job, and one activation stream, per pending cell of those methods (method,
allocator, target), each compressing every block at the cell's reference
ranks (its allocator run on the block's groups alone, ``allocate.block_target``)
before the block's outputs pass on; the session asks ``factorize_cell``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from harness.api import FactorizeContext, LayerInfo, RefineContext
from harness.errors import HarnessError
from harness.factorization import StoredLowRank
from harness.provenance import seed_everything
from harness.run import blocks, calibration, diskfactors, pipeline, propagated
from harness.run.env import RunEnv, log
from harness.run.factors import factorize_group, keep
from harness.run.memory import out_of_memory_as

if TYPE_CHECKING:
    from harness.factorfiles import MethodFiles
    from harness.factorization import Factorization
    from harness.models import LoadedModel
    from harness.run.cells import Cell
    from harness.suite import Component, Method

Loss = Callable[[Sequence["Factorization"]], Callable[[Sequence[int | None]], float]]


class BlockFactorizer:
    def __init__(
        self,
        env: RunEnv,
        loaded: LoadedModel,
        layers: list[LayerInfo],
        batches: Callable[[], torch.Tensor],
        calibration_oom: Callable[[set[str], BaseException], str],
        calibration_loss: Loss | None = None,
    ) -> None:
        self.env = env
        self.loaded = loaded
        self.layers = layers
        self.batches = batches
        self.calibration_oom = calibration_oom
        self.calibration_loss = calibration_loss
        """``Prepared.calibration_loss``: scores reference ranks for allocators that use a calibration loss."""
        self._expected: list[Method] | None = None
        self._expected_cells: list[Cell] = []
        self._plan: blocks.BlockPlan | str | None = None
        self._jobs: dict[str, pipeline.Job] = {}
        """Original inputs: each method's finished job (its factorizations), by method label, until ``release``."""
        self._streams: dict[str, pipeline.Job] = {}
        """Propagated inputs: each cell's finished job, by cell id, until ``release``."""
        self._released: set[str] = set()
        self.tracker: pipeline.LiveStats | None = None
        """Tests and benchmarks: counts the pipeline's statistics alive (``harness.run.pipeline.LiveStats``)."""

    def expect(self, methods: Sequence[Method], cells: Sequence[Cell] = ()) -> None:
        """The methods (propagated inputs: the cells) the session will ask for: one pass serves them all."""
        self._expected = list(methods)
        self._expected_cells = list(cells)

    def block_plan(self) -> blocks.BlockPlan | None:
        """The model's blocks for the pipeline; None (logged once) where it cannot find them."""
        if self._plan is None:
            self._plan = blocks.block_plan(self.loaded.model, self.layers)
            if isinstance(self._plan, str):
                log(f"calibration: pipeline 'blocks' unsupported for this model ({self._plan}); using 'whole'")
        return None if isinstance(self._plan, str) else self._plan

    def serves(self, needs: set[str]) -> bool:
        """True where a method needing ``needs`` is served by the pipeline (it needs no whole-model statistics)."""
        config = self.env.suite.calibration
        if config.pipeline != "blocks" or not needs or not needs <= calibration.FORWARD_KINDS:
            return False
        plan = self.block_plan()
        if plan is None and config.inputs == "propagated":
            raise HarnessError(
                f"{self.env.suite.file}: calibration.inputs: expected 'original' for {self.loaded.model_id} "
                f"('propagated' needs the layer-sequential pipeline, which cannot run this model: {self._plan}), "
                f"got 'propagated'"
            )
        return plan is not None

    def propagated(self, method: Method) -> bool:
        """True where ``method``'s cells each get their own factorizations (``factorize_cell``)."""
        needs = set(self.env.plugins.get("decomposer", method.name).needs)
        return self.env.suite.calibration.inputs == "propagated" and self.serves(needs)

    def factorize(self, method: Method) -> tuple[list[Factorization], float]:
        if self.env.suite.calibration.inputs == "propagated":  # the sequential session asks factorize_cell
            raise HarnessError(
                f"{self.env.suite.file}: calibration.inputs: expected 'original' where one method's factorizations "
                f"serve all its cells (--executor ray), got 'propagated' (each cell of {method.label} has its own)"
            )
        if method.label not in self._jobs:
            candidates = self._expected or []  # without ``expect``: the asked method alone (Ray's tasks ask one each)
            todo = [m for m in candidates if m.label not in self._jobs and m.label not in self._released]
            todo = [m for m in todo if m.label != method.label]
            todo = [method, *(m for m in todo if self.serves(set(self.env.plugins.get("decomposer", m.name).needs)))]
            self.run(todo)
        return self._result(self._jobs[method.label])

    def factorize_cell(self, cell: Cell) -> tuple[list[Factorization], float]:
        """The factorizations of ``cell`` on propagated inputs; the first call runs the pass for every expected
        cell not yet released (``expect``)."""
        if cell.id not in self._streams:
            todo = [c for c in self._expected_cells if c.id not in self._streams and c.id not in self._released]
            todo = [cell, *(c for c in todo if c.id != cell.id and self.propagated(c.method))]
            self.run_streams(todo)
        return self._result(self._streams[cell.id])

    def release(self, method: Method, cell: Cell | None = None) -> None:
        """Drop the factorizations of ``method`` (propagated inputs: of ``cell``) once its cells are computed,
        so that only those still waiting stay alive; a later ask runs the pass again."""
        key = method.label if cell is None else cell.id
        (self._jobs if cell is None else self._streams).pop(key, None)
        self._released.add(key)

    def _result(self, job: pipeline.Job) -> tuple[list[Factorization], float]:
        if job.error is not None:
            raise job.error
        pipeline._set_rng_state(job.rng)  # the random state factorizing the method alone leaves
        device = torch.device(self.env.device)
        factorizations = job.factorizations
        if device.type != "cpu":  # back to the device: those the pass offloaded (not the compacted ones)
            factorizations = [on_device(f, device) for f in factorizations]
        return factorizations, job.seconds

    def job(
        self, method: Method, label: str, targets, allocators: Sequence[Component], files: MethodFiles | None = None
    ) -> pipeline.Job:
        """``method``'s part of a pass, its factors kept for ``targets`` x ``allocators`` (``factors.keep``);
        with ``files``, each group written as soon as it is factorized and its memory-mapped copy kept."""
        suite, model = self.env.suite, self.loaded.model
        host = torch.device("cpu")
        offload = torch.device(self.env.device).type != "cpu"
        decomposer = self.env.plugins.get("decomposer", method.name)
        ctx = FactorizeContext(seed=suite.seed, device=self.env.device, log=log)
        plugins = [self.env.plugins.get("allocator", a.name) for a in allocators]

        def factorize(group, stats):
            raw = factorize_group(decomposer, model, group, stats, method.options, ctx)
            fact = keep(raw, targets, plugins, suite.factorization.storage_dtype)
            if files is not None:
                fact = diskfactors.put(files, fact)
            # a compacted factorization is on the host already and brings its factors to the device itself
            return blocks.move_tensors(fact, host) if offload and fact is raw else fact

        groups = decomposer.groups(self.layers, method.options)
        needs = frozenset(decomposer.needs_for(method.options)) & frozenset(decomposer.needs)
        job = pipeline.Job(label, needs, groups, factorize, method=method.label)
        job.sequential = suite.calibration.inputs == "propagated" and decomposer.sequential_within_block(method.options)
        if decomposer.refines(method.options):  # propagated inputs only (harness.suite refuses it elsewhere)

            def refine(block, replacements, inputs, targets, forward, swapped):
                rctx = RefineContext(seed=suite.seed, device=self.env.device, forward=forward, swapped=swapped, log=log)
                return decomposer.refine_block(block, replacements, inputs, targets, method.options, rctx)

            job.refine = refine
        return job

    def run(self, methods: Sequence[Method]) -> None:
        """One layer-sequential pass factorizing every method of ``methods``; each one's result in ``_jobs``."""
        jobs = [self.job(method, method.label, method.targets, method.allocators) for method in methods]
        needs = set().union(*(job.needs for job in jobs))
        labels = ", ".join(job.label for job in jobs)
        log(f"calibration: {', '.join(sorted(needs))} block by block for {labels}")
        self._pass(pipeline.run_blocks, jobs, f"calibration (blocks), factorize {labels}")
        self._jobs.update({job.label: job for job in jobs})

    def run_streams(self, cells: Sequence[Cell]) -> None:
        """One pass on propagated inputs: a job and an activation stream per cell; each one's result in
        ``_streams``. The pass's forward cost and its captured activations grow with the number of cells."""
        jobs, files = [], []
        for cell in cells:
            files.append(diskfactors.cell_files(self.env, self.loaded.fingerprint, cell))
            if files[-1] is not None:
                files[-1].reset()
            # a refining cell's groups are written once refined (``store`` below), not as they are factorized
            refines = self.env.plugins.get("decomposer", cell.method.name).refines(cell.method.options)
            job = self.job(cell.method, cell.label, [cell.target], [cell.allocator], None if refines else files[-1])
            job.reference = self.reference(cell, job)
            jobs.append(job)
        needs = set().union(*(job.needs for job in jobs))
        config, n = self.env.suite.calibration, len(jobs)
        log(
            f"calibration: propagated inputs, {n} stream{'' if n == 1 else 's'}: {', '.join(sorted(needs))} "
            f"block by block for {', '.join(job.label for job in jobs)}; per block and stream a statistics "
            f"forward and a forward through the compressed block, each stream holding its own "
            f"{config.samples} x {config.seqlen} activations (up to {n}x those of original inputs)"
        )
        self._pass(propagated.run_propagated, jobs, f"calibration (blocks, propagated), {len(jobs)} streams")
        for job, where in zip(jobs, files, strict=True):
            if where is not None and job.error is None:  # the manifest: a rerun reuses the cell's files
                job.factorizations = diskfactors.store(where, job.factorizations, job.seconds)
        self._streams.update({cell.id: job for cell, job in zip(cells, jobs, strict=True)})

    def reference(self, cell: Cell, job: pipeline.Job) -> Callable:
        """The reference ranks of ``cell`` for a block's groups: its allocator on those groups alone, its target
        restricted to their share of the decomposable parameters (``allocate.block_target``)."""
        from harness.run.allocate import allocate_ranks, block_target, uses_data

        bound = cell.target.for_model(self.loaded.model, [layer.name for layer in self.layers])
        shapes = {layer.name: layer.shape for layer in self.layers}
        dense = [sum(shapes[n][0] * shapes[n][1] for n in group if n in shapes) for group in job.groups]
        total = sum(dense) or 1
        scored = uses_data(self.env, cell.method, cell.allocator) and self.calibration_loss is not None
        dtype_bytes = self.loaded.model.dtype.itemsize

        def ranks(job: pipeline.Job, indices: Sequence[int]) -> list[int | None]:
            facts = [job.factorizations[i] for i in indices]
            target = block_target(bound, sum(dense[i] for i in indices) / total)
            loss = self.reference_loss(job, indices) if scored else None
            return allocate_ranks(self.env, self.layers, cell.allocator, target, facts, loss, dtype_bytes)

        return ranks

    def reference_loss(self, job: pipeline.Job, indices: Sequence[int]) -> Callable[[Sequence[int | None]], float]:
        """Calibration loss of an assignment of the groups ``indices``, the groups of earlier blocks at their
        reference ranks (the whole model's loss, as a cell's allocator scores it)."""
        earlier = list(job.ranks)
        facts = [job.factorizations[i] for i in [*earlier, *indices]]
        fixed = [job.ranks[i] for i in earlier]
        loss = self.calibration_loss(facts)
        return lambda assignment: loss([*fixed, *assignment])

    def _pass(self, run: Callable, jobs: list[pipeline.Job], desc: str) -> None:
        suite = self.env.suite
        needs = set().union(*(job.needs for job in jobs))
        extra = {"dense": suite.surgery.mode == "dense"} if run is propagated.run_propagated else {}
        try:
            with out_of_memory_as(lambda exc: self.calibration_oom(needs, exc)):
                run(
                    self.loaded.model,
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
                    desc=desc,
                    **extra,
                )
        except HarnessError:
            raise
        except Exception as exc:  # the pass failed: so does every method it served, as a failed collection would
            for job in jobs:
                job.error = job.error or exc


def on_device(fact: Factorization, device: torch.device) -> Factorization:
    """``fact`` with its tensors on ``device``; a compacted one stays on the host (it moves what a cell needs)."""
    return fact if isinstance(fact, StoredLowRank) else blocks.move_tensors(fact, device)
