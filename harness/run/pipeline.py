"""Layer-sequential calibration and factorization: one decoder block at a time.

``[calibration] pipeline = "blocks"`` (issue 16 point 1; ``original`` inputs by default)
replaces "collect every layer's statistics for the whole model, then factorize"
by one pass through the model's decoder blocks:

1. **Capture** the inputs of block 0: a forward pre-hook (with kwargs) on the
   first block records, batch by batch (``calibration.batch_size``, the split
   of ``collect_stats``), the hidden states and every keyword argument the
   block receives (attention mask, position ids and embeddings, cache flags),
   and stops the forward there.
2. **For each block in order**: bring it to the collection device if it lives
   elsewhere; run the captured batches through it with forward hooks on its
   target Linears, collecting in ONE pass every forward statistic any job
   needs (the union of ``gram``, ``abs_mean``, ``out_cov``), with one input
   accumulator per distinct input tensor (q/k/v share one, gate/up share one:
   they receive the very same tensor object) and one output accumulator per
   layer; finish the block's statistics (on the CPU, as ``collect_stats``
   returns them); factorize every job's groups whose members are now all
   complete (a group that spans blocks waits for its last member's block; its
   members' statistics are held until then), move the factors to host memory,
   drop the block's statistics, and pass the block's outputs on as the next
   block's inputs.
3. **The LM head**, where it is a target, after the last block: its input is
   the final norm's output.

The numbers are those of the whole-model path: the same kernels on the same
tensors, the same batch composition and, per layer, the same order of the
float64 additions (batch after batch), so statistics and factorizations are
bitwise identical (tests/test_pipeline.py). Layers fed the same input get the
same statistics tensors (not copies): decomposers treat statistics as read-only.

Memory: the statistics of one block (plus those of members of groups still
waiting for a later block) are alive at a time, against every layer's at once
on the whole-model path; the captured activations (samples x seqlen x hidden,
in the model's dtype) are held for the whole pass. Nothing is cached on disk: a
rerun whose factorizations are not all in the store collects again (a forward
pass of the calibration data, block by block).

``fisher`` (and ``grad``) is not block-local (it needs the gradient of the LM loss through the
whole model): methods that need it keep the whole-model pass and the disk
cache (``harness.run.calibration``); its accumulators are per-channel vectors,
small. Methods without statistics never run a pass.

Decoders whose blocks the pipeline cannot find (target layers outside one
``nn.ModuleList`` of blocks, a head without a recognizable final norm, or
blocks of differing attention types, whose keyword arguments differ per block)
are served by the whole-model path: ``block_plan`` returns why.

Propagated inputs (``[calibration] inputs = "propagated"``): ``harness.run.propagated``.
"""

from __future__ import annotations

import dataclasses
import random
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.api import LayerInfo, LayerStats
from harness.run.blocks import BlockPlan, block_plan, capture_inputs, on_all
from harness.run.calibration import (
    FORWARD_KINDS,
    INPUT_KINDS,
    KIND_FIELDS,
    OUTPUT_KINDS,
    _eval_mode,
    _flags,
    _input_sums,
    _LayerSums,
    collected_kinds,
    serve_aliases,
)

Factorize = Callable[[Sequence[str], dict[str, LayerStats]], Any]


# ---------------------------------------------------------------- what the pipeline serves
@dataclass
class Job:
    """One method's part of the pass: its needs, its groups and how to factorize one group.

    ``factorize(group, stats)`` gets the group's members' statistics restricted
    to ``needs`` (the fields ``collect_stats`` would have returned for them).
    Afterwards ``factorizations`` holds one result per group (in ``groups``
    order), ``seconds`` the time spent factorizing and ``error`` the first
    exception a factorization raised (the job's later groups are skipped).
    """

    label: str
    needs: frozenset[str]
    groups: Sequence[Sequence[str]]
    factorize: Factorize
    factorizations: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    error: BaseException | None = None
    rng: tuple | None = None
    method: str = ""
    """Propagated inputs: the method's label (jobs of one method at the same reference ranks share a stream)."""
    reference: Callable[[Job, Sequence[int]], Sequence[int | None]] | None = None
    """Propagated inputs: ``reference(job, indices)``, the ranks (None: dense) its just factorized groups
    ``indices`` are compressed at before the block's outputs pass on (``run_propagated``)."""
    ranks: dict[int, int | None] = field(default_factory=dict)
    """Propagated inputs: each factorized group's reference rank (group index -> rank)."""
    refine: Callable[..., dict] | None = None
    """Propagated inputs, a refining method (``Decomposer.refines``): ``refine(block, replacements, inputs,
    targets, forward, swapped)``, its ``refine_block``; the refined groups become ``RefinedFactorization``s."""
    sequential: bool = False
    """Propagated inputs (``Decomposer.sequential_within_block``): a block's statistics stage by stage, each
    stage's layers' inputs through the block's earlier stages compressed (``harness.run.propagated``)."""


