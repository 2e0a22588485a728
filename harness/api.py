"""The public API a plugin implements: components and the contexts they receive.

Each component has a ``name`` (what a suite writes), an ``Options`` frozen
dataclass (its declared options; unknown keys in a suite are rejected) and one
method that does the work. The core calls that method with the parsed options
and a context object; contexts may gain fields, never lose them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: importing the API must not load torch
    import torch

    from harness.factorization import Factorization, Replacement
    from harness.targets import Target


@dataclass(frozen=True)
class NoOptions:
    """For components that take no options."""


# ---------------------------------------------------------------- calibration
STAT_KINDS = (
    "gram",
    "abs_mean",
    "l2_seq",
    "out_cov",
    "out_mean",
    "fisher",
    "grad",
    "anchor_cross",
    "gram_original",
)
"""Calibration statistics a decomposer can declare in ``needs``:

- ``gram``: X^T X of the layer's inputs (n, n), float64, summed over tokens.
- ``abs_mean``: mean |x| per input channel (n,).
- ``l2_seq``: each calibration sequence's L2 norm per input channel (over its
  tokens), averaged over the sequences (n,), float64: BitStack's activation
  statistic, ``torch.norm(x, dim=1).mean(0)`` on (sequences, seqlen, n) inputs
  (``sequences`` holds their number).
- ``out_cov``: Y^T Y of the layer's outputs (m, m), float64, summed over tokens.
- ``out_mean``: mean output per row over the calibration tokens (m,), float64
  (with ``out_cov``, what a centred output covariance needs:
  ``out_cov / tokens - out_mean out_mean^T``).
- ``fisher``: empirical Fisher of the LM loss, sum of squared gradients of the
  weight, reduced per input channel (``fisher_in``, (n,)) and per output row
  (``fisher_out``, (m,)).
- ``grad``: the gradient of the calibration LM loss w.r.t. the weight, (m, n),
  float32: the mean over calibration windows of dL_s/dW, L_s the mean token
  loss of window s (first-order scores, e.g. dL/dsigma_i = u_i^T G T^-T v_i
  for a factorization of W T). m x n per layer: as large as the weights.
- ``anchor_cross``: X^T X' (n, n), float64, summed over tokens: the original
  model's inputs X against the inputs X' the layer receives under
  ``calibration.inputs = "propagated"`` (token by token, the same windows);
  under original inputs X' = X and it is the Gram (AA-SVD's anchor).
