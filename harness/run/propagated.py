"""Propagated inputs (``[calibration] inputs = "propagated"``, ``run_propagated``): the layer-sequential
pass (``harness.run.pipeline``) where each block sees what the compressed earlier blocks pass on.

Block b's statistics are collected on the outputs of blocks 0..b-1 with their
target layers already replaced by their compressed versions (SFSD's code,
SVD-LLM's update). What a block is compressed to depends on the ranks, so the
factorizations depend on the cell: the pass runs one job, and one activation
stream, per (method, allocator, target) of the methods it serves. Per block
and stream: a forward through the uncompressed block collecting the
statistics, the factorizations of the groups now complete, the job's
*reference ranks* for them (``Job.reference``: the cell's allocator run on
those groups alone, its target restricted to their share of the model,
``harness.run.allocate.block_target``), and a forward through the block with
those layers replaced (``harness.surgery.replaced``, the suite's
``surgery.mode``) whose outputs are the stream's next inputs. For a local
allocator (uniform) the reference ranks are the cell's final ones; for a
global one (energy, global-greedy, welore, sensitivity, ...) they are a
per-block approximation of its final choice, which it then makes as usual over
the cell's own factorizations. Allocators that score a calibration loss score
a block's candidates on the whole model with the earlier blocks at their
reference ranks. A layer whose group waits for a later block (a group
spanning blocks) passes on uncompressed through its own block (logged); the
group is compressed from its last block on. Jobs start as one stream (block
0's captured inputs: one statistics forward serves them) and split where
their methods or ranks differ. Cost: up to two block forwards per stream
instead of one per pass, and each stream holds its own captured activations
(samples x seqlen x hidden), so both multiply by the number of streams (cells);
the statistics stay one block's (streams are collected one after another) and
each cell's factors are kept only up to what its own (allocator, target) can
choose. Fisher methods keep the whole-model pass on original inputs, and
methods without statistics are unaffected; only the served methods' cells
carry ``inputs`` in their identity (``harness.run.identity.propagated_inputs``).
A job needing ``gram_original`` (the uncompressed model's Gram, ``harness.STAT_KINDS``) adds one
stream to the pass, shared by all such jobs: the captured inputs passed on through the uncompressed
blocks, whose ``gram`` per layer each such job gets as ``gram_original`` beside its own stream's
``gram`` (one more block forward and one more set of activations per pass; under original inputs
``gram_original`` is ``gram`` itself).
Block refinement (a decomposer whose ``refines(options)`` is true, e.g. ``aa-svd`` with ``refine``):
once a block's groups are materialized at a job's reference ranks, before the block's outputs pass on,
the method's ``refine_block`` trains those replacements on the stream's batches (X') towards the
uncompressed block's outputs on the original model's batches (the uncompressed model's stream is kept for
it, as for ``anchor_cross``; those outputs are computed once per block and are that stream's next inputs);
the refined groups become the job's factorizations, fixed at that rank (``harness.run.refine``), and the
block's outputs pass on through them. The last block is refined too (its outputs are not computed), the head
is not. Jobs of one method at the same ranks share one refinement (the same inputs, the same result).
A model the pipeline cannot run is refused under propagated inputs (one
line naming ``calibration.inputs``) rather than silently given original ones,
and so is ``--executor ray``, whose tasks share one factorization per method.

Sequential statistics within a block (a decomposer whose ``sequential_within_block(options)`` is true,
``aa-svd`` and ``sfsd`` by default, as their code does; ``harness.run.stages``): a stream of such jobs
collects a block's statistics stage by stage instead of in one forward through the uncompressed block.
The stages are the block's target layers in the order its forward reaches them, grouped by input (layers
that receive the very same tensor form one stage: q/k/v, then o, then gate/up, then down in a Llama
block; found by one batch through the uncompressed block; layers the forward never calls form a last
stage). Per stage: a forward over the stream's batches with the block's layers of earlier stages
replaced at the job's reference ranks, stopped once the stage's layers have run, collecting their
statistics (for ``anchor_cross`` each original batch goes first through the uncompressed block: X is the
original model's input, X' the input the layer gets once everything before it is compressed); then the
groups now complete are factorized, their reference ranks drawn, and the stream splits where those
differ. A group with members in several stages is factorized once its last member's stage is collected
(its earlier members pass on uncompressed through their stages, as across blocks). Cost: up to one
(shortened) forward per stage instead of one per block; memory: a stage's accumulators beside the
replacements of the block's earlier stages (at most the block's own replacements, which the compressed
forward holds anyway). The head is one stage. Cells of such methods carry ``"within_block":
"sequential"`` in their calibration settings (``harness.run.identity``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.api import LayerInfo, LayerStats
from harness.run.blocks import BlockPlan, block_plan, capture_inputs, move_tensors, on_all
from harness.run.calibration import FORWARD_KINDS, _eval_mode
from harness.run.pipeline import (
    Job,
    LiveStats,
    _checked,
    _done_at,
    _Pending,
    _start,
    _step,
)
from harness.run.stages import block_stages, stage_stats


# ---------------------------------------------------------------- streams
@dataclass
class _Stream:
    """Jobs whose blocks so far saw the very same inputs (same method, same reference ranks): one collection
    forward serves them all, and their next inputs are one list."""

    jobs: list[Job]
    inputs: list
    pending: _Pending
    replacements: dict = field(default_factory=dict)
    """Within a block: the replacements of the block's layers at the reference ranks drawn so far."""
    levels: dict[int, int | None] = field(default_factory=dict)
    """Within a block: the reference rank of each group factorized in it so far (group index -> rank)."""

    @property
    def sequential(self) -> bool:
        return bool(self.jobs) and self.jobs[0].sequential