class LiveStats:
    """Bytes of statistics tensors (accumulators and finished statistics) alive, and their peak.

    Tensors are counted once each, from ``track`` until they are garbage
    collected (``weakref.finalize``), so what a caller keeps alive counts too.
    Transient per-batch products (one batch's X^T X) are not counted.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.count = 0
        self._ids: set[int] = set()

    def track(self, tensor: torch.Tensor | None) -> None:
        if tensor is None or id(tensor) in self._ids:
            return
        nbytes = tensor.numel() * tensor.element_size()
        self._ids.add(id(tensor))
        self.live += nbytes
        self.count += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, id(tensor), nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._ids.discard(key)
        self.live -= nbytes
        self.count -= 1


# ---------------------------------------------------------------- one block's statistics
class _BlockCollector:
    """Forward hooks on one block's target Linears: shared input sums, per-layer output covariances.

    ``paired`` (propagated inputs, ``anchor_cross``): before each batch the same batch of the original
    model's activations goes through the block with ``stashing`` set, the hooks keeping each layer's input
    (``anchor``); the batch proper then adds X^T X' of each distinct input to its layers' ``anchor_cross``."""

    def __init__(
        self, shapes: dict[str, tuple[int, int]], kinds: frozenset[str], device, tracker, paired: bool = False
    ) -> None:
        self.shapes = shapes
        self.paired = paired and "anchor_cross" in kinds
        self.stashing = False
        self.anchor: dict[str, torch.Tensor] = {}
        self.input_kinds = kinds & INPUT_KINDS
        self.output_kinds = kinds & OUTPUT_KINDS  # out_cov, out_mean: one output accumulator per layer
        self.device = device
        self.tracker = tracker
        self.inputs: dict[str, _LayerSums] = {}
        self.outputs: dict[str, _LayerSums] = {}
        self._seen: dict[int, tuple[torch.Tensor, _LayerSums]] = {}
        self._added: set[int] = set()

    def _new(self, kinds: frozenset[str], name: str) -> _LayerSums:
        sums = _LayerSums(kinds, self.shapes[name], self.device, paired=self.paired)
        if self.tracker is not None:
            for value in vars(sums).values():
                if isinstance(value, torch.Tensor):
                    self.tracker.track(value)
        return sums

    def start_batch(self) -> None:
        self._seen.clear()
        self._added.clear()
        if not self.stashing:
            return
        self.anchor.clear()

    def hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.record(name, inputs[0], output)

        return record

    def record(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.stashing:  # the original model's batch: keep the layer's input for the batch proper
            self.anchor[name] = x.detach()
            return
        if self.input_kinds:
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:  # q/k/v (gate/up): the same tensor, one accumulator
                if self.inputs.setdefault(name, seen[1]) is not seen[1]:
                    raise RuntimeError(f"{name}: its input is shared with other layers in one batch, not in another")
            else:
                sums = self.inputs.get(name) or self.inputs.setdefault(name, self._new(self.input_kinds, name))
                if id(sums) in self._added:
                    raise RuntimeError(f"{name}: its input is shared with other layers in one batch, not in another")
                sums.add_input(_input_sums(x, *_flags(self.input_kinds)))
                if self.paired:
                    sums.add_cross(_cross(self.anchor[name], x))
                self._added.add(id(sums))
                self._seen[id(x)] = (x, sums)
        if self.output_kinds:
            if name not in self.outputs:
                self.outputs[name] = self._new(self.output_kinds, name)
            self.outputs[name].add_output(y.detach().reshape(-1, y.shape[-1]).to(torch.float64))

    def finish(self) -> dict[str, LayerStats]:
        """Every layer's statistics (on the CPU); layers never called get zeros, as in ``collect_stats``."""
        finished: dict[int, LayerStats] = {}
        stats = {}
        for name in self.shapes:
            merged = LayerStats()
            if self.input_kinds:
                sums = self.inputs.get(name) or self.inputs.setdefault(name, self._new(self.input_kinds, name))
                if id(sums) not in finished:
                    finished[id(sums)] = sums.finish()
                done = finished[id(sums)]
                merged.tokens, merged.gram = done.tokens, done.gram
                merged.abs_mean, merged.sq_mean = done.abs_mean, done.sq_mean
                merged.anchor_cross = done.anchor_cross
                merged.sequences, merged.l2_seq = done.sequences, done.l2_seq
            if self.output_kinds:
                sums = self.outputs.get(name) or self.outputs.setdefault(name, self._new(self.output_kinds, name))
                done = sums.finish()
                merged.out_cov, merged.out_mean = done.out_cov, done.out_mean
                if not self.input_kinds:
                    merged.tokens = done.tokens
            if self.tracker is not None:
                for f in ("gram", "abs_mean", "sq_mean", "l2_seq", "out_cov", "out_mean", "anchor_cross"):
                    self.tracker.track(getattr(merged, f))
            stats[name] = merged
        self.inputs.clear()
        self.outputs.clear()
        self._seen.clear()
        return stats


