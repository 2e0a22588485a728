"""What a model computes once for all its cells: calibration batches and statistics
(cached on disk), and each method's factorization of every group."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from harness import data as data_mod
from harness.api import FactorizeContext, LayerInfo
from harness.errors import HarnessError, first_line
from harness.factorization import StoredLowRank
from harness.files import cache_dir
from harness.models import LoadedModel
from harness.provenance import seed_everything
from harness.run import blocks, calibration, pipeline
from harness.run.env import RunEnv, log
from harness.run.factors import keep
from harness.run.identity import calibration_identity
from harness.run.memory import out_of_memory_as
from harness.surgery import replaced, weights_of

if TYPE_CHECKING:
    from harness.factorization import Factorization
    from harness.suite import Method


class Prepared:
    """One model's calibration data and statistics, and its methods' factorizations."""

    def __init__(self, env: RunEnv, loaded: LoadedModel, layers: list[LayerInfo]) -> None:
        self.env = env
        self.loaded = loaded
        self.layers = layers
        self._batches: torch.Tensor | None = None
        self._expected: list[Method] | None = None
        self._plan: blocks.BlockPlan | str | None = None
        self._jobs: dict[str, pipeline.Job] = {}
        self.tracker: pipeline.LiveStats | None = None
        """Tests and benchmarks: counts the pipeline's statistics alive (``harness.run.pipeline.LiveStats``)."""

    def batches(self) -> torch.Tensor:
        if self._batches is None:
            config = self.env.suite.calibration
            text = data_mod.text_source(config.source, "calibration")
            self._batches = data_mod.calibration_batches(
                self.loaded.tokenizer, text, config.samples, config.seqlen, self.env.suite.seed
            )
        return self._batches

    def stats(self, needs: set[str]) -> dict:
        suite, options = self.env.suite, self.env.options
        key = {
            "model": self.loaded.fingerprint,
            "calibration": calibration_identity(suite),
            "dtype": suite.dtype,
            "seed": suite.seed,
        }
        with out_of_memory_as(lambda exc: self.calibration_oom(needs, exc)):
            return calibration.load_or_collect(
                self.loaded.model,
                self.layers,
                self.batches(),
                needs,
                key=key,
                cache_dir=options.calibration_cache or cache_dir() / "calibration",
                device=self.env.device,
                batch_size=suite.calibration.batch_size,
                progress=options.progress,
                log=log,
            )

    def calibration_oom(self, needs: set[str], exc: BaseException) -> str:
        config, file = self.env.suite.calibration, self.env.suite.file
        return (
            f"calibration ({', '.join(sorted(needs))}) ran out of memory on {self.env.device}: "
            f"lower calibration.batch_size (now {config.batch_size}), calibration.samples ({config.samples}) "
            f"or calibration.seqlen ({config.seqlen}) in {file} [{first_line(exc)}]"
        )

    def factorize(self, method: Method) -> tuple[list[Factorization], float]:
        """Every group's factorization under ``method`` and the seconds it took (statistics not counted).

        With ``calibration.pipeline = "blocks"``, a method that needs forward
        statistics is served by the layer-sequential pass (``harness.run.pipeline``),
        run once for every such method the session expects (``expect``; else for
        ``method`` alone), which keeps their factorizations for the later calls.
        """
        decomposer = self.env.plugins.get("decomposer", method.name)
        if self.blockwise(decomposer):
            return self.factorize_blocks(method)
        suite = self.env.suite
        stats = self.stats(set(decomposer.needs)) if decomposer.needs else {}
        groups = decomposer.groups(self.layers, method.options)
        allocators = [self.env.plugins.get("allocator", a.name) for a in method.allocators]
        ctx = FactorizeContext(seed=suite.seed, device=self.env.device, log=log)
        seed_everything(suite.seed)
        started = time.perf_counter()
        factorizations = []

        def raw(group: Sequence[str]) -> Factorization:
            return factorize_group(decomposer, self.loaded.model, group, stats, method.options, ctx)

        for group in tqdm(groups, desc=f"factorize {method.label}", disable=not self.env.options.progress):
            # only the ranks this method's cells can choose, in host memory (brought to the device per cell)
            factorizations.append(keep(raw(group), method.targets, allocators, suite.factorization.storage_dtype))
        return factorizations, time.perf_counter() - started

    # ------------------------------------------------------------ the layer-sequential pipeline
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

    def blockwise(self, decomposer) -> bool:
        """True where ``decomposer`` is served by the pipeline: forward statistics only, under 'blocks'."""
        return self.served_blockwise(set(decomposer.needs))

    def served_blockwise(self, needs: set[str]) -> bool:
        """True where a method needing ``needs`` is served by the pipeline (it needs no whole-model statistics)."""
        if self.env.suite.calibration.pipeline != "blocks" or not needs or not needs <= calibration.FORWARD_KINDS:
            return False
        return self.block_plan() is not None

    def factorize_blocks(self, method: Method) -> tuple[list[Factorization], float]:
        if method.label not in self._jobs:
            candidates = self._expected or []  # without ``expect``: the asked method alone (Ray's tasks ask one each)
            todo = [m for m in candidates if m.label not in self._jobs and m.label != method.label]
            todo = [method, *(m for m in todo if self.blockwise(self.env.plugins.get("decomposer", m.name)))]
            self.run_blocks(todo)
        job = self._jobs[method.label]
        if job.error is not None:
            raise job.error
        pipeline._set_rng_state(job.rng)  # the random state factorizing the method alone leaves
        device = torch.device(self.env.device)
        factorizations = job.factorizations
        if device.type != "cpu":  # back to the device: those the pass offloaded (not the compacted ones)
            factorizations = [
                f if isinstance(f, StoredLowRank) else blocks.move_tensors(f, device) for f in factorizations
            ]
        return factorizations, job.seconds

    def run_blocks(self, methods: Sequence[Method]) -> None:
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

    def calibration_loss(self, factorizations: Sequence[Factorization]) -> Callable[[Sequence[int | None]], float]:
        """Loss on the first ``calibration.loss_samples`` windows with an assignment of ranks applied."""
        suite = self.env.suite

        def loss(assignment: Sequence[int | None]) -> float:
            replacements = materialize(factorizations, assignment)
            with replaced(self.loaded.model, replacements, suite.surgery.mode == "dense"):
                return lm_loss(self.loaded.model, self.batches()[: suite.calibration.loss_samples], self.env.device)

        return loss


def factorize_group(decomposer, model: torch.nn.Module, group, stats: dict, options, ctx: FactorizeContext):
    """One group's factorization from the model's weights and the members' statistics (both paths)."""
    weights = weights_of(model, group)
    group_stats = {name: stats[name] for name in group if name in stats}
    return decomposer.factorize(weights, group_stats, options, ctx)


def on_device(fact: Factorization, device: torch.device) -> Factorization:
    """``fact`` with its tensors on ``device``; a compacted one stays on the host (it moves what a cell needs)."""
    return fact if isinstance(fact, StoredLowRank) else blocks.move_tensors(fact, device)


def materialize(factorizations: Sequence[Factorization], assignment: Sequence[int | None]) -> dict:
    replacements = {}
    for fact, rank in zip(factorizations, assignment, strict=True):
        if rank is not None:
            replacements.update(fact.materialize(rank))
    return replacements


@torch.no_grad()
def lm_loss(model: torch.nn.Module, batches: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss over ``batches`` (samples, seqlen)."""
    losses = [model(input_ids=row[None].to(device), labels=row[None].to(device)).loss.item() for row in batches]
    return sum(losses) / len(losses)
