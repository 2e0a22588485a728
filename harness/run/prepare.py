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
from harness.errors import first_line
from harness.files import cache_dir
from harness.models import LoadedModel
from harness.provenance import seed_everything
from harness.run import calibration
from harness.run.blocks import move_tensors
from harness.run.blockwise import BlockFactorizer
from harness.run.env import RunEnv, log
from harness.run.factors import factorize_group, keep
from harness.run.identity import calibration_identity
from harness.run.memory import out_of_memory_as
from harness.surgery import replaced

if TYPE_CHECKING:
    from harness.factorization import Factorization
    from harness.run.cells import Cell
    from harness.suite import Method


class Prepared:
    """One model's calibration data and statistics, and its methods' factorizations, for one calibration
    draw: ``env.suite.draw`` (``Suite.for_draw``) picks the windows' seed and keys the cached statistics;
    a session makes a new one per draw and lets go of the last."""

    def __init__(self, env: RunEnv, loaded: LoadedModel, layers: list[LayerInfo]) -> None:
        self.env = env
        self.loaded = loaded
        self.layers = layers
        self._batches: torch.Tensor | None = None
        self.blocks = BlockFactorizer(env, loaded, layers, self.batches, self.calibration_oom, self.calibration_loss)

    def batches(self) -> torch.Tensor:
        if self._batches is None:
            config = self.env.suite.calibration
            text = data_mod.text_source(config.source, "calibration")
            self._batches = data_mod.calibration_batches(
                self.loaded.tokenizer, text, config.samples, config.seqlen, self.env.suite.calibration_seed
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
            return self.blocks.factorize(method)
        suite = self.env.suite
        if decomposer.needs and suite.calibration.inputs == "propagated":
            log(
                f"calibration: {method.label} needs {', '.join(sorted(decomposer.needs))}: the whole-model pass on "
                f"original inputs (calibration.inputs = 'propagated' applies to forward statistics only)"
            )
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
    def expect(self, methods: Sequence[Method], cells: Sequence[Cell] = ()) -> None:
        """The methods the session will ask ``factorize`` for (and, for propagated inputs, the cells it will
        ask ``factorize_cell`` for): the pipeline's one pass serves them all."""
        self.blocks.expect(methods, cells)

    def propagated(self, method: Method) -> bool:
        """True where ``method``'s cells each have their own factorizations (``calibration.inputs =
        "propagated"`` and the pipeline serves the method): the session asks ``factorize_cell``."""
        return self.blocks.propagated(method)

    def factorize_cell(self, cell: Cell) -> tuple[list[Factorization], float]:
        """The factorizations of one cell of a ``propagated`` method and the seconds they took."""
        return self.blocks.factorize_cell(cell)

    def release(self, method: Method, cell: Cell | None = None) -> None:
        """Its cells are computed: drop what the pipeline keeps of ``method`` (or of ``cell``)."""
        self.blocks.release(method, cell)

    def blockwise(self, decomposer) -> bool:
        """True where ``decomposer`` is served by the pipeline: forward statistics only, under 'blocks'."""
        return self.blocks.serves(set(decomposer.needs))

    def served_blockwise(self, needs: set[str]) -> bool:
        """True where a method needing ``needs`` is served by the pipeline (it needs no whole-model statistics)."""
        return self.blocks.serves(needs)

    def calibration_loss(self, factorizations: Sequence[Factorization]) -> Callable[[Sequence[int | None]], float]:
        """Loss on the first ``calibration.loss_samples`` windows with an assignment of ranks applied."""
        suite = self.env.suite

        device = torch.device(self.env.device)

        def loss(assignment: Sequence[int | None]) -> float:
            # on the device: factors a block pass left on the host (a no-op for a cell's, already there)
            replacements = {n: move_tensors(r, device) for n, r in materialize(factorizations, assignment).items()}
            with replaced(self.loaded.model, replacements, suite.surgery.mode == "dense"):
                return lm_loss(self.loaded.model, self.batches()[: suite.calibration.loss_samples], self.env.device)

        return loss


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