def _cross(anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """X^T X' of one batch in float64: ``anchor`` the original model's input, ``x`` the propagated one."""
    if anchor.shape != x.shape:
        raise RuntimeError(f"anchor_cross: original input {tuple(anchor.shape)} against {tuple(x.shape)}")
    a = anchor.reshape(-1, anchor.shape[-1]).to(torch.float64)
    return a.T @ x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def restrict(stats: LayerStats, needs: frozenset[str]) -> LayerStats:
    """``stats`` with only the fields ``collect_stats`` fills for ``needs`` (the others None)."""
    fields = {f for kind in needs for f in KIND_FIELDS[kind]}
    return LayerStats(**{f: getattr(stats, f) for f in fields})


@contextmanager
def _hooks(model: nn.Module, names: Sequence[str], hook: Callable[[str], Callable]) -> Iterator[None]:
    """A forward hook ``hook(name)`` on each layer of ``names`` inside; all removed on exit."""
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- per-job random streams
def _rng_state() -> tuple:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    import numpy as np

    python, numpy_state, cpu, cuda = state
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- shared steps
def _done_at(plan: BlockPlan) -> dict[str, int]:
    """The step (block index; ``len(plan.blocks)`` for the head) at which each target layer's statistics are in."""
    done_at = {name: b for b, names in enumerate(plan.members) for name in names}
    done_at.update({name: len(plan.blocks) for name in plan.head})
    return done_at


class _Pending:
    """The groups of some jobs still to factorize, by the step they become complete at, and the statistics
    held for them (a group spanning blocks keeps its earlier members' statistics until its last block)."""

    def __init__(self, jobs: Sequence[Job], done_at: dict[str, int], log: Callable[[str], None]) -> None:
        self.log = log
        self.done_at = done_at
        self.held: dict[str, LayerStats] = {}
        self.schedule: dict[int, list[tuple[Job, int]]] = {}
        for job in jobs:  # when each group is complete: -1 for groups without any target member (no statistics)
            for index, group in enumerate(job.groups):
                step = max((done_at[n] for n in group if n in done_at), default=-1)
                self.schedule.setdefault(step, []).append((job, index))

    def ready(self, step: int, collected: set[str] | None = None) -> list[tuple[Job, int]]:
        """Factorize the groups complete at ``step``; the (job, index) that succeeded. Drops what none waits for.
        ``collected`` (a block collected stage by stage): only the groups whose members in that block are all
        in it; the others wait for a later stage."""
        done = []
        for job, index in self._due(step, collected):
            if job.error is not None:
                continue
            group = job.groups[index]
            stats = {n: restrict(self.held[n], job.needs) for n in group if n in self.held}
            _set_rng_state(job.rng)
            started = time.perf_counter()
            try:
                job.factorizations[index] = job.factorize(group, stats)
                done.append((job, index))
            except Exception as exc:  # the job's cells fail with it; the other jobs go on
                job.error = exc
                self.log(f"factorize {job.label}: {type(exc).__name__}: {exc}")
            finally:
                job.seconds += time.perf_counter() - started
                job.rng = _rng_state()
        self.prune()
        return done

    def _due(self, step: int, collected: set[str] | None) -> list[tuple[Job, int]]:
        items = self.schedule.pop(step, [])
        if collected is None:
            return items
        due, wait = [], []
        for job, index in items:
            here = [n for n in job.groups[index] if self.done_at.get(n) == step]
            (due if all(n in collected for n in here) else wait).append((job, index))
        if wait:
            self.schedule[step] = wait
        return due

    def prune(self) -> None:
        later = [(job, i) for items in self.schedule.values() for job, i in items if job.error is None]
        waiting = {n for job, i in later for n in job.groups[i]}
        for name in list(self.held):
            if name not in waiting:
                del self.held[name]

    def subset(self, jobs: Sequence[Job]) -> _Pending:
        """The part of this schedule of ``jobs`` alone, holding (the same) statistics only for them."""
        ids = {id(job) for job in jobs}
        part = _Pending((), self.done_at, self.log)
        part.schedule = {step: [(j, i) for j, i in items if id(j) in ids] for step, items in self.schedule.items()}
        part.held = dict(self.held)
        part.prune()
        return part

    def rest(self) -> None:
        """Groups of layers the pass did not reach (none: every step runs)."""
        for step in sorted(self.schedule):
            self.ready(step)


def _start(jobs: Sequence[Job], seed: Callable[[], None]) -> None:
    """Every job starts from the random state ``seed()`` leaves, with no factorizations yet."""
    for job in jobs:
        job.factorizations = [None] * len(job.groups)
    seed()
    initial = _rng_state()
    for job in jobs:
        job.rng = initial


def _step(
    model: nn.Module,
    plan: BlockPlan,
    b: int,
    inputs: list,
    kinds: frozenset[str],
    shapes: dict[str, tuple[int, int]],
    device: torch.device,
    tracker: LiveStats | None,
    outputs: str,
    anchor: list | None = None,
) -> dict[str, LayerStats]:
    """Run step ``b`` (a block, or the head after the last block) over ``inputs`` collecting ``kinds`` for
    its target layers; their finished statistics. ``outputs``: "replace" puts each batch's block output in
    its place in ``inputs``, "drop" frees each batch once used, "keep" leaves ``inputs`` as they were.
    ``anchor``: the original model's batches, paired with ``inputs`` for ``anchor_cross`` (each goes through
    the block just before its partner, its layers' inputs stashed)."""
    is_head = b == len(plan.blocks)
    names = plan.head if is_head else plan.members[b]
    paired = anchor is not None and "anchor_cross" in kinds
    collector = _BlockCollector({n: shapes[n] for n in names}, kinds, device, tracker, paired=paired)
    modules = [plan.final_norm, *(model.get_submodule(n) for n in names)] if is_head else [plan.blocks[b]]

    def forward(batch):
        if is_head:
            x = plan.final_norm(batch.hidden)
            for name in names:
                model.get_submodule(name)(x)
            return None
        out = plan.blocks[b](batch.hidden, *batch.args, **batch.kwargs)
        return out[0] if isinstance(out, tuple) else out

    with _hooks(model, names if kinds else [], collector.hook), on_all(modules, device):
        for i, batch in enumerate(inputs):
            if paired:
                collector.stashing = True
                collector.start_batch()
                forward(anchor[i])
                collector.stashing = False
            collector.start_batch()
            out = forward(batch)
            if is_head:
                continue
            if outputs == "replace":
                inputs[i] = dataclasses.replace(batch, hidden=out)
            elif outputs == "drop":
                inputs[i] = None
    return collector.finish() if kinds else {}


# ---------------------------------------------------------------- the pass
def run_blocks(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: torch.Tensor,
    jobs: Sequence[Job],
    *,
    device: torch.device,
    batch_size: int = 4,
    seed: Callable[[], None] = lambda: None,
    plan: BlockPlan | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tracker: LiveStats | None = None,
    desc: str = "calibration (blocks)",
) -> None:
    """Collect the jobs' forward statistics block by block and factorize each job's groups as soon as they
    are complete (see the module docstring); results land in each ``Job``. Original inputs: one stream of
    activations, the uncompressed model's (``run_propagated``: through the compressed blocks).

    ``seed()`` is called once; every job then draws from its own copy of the
    random state it left (Python, NumPy, torch), as though it ran alone after
    ``seed()``. A factorization's exception is the job's ``error`` (its other
    groups are skipped); an exception of the pass itself propagates.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    plan = _checked(plan if plan is not None else block_plan(model, layers))
    needs = frozenset().union(*(job.needs for job in jobs))
    kinds = collected_kinds(needs) & FORWARD_KINDS  # original inputs: gram_original is gram
    shapes = {layer.name: tuple(layer.shape) for layer in layers}
    steps = len(plan.blocks) + (1 if plan.head else 0)
    pending = _Pending(jobs, _done_at(plan), log)
    _start(jobs, seed)
    pending.ready(-1)
    with _eval_mode(model), torch.no_grad():
        inputs = capture_inputs(model, plan.blocks[0], batches, batch_size, device) if steps else []
        for b in tqdm(range(steps), desc=desc, unit="block", disable=not progress):
            last = b == steps - 1
            stats = _step(model, plan, b, inputs, kinds, shapes, device, tracker, "drop" if last else "replace")
            if last:
                inputs = []
            pending.held.update(serve_aliases(stats, needs))
            del stats
            pending.ready(b)
    pending.rest()


def _checked(plan: BlockPlan | str) -> BlockPlan:
    if isinstance(plan, str):
        raise ValueError(f"layer-sequential pipeline: unsupported model: {plan}")
    return plan