- ``gram_original``: X^T X of the layer's inputs in the *uncompressed* model
  (n, n), float64. Under ``[calibration] inputs = "propagated"``, ``gram`` is
  the Gram of the compressed model's inputs X' and this one that of the
  original X (one more activation stream, the uncompressed model's, per pass);
  under ``"original"`` the two are one thing and ``gram_original`` is
  ``gram``'s very tensor (SVD-LLM's update: whitening on X, left factor on X').
"""

GRADIENT_KINDS = frozenset({"fisher", "grad"})
"""The kinds that need the LM loss's backward through the whole model (not block-local, not offloadable)."""


@dataclass
class LayerStats:
    """Calibration statistics of one Linear layer (fields present per ``needs``), and its bias."""

    tokens: int = 0
    gram: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    sq_mean: torch.Tensor | None = None
    l2_seq: torch.Tensor | None = None
    sequences: int = 0
    """Calibration sequences behind ``l2_seq`` (0 where it was not collected)."""
    out_cov: torch.Tensor | None = None
    out_mean: torch.Tensor | None = None
    fisher_in: torch.Tensor | None = None
    fisher_out: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    anchor_cross: torch.Tensor | None = None
    gram_original: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    """The Linear's own bias (m,), None where it has none: not a statistic (no ``needs``), set by the core on
    every layer's statistics as it hands them to ``factorize``, so that a data-driven method can fit the
    whole output ``W x + b`` (the calibration outputs include b)."""


@dataclass(frozen=True)
class LayerInfo:
    """A decomposable Linear layer: dotted name, kind (e.g. ``q_proj``), layer index, shape."""

    name: str
    kind: str
    index: int | None
    shape: tuple[int, int]


@dataclass
class FactorizeContext:
    seed: int
    device: torch.device
    log: Callable[[str], None] = print


# ---------------------------------------------------------------- weight optimization after surgery
@dataclass
class SurgeryContext:
    """What ``Decomposer.after_surgery`` receives besides the model: where to compute, the suite's seed, the
    calibration batch size (``[calibration] batch_size``: the batch the planner counts a training step for)."""

    seed: int
    device: torch.device
    batch_size: int = 1
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


class AfterSurgery:
    """The optional per-cell step after surgery (a mixin of ``Decomposer``; default: nothing).

    One factorization serves every cell of a method, so a method that fine-tunes its compressed model (SVD-LLM's
    LoRA update) needs the cell: its layers replaced at their final ranks. Where ``tunes(options)`` is true the
    core calls ``after_surgery`` once per cell, after the replacements are in and before any evaluator, with
    the replacement modules' parameters trainable (``requires_grad``; every other parameter frozen), grad mode on
    and ``windows`` the suite's calibration windows (samples, seqlen) of token ids on the host. Changes live in
    the replacement modules only and last for that cell's evaluation: the next cell starts from the dense
    originals and fresh replacements. The returned dict (JSON-able: steps, losses, ...) is recorded in the cell's
    ``weight_optimization`` with the seconds it took; the planner counts a training step's memory for such cells.
    """

    def tunes(self, options: Any) -> bool:
        """Whether ``after_surgery`` changes weights under ``options`` (known before any cell runs)."""
        return False

    def after_surgery(
        self,
        model: torch.nn.Module,
        replaced_names: Sequence[str],
        windows: torch.Tensor,
        options: Any,
        ctx: SurgeryContext,
    ) -> dict[str, Any] | None:
        """Optimize the replaced layers ``replaced_names`` of ``model`` in place; a summary for the record."""
        return None


# ---------------------------------------------------------------- decomposers
class Decomposer(AfterSurgery):
    """Turns a group of weights (+ calibration statistics) into a Factorization.

    Subclasses set ``name``, ``needs`` (a subset of ``STAT_KINDS``) and
    ``Options``, and implement ``factorize``. Methods that decompose several
    matrices jointly override ``groups``. A method that fine-tunes each cell's
    compressed model overrides ``tunes`` and ``after_surgery`` (``AfterSurgery``).
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""

    def needs_for(self, options: Any) -> frozenset[str]:
        """The part of ``needs`` a method with ``options`` uses (default: all of it). The layer-sequential
        pass collects only these, so that a costly kind (``gram_original`` under propagated inputs: one
        more activation stream) is paid for only by the options that read it; ``needs`` stays the bound."""
        return frozenset(self.needs)

    def groups(self, layers: Sequence[LayerInfo], options: Any) -> list[tuple[str, ...]]:
        """Partition the layers into groups decomposed jointly (default: one each)."""
        return [(layer.name,) for layer in layers]

    def sequential_within_block(self, options: Any) -> bool:
        """True where, under ``[calibration] inputs = "propagated"``, a block's statistics are collected stage
        by stage (default: False, one forward through the uncompressed block): each stage's layers (those
        that share one input: q/k/v, o, gate/up, down) see the block's earlier stages compressed at the
        cell's reference ranks, as GPTQ's and AA-SVD's code compress a block's modules in order. Cells record
        ``"within_block": "sequential"`` in their calibration settings (so in their id); no effect under
        original inputs."""
        return False

    def factorize(
        self,
        weights: dict[str, torch.Tensor],
        stats: dict[str, LayerStats],
        options: Any,
        ctx: FactorizeContext,
    ) -> Factorization:
        raise NotImplementedError

    # ---------------------------------------------------------------- block refinement (weight optimization)
    def refines(self, options: Any) -> bool:
        """True where ``refine_block`` trains a block's factors under ``options`` (default: never). The core
        asks ahead: such a method's cells need ``[calibration] inputs = "propagated"`` and an allocator whose
        ranks are the reference ranks (``uniform`` with a per-matrix target), keep the original model's
        activations for the targets, are planned with the training's memory, and record
        ``"weight_optimization": true``."""
        return False

    def refine_block(
        self,
        block: torch.nn.Module,
        replacements: dict[str, Replacement],
        inputs: Sequence[Any],
        targets: Sequence[torch.Tensor],
        options: Any,
        ctx: RefineContext,
    ) -> dict[str, Replacement]:
        """The block's ``replacements`` after training them (default: as they are). Called under propagated
        inputs once a decoder block's groups are materialized at the cell's reference ranks, before the block's
        outputs pass on: ``inputs`` are the block's batches through the compressed earlier blocks (X'), for
        ``ctx.forward``; ``targets`` the uncompressed block's outputs on the original model's batches (one
        tensor per batch, in order). Return ``harness.LowRank`` replacements for the same names, at the same
        ranks: they become the cell's factorizations of those groups, fixed at that rank (what the cell
        evaluates and what the next block's inputs pass through). Gradients are enabled; the block's own
        parameters do not require them and are not replaced (only target layers are)."""
        return replacements


@dataclass
class RefineContext:
    """What ``Decomposer.refine_block`` receives besides the block and its data."""

    seed: int
    device: torch.device
    forward: Callable[[Any], torch.Tensor]
    """``forward(batch)``: the block's output hidden states on one of ``inputs``, as the block now is (inside
    ``swapped``: with the replacements in place; gradients flow to their parameters)."""
    swapped: Callable[[dict[str, Replacement]], AbstractContextManager[dict[str, torch.nn.Module]]]
    """``with ctx.swapped(replacements) as modules``: the replacements in the block (factored, whatever
    ``surgery.mode``), ``modules`` the layers swapped in by name (``harness.FactoredLinear`` for a
    ``LowRank``: train its ``A`` and ``B``, parameters built on copies of the factors); originals back on exit."""
    log: Callable[[str], None] = print


class SingleMatrixDecomposer(Decomposer):
    """A Decomposer of one weight matrix at a time (the default ``groups``).

    Implement ``factorize_matrix`` instead of ``factorize``: it receives the
    layer's name, its weight already on ``ctx.device`` (in the model's dtype,
    the dtype factors should come back in) and its ``LayerStats`` (None where
    the layer has none).
    """

    def factorize(self, weights, stats, options, ctx) -> Factorization:  # Decomposer.factorize's signature
        ((name, weight),) = weights.items()
        return self.factorize_matrix(name, weight.to(ctx.device), stats.get(name), options, ctx)

    def factorize_matrix(
        self,
        name: str,
        weight: torch.Tensor,
        stats: LayerStats | None,
        options: Any,
        ctx: FactorizeContext,
    ) -> Factorization:
        raise NotImplementedError


# ---------------------------------------------------------------- allocation
@dataclass
class AllocationContext:
    seed: int
    layers: dict[str, LayerInfo]
    calibration_loss: Callable[[Sequence[int | None]], float] | None = None
    """Loss on calibration data with ``assignment`` (one rank or None per group) applied.
    None where the suite has no calibration data."""
    dtype_bytes: int = 2
    """Bytes per stored value in the model (for ``bytes`` and ``bits`` targets)."""
    log: Callable[[str], None] = print


class RankAllocator:
    """Chooses a rank per group (or None: keep that group dense) to meet a Target."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    target_kinds: ClassVar[tuple[str, ...] | None] = None
    """The target kinds ``allocate`` takes; None (the default): every registered kind (``harness.Target``
    subclasses), since an allocator that asks the target for its cost and budget needs no kind of its own."""
    uses_calibration: ClassVar[bool] = False
    """True where ``allocate`` calls ``ctx.calibration_loss`` (then calibration data is loaded)."""
    saving_ranks_only: ClassVar[bool] = False
    """True where every rank ``allocate`` returns, or has ``ctx.calibration_loss`` materialize, saves
    parameters (``harness.saves``) or is the target's own ``Target.per_matrix`` rank: factorizations are
    then kept only up to those ranks (``Factorization.compact``). False (the default): kept at full rank."""
    description: ClassVar[str] = ""

    def takes(self, kind: str) -> bool:
        """Whether ``allocate`` takes targets of ``kind``."""
        return self.target_kinds is None or kind in self.target_kinds

    def allocate(
        self,
        factorizations: Sequence[Factorization],
        target: Target,
        options: Any,
        ctx: AllocationContext,
    ) -> list[int | None]:
        raise NotImplementedError