def _first_streams(jobs: Sequence[Job], inputs: list, pending: _Pending) -> list[_Stream]:
    """Block 0's streams: one, unless some jobs collect stage by stage and others not (one stream each)."""
    by_order: dict[bool, list[Job]] = {}
    for job in jobs:
        by_order.setdefault(job.sequential, []).append(job)
    if len(by_order) < 2:
        return [_Stream(list(jobs), inputs, pending)]
    parts = by_order.values()
    return [_Stream(js, inputs if k == 0 else list(inputs), pending.subset(js)) for k, js in enumerate(parts)]


def run_propagated(
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
    desc: str = "calibration (blocks, propagated)",
    dense: bool = False,
) -> None:
    """``run_blocks`` with propagated inputs: each job (one cell: method, allocator, target) gets block b's
    statistics from the outputs of blocks 0..b-1 with their layers replaced at the job's reference ranks.

    Every job needs ``reference(job, indices)``: the ranks (None: dense) of its groups ``indices``, just
    factorized, at which the block is compressed before its outputs pass on (``job.ranks`` keeps them).
    Per block and stream: one forward through the uncompressed block collecting the statistics (a job with
    ``sequential``: one per stage, see the module docstring), the factorizations and reference ranks, then
    one forward through the block with those layers replaced (``harness.surgery.replaced``; ``dense``:
    ``surgery.mode = "dense"``) per distinct (method, ranks). A layer whose group waits for a later block
    passes on uncompressed. Jobs start as one stream (block 0's captured inputs; two where only some collect
    stage by stage) and split where their ranks differ; a job that failed leaves its stream.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    plan = _checked(plan if plan is not None else block_plan(model, layers))
    steps = len(plan.blocks) + (1 if plan.head else 0)
    done_at = _done_at(plan)
    pending = _Pending(jobs, done_at, log)
    _start(jobs, seed)
    for job in jobs:
        job.ranks = {}
    _log_spanning(jobs, done_at, log)
    pending.ready(-1)
    streams: list[_Stream] = []
    with _eval_mode(model), torch.no_grad():
        if steps:
            streams = _first_streams(jobs, capture_inputs(model, plan.blocks[0], batches, batch_size, device), pending)
        shapes = {layer.name: tuple(layer.shape) for layer in layers}
        run = _Pass(model, plan, shapes, device, tracker, dense, log, seed, jobs, streams)
        for b in tqdm(range(steps), desc=desc, unit="block", disable=not progress):
            streams = run.step(b, streams, last=b == steps - 1)
    for part in [s.pending for s in streams] or [pending]:  # groups of layers the pass did not reach (none)
        part.rest()


class _Pass:
    """The propagated pass's state across blocks: the model, where it runs, and the uncompressed model's
    stream (``original``) where ``anchor_cross``, ``gram_original`` or a refinement needs it."""

    def __init__(
        self,
        model: nn.Module,
        plan: BlockPlan,
        shapes: dict[str, tuple[int, int]],
        device: torch.device,
        tracker: LiveStats | None,
        dense: bool,
        log: Callable[[str], None],
        seed: Callable[[], None],
        jobs: Sequence[Job],
        streams: list[_Stream],
    ) -> None:
        self.model, self.plan, self.shapes, self.device = model, plan, shapes, device
        self.tracker, self.dense, self.log, self.seed = tracker, dense, log, seed
        # ``anchor_cross``, ``gram_original`` and block refinement: one more stream, the uncompressed model's
        # activations through the uncompressed blocks, shared by every job that needs any of them
        self.anchored = any("anchor_cross" in job.needs for job in jobs)
        self.wants_grams = any("gram_original" in job.needs for job in jobs)
        self.held = self.anchored or any(job.refine is not None for job in jobs)
        """Block b's original inputs are needed until every stream is through b."""
        wanted = streams and (self.held or self.wants_grams)
        self.original: list | None = list(streams[0].inputs) if wanted else None
        self.stages: dict[int, list[list[str]]] = {}

    def step(self, b: int, streams: list[_Stream], last: bool) -> list[_Stream]:
        """Step ``b`` (a block, or the head) for every stream; the streams that go on to the next one."""
        advance = "drop" if last else "replace"
        # the anchor pairs block b's original inputs with each stream's: they move on after the streams
        grams = self.original_grams(b, "keep" if self.held else advance) if self.wants_grams else {}
        refines = [b < len(self.plan.blocks) and any(job.refine is not None for job in s.jobs) for s in streams]
        # refinement's targets: the uncompressed block's outputs on the original batches (its next inputs)
        targets = _block_outputs(self.model, self.plan, b, self.original, self.device) if any(refines) else None
        branch = _Branch(self.model, self.plan, b, self.device, self.dense, self.log, targets, self.seed)
        following: list[_Stream] = []
        for stream, refined in zip(streams, refines, strict=True):
            if stream.sequential and b < len(self.plan.blocks):
                parts = self.collect_stages(b, stream, grams, branch)
            else:
                done = self.collect(b, stream, grams, "drop" if last and not refined else "keep")
                parts = [stream] if last and not refined else branch.parts(stream, done)
            # nothing follows the last step: the last block is refined, its outputs not computed
            advanced = branch.advance(parts, stream.inputs, propagate=not last)
            following += parts if last else advanced
            stream.inputs = []
        self.move_original(b, targets, last)
        return following

    def collect(self, b: int, stream: _Stream, grams: dict, outputs: str) -> list[tuple[Job, int]]:
        """Step ``b``'s statistics for ``stream`` in one forward through the uncompressed block; the groups
        then factorized."""
        kinds = frozenset().union(*(job.needs for job in stream.jobs)) & FORWARD_KINDS
        anchor = self.original if self.anchored else None
        stats = _step(
            self.model, self.plan, b, stream.inputs, kinds, self.shapes, self.device, self.tracker, outputs, anchor
        )
        _with_original_grams(stats, grams, kinds)
        stream.pending.held.update(stats)
        del stats
        return stream.pending.ready(b)

    def collect_stages(self, b: int, stream: _Stream, grams: dict, branch: _Branch) -> list[_Stream]:
        """Block ``b``'s statistics for ``stream`` stage by stage, each stage through the block's earlier
        stages compressed; the stream's parts by (method, reference ranks) once every stage is in."""
        parts, collected = [stream], set()
        for names in self.block_stages(b, stream.inputs):
            collected |= set(names)
            following = []
            for part in parts:
                kinds = frozenset().union(*(job.needs for job in part.jobs)) & FORWARD_KINDS
                anchor = self.original if self.anchored else None
                stats = stage_stats(
                    self.model, self.plan.blocks[b], names, part.inputs, part.replacements, kinds, self.shapes,
                    self.device, self.tracker, anchor, self.dense,
                )  # fmt: skip
                _with_original_grams(stats, grams, kinds)
                part.pending.held.update(stats)
                del stats
                following += branch.parts(part, part.pending.ready(b, collected))
            parts = following
        return parts

    def block_stages(self, b: int, inputs: list) -> list[list[str]]:
        if b not in self.stages:
            stages = block_stages(self.plan.blocks[b], self.model, self.plan.members[b], inputs[0], self.device)
            if b == 0:
                order = " -> ".join("/".join(_short(n) for n in stage) for stage in stages)
                self.log(f"calibration: statistics within a block stage by stage: {order} (block 0)")
            self.stages[b] = stages
        return self.stages[b]

    def original_grams(self, b: int, outputs: str) -> dict[str, torch.Tensor]:
        """``gram_original`` of step ``b``'s layers: their ``gram`` on the uncompressed model's activations
        (``outputs`` as ``_step``'s: "replace" passes them on through the uncompressed block), as
        ``run_blocks`` collects it; {} where there is no such stream."""
        if self.original is None:
            return {}
        kinds = frozenset({"gram"})
        stats = _step(self.model, self.plan, b, self.original, kinds, self.shapes, self.device, self.tracker, outputs)
        return {name: layer.gram for name, layer in stats.items()}

    def move_original(self, b: int, targets: list | None, last: bool) -> None:
        """The uncompressed model's stream through block ``b`` (where it is held and something follows)."""
        if self.original is None or not self.held or last:
            return
        if targets is not None:  # the same forward as ``_step``'s
            self.original[:] = [dataclasses.replace(x, hidden=t) for x, t in zip(self.original, targets, strict=True)]
        else:
            _step(self.model, self.plan, b, self.original, frozenset(), self.shapes, self.device, None, "replace")