# ---------------------------------------------------------------- evaluation
@dataclass
class RunContext:
    """What evaluators and profilers receive besides the model."""

    seed: int
    device: torch.device
    model_id: str
    limit: int | None = None
    """--limit from the command line: caps examples per task where it applies."""
    work_dir: Path | None = None
    """A per-cell directory for partial progress; kept until the cell is done."""
    dense_params: int = 0
    """Parameters of the uncompressed decomposable weights (for kept fractions)."""
    decomposable: Sequence[str] = ()
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Metrics (name -> number; higher or lower is better per ``higher_is_better``)
    and ``info`` (data, split, example counts, ...) recorded as provenance."""

    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)


class Evaluator:
    """Measures a model (compressed or not): model -> metrics.

    Subclasses set ``name`` and ``Options`` and implement ``evaluate``; those
    that read a dataset implement ``data_fingerprint`` too.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""

    def data_fingerprint(self, options: Any) -> dict[str, Any] | None:
        """What identifies the data ``evaluate`` reads with ``options``, or None (nothing to fingerprint).

        A JSON-able dict, e.g. ``{task: sha256 of its data file}``. It is
        hashed into the id of every cell the evaluator runs in (so changed
        data means new cells, not stale reuse) and recorded in each result's
        provenance. Called before any model is loaded, for every model of a
        suite run: keep it cheap and deterministic (cache file hashes). The
        default returns None: the cell ids then depend on the options only.
        """
        return None

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, options: Any, ctx: RunContext) -> EvalResult:
        """Metrics of ``model`` (already on ``ctx.device``, in eval mode) with the parsed ``options``."""
        raise NotImplementedError