def _with_original_grams(stats: dict[str, LayerStats], grams: dict[str, torch.Tensor], kinds: frozenset[str]) -> None:
    if "gram_original" in kinds:
        for name, layer in stats.items():
            layer.gram_original = grams[name]


def _short(name: str) -> str:
    return name.rpartition(".")[2]


def _block_outputs(model: nn.Module, plan: BlockPlan, b: int, original: list, device: torch.device) -> list:
    """Block ``b``'s outputs (hidden states) on the uncompressed model's batches ``original``."""
    block = plan.blocks[b]
    outputs = []
    with on_all([block], device):
        for batch in original:
            out = block(batch.hidden, *batch.args, **batch.kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


# ---------------------------------------------------------------- a stream's branches after a block
@dataclass
class _Branch:
    """What splitting a stream after block ``b`` needs: the block, where it runs, the surgery mode, the
    refinement's targets (None: no refining job) and ``seed`` (called before each refinement)."""

    model: nn.Module
    plan: BlockPlan
    b: int
    device: torch.device
    dense: bool
    log: Callable[[str], None]
    targets: list | None = None
    seed: Callable[[], None] = lambda: None

    def parts(self, stream: _Stream, done: list[tuple[Job, int]]) -> list[_Stream]:
        """The stream's jobs by (method, reference ranks of the groups ``done``), each part on the stream's
        inputs with the replacements of the block's layers so far (the stream's and those of ``done``)."""
        return [
            _Stream(
                jobs,
                stream.inputs,
                stream.pending.subset(jobs),
                {**stream.replacements, **replacements},
                {**stream.levels, **dict(key[1])},
            )
            for key, (jobs, replacements) in self.buckets(stream, done).items()
        ]

    def advance(self, parts: list[_Stream], inputs: list, propagate: bool = True) -> list[_Stream]:
        """The streams after block ``b``: each part with the block's outputs on ``inputs``, its layers replaced
        (refined first, for a refining method). The last one reuses the list ``inputs`` (one batch at a time),
        so the activations alive grow by one list per part. ``propagate`` False (the last block): no outputs,
        no streams."""
        streams = []
        for k, part in enumerate(parts):
            replacements = part.replacements
            if part.jobs[0].refine is not None and replacements and self.targets is not None:
                replacements = self.refine(part.jobs, part.levels, replacements, inputs)
                if replacements is None:
                    continue
            if not propagate:
                continue
            in_place = k == len(parts) - 1
            outputs = _compressed_outputs(
                self.model, self.plan, self.b, inputs, replacements, self.device, self.dense, in_place
            )
            streams.append(_Stream(part.jobs, outputs, part.pending))
        return streams

    def buckets(self, stream: _Stream, done: list[tuple[Job, int]]) -> dict[tuple, tuple[list[Job], dict]]:
        """The stream's jobs by (method, (index, reference rank) of the groups ``done``), with the replacements
        of the block's layers at those ranks (a job whose reference or materialization fails leaves)."""
        members = set(self.plan.members[self.b])
        buckets: dict[tuple, tuple[list[Job], dict]] = {}
        for job in stream.jobs:
            if job.error is not None:
                continue
            indices = [i for j, i in done if j is job]
            try:
                ranks = list(job.reference(job, indices)) if indices else []
                if len(ranks) != len(indices):
                    raise RuntimeError(f"reference ranks: {len(ranks)} for {len(indices)} groups")
                replacements = {}
                for index, rank in zip(indices, ranks, strict=True):
                    job.ranks[index] = rank
                    if rank is not None:
                        made = job.factorizations[index].materialize(rank)
                        replacements.update({n: r for n, r in made.items() if n in members})
            except Exception as exc:  # the job's cells fail with it; the other jobs go on
                job.error = exc
                self.log(f"propagate {job.label}: block {self.b}: {type(exc).__name__}: {exc}")
                continue
            key = (job.method or job.label, tuple(zip(indices, ranks, strict=True)))
            buckets.setdefault(key, ([], replacements))[0].append(job)
        return buckets

    def refine(self, jobs: list[Job], ranks: dict[int, int | None], replacements: dict, inputs: list) -> dict | None:
        """The block's replacements trained by the jobs' method (once for the jobs of one method at the same
        ranks: the same inputs, the same result), written back as each job's factorizations of the groups they
        cover (``RefinedFactorization``); None (every job failed) where the refinement raised."""
        from harness.run.refine import refined_groups, swapped

        block = self.plan.blocks[self.b]

        def forward(batch):
            out = block(batch.hidden, *batch.args, **batch.kwargs)
            return out[0] if isinstance(out, tuple) else out

        started = time.perf_counter()
        try:
            self.seed()  # a refinement draws from the suite's seed, whatever ran before it
            with on_all([block], self.device), torch.enable_grad():
                refined = jobs[0].refine(
                    block, replacements, inputs, self.targets, forward, lambda r: swapped(self.model, r)
                )
            indices, levels = list(ranks), list(ranks.values())
            for job in jobs:
                for index, fact in refined_groups(job.factorizations, indices, levels, refined).items():
                    job.factorizations[index] = fact
        except Exception as exc:  # the jobs' cells fail with it; the other jobs go on
            for job in jobs:
                job.error = exc
            self.log(f"refine {jobs[0].label}: block {self.b}: {type(exc).__name__}: {exc}")
            return None
        finally:
            for job in jobs:
                job.seconds += time.perf_counter() - started
        return {n: refined.get(n, r) for n, r in replacements.items()}


def _compressed_outputs(
    model: nn.Module,
    plan: BlockPlan,
    b: int,
    inputs: list,
    replacements: dict,
    device: torch.device,
    dense: bool,
    in_place: bool,
) -> list:
    """Block ``b``'s outputs for ``inputs`` with ``replacements`` in place of its layers (in ``inputs`` itself
    where ``in_place``, each batch replaced by its output)."""
    from harness.surgery import replaced

    outputs = inputs if in_place else [None] * len(inputs)
    moved = {name: move_tensors(r, device) for name, r in replacements.items()}
    block = plan.blocks[b]
    with on_all([block], device), replaced(model, moved, dense):
        for i, batch in enumerate(inputs):
            out = block(batch.hidden, *batch.args, **batch.kwargs)
            outputs[i] = dataclasses.replace(batch, hidden=out[0] if isinstance(out, tuple) else out)
    return outputs


def _log_spanning(jobs: Sequence[Job], done_at: dict[str, int], log: Callable[[str], None]) -> None:
    """Say, once per method, how many layers pass on uncompressed through their own block because their
    group is complete only at a later block (cross-layer groups)."""
    said = set()
    for job in jobs:
        method = job.method or job.label
        if method in said:
            continue
        said.add(method)
        early = 0
        for group in job.groups:
            steps = [done_at[n] for n in group if n in done_at]
            early += sum(1 for s in steps if s < max(steps))
        if early:
            log(
                f"calibration: propagated inputs: {method}: {early} layer{'' if early == 1 else 's'} in groups that "
                f"span blocks pass on uncompressed through their own blocks (a group is compressed from its last "
                f"block on)"
            )