class Profiler:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""
    hardware_bound: ClassVar[bool] = False
    """True where the numbers depend on the machine (latency, memory)."""

    def profile(self, model: torch.nn.Module, tokenizer: Any, options: Any, ctx: RunContext) -> EvalResult:
        raise NotImplementedError


# ---------------------------------------------------------------- tracking
class Tracker:
    """Receives the suite's results besides the results store (e.g. MLflow).

    The registered instance is the tracker, shared by every suite run of the
    process that names it. In each run the runner calls ``start`` once (with
    the suite's options for this tracker), ``log_cell`` after each computed
    cell (reused cells are not logged again) and ``end`` once, in a
    ``finally``, also when the run failed (``interrupted`` instead where
    SIGINT or SIGTERM stopped it). An exception from any of them
    costs no result: the runner warns once, calls that tracker no more in this
    run, and the results stay in the local store.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""

    def start(self, suite: Any, options: Any, results_dir: Path) -> None:
        """A run of ``suite`` (``harness.Suite``) begins; reset any state of an earlier run here."""

    def log_cell(self, cell: Any, result: Any, cell_file: Path) -> None:
        """A computed ``cell`` (``harness.Cell``) finished: ``result`` is its ``harness.CellRecord``,
        saved at ``cell_file``."""

    def end(self, suite: Any, results: list[Any], results_dir: Path) -> None:
        """The run ends: ``results`` holds every cell's ``harness.CellRecord``, reused ones included;
        the leaderboard and report files are in ``results_dir``."""

    def interrupted(self, suite: Any, results: list[Any], results_dir: Path, signal: str) -> None:
        """Called instead of ``end`` when the run was stopped by SIGINT or SIGTERM (``signal``: its name);
        ``results`` holds the cells finished so far. Default: ``end``. MLflow ends its runs as KILLED."""
        self.end(suite, results, results_dir)

    def catch_up_hint(self, results_dir: Path) -> str:
        """How a user logs later what this tracker missed after it failed (e.g. a command), or ''.
        The runner appends it to its one-line warning."""
        return ""
