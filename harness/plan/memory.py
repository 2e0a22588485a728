"""The bytes each stage's tensors take (harness plan): calibration statistics (per
block, with shared inputs), captured activations, factorization working sets and
the kept factors. Each function's docstring gives its formula."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from harness.api import LayerInfo

if TYPE_CHECKING:
    pass

from harness.plan.layout import FLOAT64, text_config

SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
"""Kinds of one block that receive the very same input tensor (the pipeline keeps one accumulator for them)."""


# ---------------------------------------------------------------- statistics
def input_groups(block: Sequence[LayerInfo]) -> list[list[LayerInfo]]:
    """One block's layers grouped by the input tensor they receive (q/k/v one, gate/up one, the others each
    their own): the pipeline keeps one input accumulator per group."""
    groups: list[list[LayerInfo]] = []
    for shared in SHARED_INPUTS:
        members = [x for x in block if x.kind in shared]
        if members:
            groups.append(members)
    groups.extend([x] for x in block if not any(x.kind in s for s in SHARED_INPUTS))
    return groups


def input_stats_bytes(n: int, kinds: frozenset[str]) -> tuple[int, int]:
    """(accumulator, finished) bytes of one input's float64 statistics of width n.

    Accumulators: an n² sum per Gram-like kind (``gram``; under propagated inputs also ``anchor_cross``
    and ``gram_original``, which ``plan_model`` folds into ``gram`` under original inputs, where they are
    the Gram itself), |x| sums n (``abs_mean``), per-sequence norm sums n (``l2_seq``), x² sums n (any);
    finished: abs_mean n, l2_seq n and sq_mean n (divided copies; the Grams are finished in place on the CPU).
    """
    if not kinds & ({"abs_mean", "l2_seq"} | GRAM_LIKE):
        return 0, 0
    vectors = (n if "abs_mean" in kinds else 0) + (n if "l2_seq" in kinds else 0)
    accumulator = n * n * len(kinds & GRAM_LIKE) + vectors + n
    return FLOAT64 * accumulator, FLOAT64 * (vectors + n)


GRAM_LIKE = frozenset({"gram", "anchor_cross", "gram_original"})


def block_stats_bytes(block: Sequence[LayerInfo], kinds: frozenset[str], shared: bool = True) -> tuple[int, int]:
    """(accumulators, finished) bytes of one block's statistics for ``kinds``.

    Inputs: ``input_stats_bytes`` once per distinct input (``input_groups``; once per layer where
    ``shared`` is False, as on the whole-model path); ``out_cov``: m² float64 per layer (finished in place);
    ``fisher``: n + m float64 per layer; ``grad``: m x n float32 per layer (accumulated, then finished).
    """
    kinds = frozenset(kinds)
    groups = input_groups(block) if shared else [[x] for x in block]
    accumulators = finished = 0
    for group in groups:
        a, f = input_stats_bytes(group[0].shape[1], kinds)
        accumulators, finished = accumulators + a, finished + f
    for layer in block:
        m, n = layer.shape
        if "out_cov" in kinds:
            accumulators += FLOAT64 * m * m
        if "fisher" in kinds:
            accumulators += FLOAT64 * (m + n)
        if "grad" in kinds:
            accumulators += 4 * m * n
            finished += 4 * m * n
    return accumulators, finished


def blocks_of(layers: Sequence[LayerInfo]) -> list[list[LayerInfo]]:
    """The layers per block in order (the LM head, outside any block, a step of its own)."""
    by_index: dict[Any, list[LayerInfo]] = {}
    for layer in layers:
        by_index.setdefault(layer.index if layer.index is not None else "head", []).append(layer)
    return list(by_index.values())


def pipeline_stats_peak(layers: Sequence[LayerInfo], kinds: frozenset[str]) -> int:
    """Peak bytes of statistics alive in the layer-sequential pass on the CPU (``LiveStats.peak``).

    The largest block's accumulators plus its finished statistics (both alive at the end of ``finish``);
    one block at a time.
    """
    return max((sum(block_stats_bytes(b, kinds)) for b in blocks_of(layers)), default=0)


def held_stats_bytes(layers: Sequence[LayerInfo], group: Sequence[LayerInfo], kinds: frozenset[str]) -> int:
    """Bytes of statistics alive while the block pipeline factorizes ``group``: every statistic of each block
    the group reaches, for every kind the pass collects (the held statistics are trimmed only after all of a
    block's groups are factorized), accumulators and finished copies both (a Gram or output covariance is
    finished in place: its accumulator is the statistic the factorization reads).

    (Before: the finished copies of the group's own members only, which left out the Grams themselves,
    1.28 GiB for a Llama-2-7B block.)
    """
    touched = {x.index for x in group}
    return sum(sum(block_stats_bytes(b, kinds)) for b in blocks_of(layers) if b[0].index in touched)


def evaluation_tokens_bytes(tokens: int, vocab: int, dtype_bytes: int) -> int:
    """The logits of one evaluation batch of ``tokens`` (batch x seqlen) at their peak: tokens x vocab values
    of (dtype_bytes + 8) bytes. The model's logits in its dtype, their float32 cast (a new tensor for a 16-bit
    model; for a float32 model the contiguous copy of the shifted slice instead) and log_softmax's float32
    output inside the cross entropy: 12 bytes a value in float32 (measured: tests/test_plan.py), 10 in
    bfloat16 (measured on a CPU: 9; bench/gpu_check.sh).

    (Before: one float32 copy, of the calibration's batch.)
    """
    return (dtype_bytes + 8) * tokens * vocab


def forward_bytes(tokens: int, config: dict[str, Any], dtype_bytes: int) -> int:
    """One block's forward intermediates for ``tokens``: 4 tensors of tokens · I (gate, up, act, product) and
    the block output tokens · h, in the model dtype (as in ``batch_transient_bytes``; the evaluation stage
    counts them for its batch: before, it did not)."""
    c = text_config(config)
    return dtype_bytes * tokens * (4 * int(c.get("intermediate_size", c["hidden_size"])) + int(c["hidden_size"]))


def whole_stats_bytes(layers: Sequence[LayerInfo], kinds: frozenset[str]) -> tuple[int, int]:
    """(accumulators, finished) of the whole-model pass: every layer's own statistics at once."""
    totals = [block_stats_bytes(b, kinds, shared=False) for b in blocks_of(layers)]
    return sum(a for a, _ in totals), sum(f for _, f in totals)


def activations_bytes(samples: int, seqlen: int, hidden: int, dtype_bytes: int) -> int:
    """The block inputs the pipeline captures and carries: samples · seqlen · hidden in the model dtype."""
    return samples * seqlen * hidden * dtype_bytes


def batch_transient_bytes(
    layers: Sequence[LayerInfo], kinds: frozenset[str], tokens: int, config: dict[str, Any], dtype_bytes: int
) -> int:
    """One batch's transient tensors at the widest layer (``tokens`` = batch_size · seqlen).

    The float64 copy of the input (tokens · n · 8) and its X^T X (n² · 8) under ``gram``; the float64 copy of
    the output and Y^T Y (tokens · m · 8 + m² · 8) under ``out_cov``; plus the block's own forward
    intermediates: 4 tensors of tokens · I (gate, up, act, product) and the block output tokens · h, in the
    model dtype.
    """
    c = text_config(config)
    worst = 0
    for layer in layers:
        m, n = layer.shape
        size = 0
        if kinds & ({"abs_mean", "l2_seq"} | GRAM_LIKE):
            size += FLOAT64 * tokens * n + (FLOAT64 * n * n if kinds & GRAM_LIKE else 0)
        if "out_cov" in kinds:
            size += FLOAT64 * (tokens * m + m * m)
        worst = max(worst, size)
    forward = dtype_bytes * tokens * (4 * int(c.get("intermediate_size", c["hidden_size"])) + int(c["hidden_size"]))
    return worst + forward


# ---------------------------------------------------------------- factorization
def working_set_bytes(group: Sequence[LayerInfo], needs: frozenset[str]) -> int:
    """Float64 bytes one group's factorization holds at its peak (an estimate of the method's math).

    Per member (m, n), k = min(m, n): the weight and its transformed copy (2mn), the SVD's U, s, Vt
    (mk + k + kn); under ``gram`` the whitening's Gram copy, Cholesky factor and its inverse (3n²);
    under ``out_cov`` the m x m covariance and its eigenvectors (2m²). A group's members are summed.
    """
    total = 0
    for layer in group:
        m, n = layer.shape
        k = min(m, n)
        size = 2 * m * n + m * k + k + k * n
        if "gram" in needs:
            size += 3 * n * n
        if "out_cov" in needs:
            size += 2 * m * m
        total += size
    return FLOAT64 * total


class _ShapeFact:
    """The few attributes of a ``Factorization`` that ``Target.per_matrix`` reads, from a shape."""

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n
        self.full_rank = min(m, n)
        self.ranks = range(0, self.full_rank + 1)
        self.dense_params = m * n

    def params(self, rank: int) -> int:
        return rank * (self.m + self.n)

    @property
    def saving_rank(self) -> int:
        return max(0, min((self.m * self.n - 1) // (self.m + self.n), self.full_rank))


def kept_rank(m: int, n: int, targets: Sequence[Any], allocators: Sequence[Any]) -> int:
    """``harness.run.factors.max_rank`` from a shape: break-even (mn − 1) // (m + n) where every allocator
    saves parameters only, raised to a target's own per-matrix rank (``rank = 0.9``), else the full rank."""
    fact = _ShapeFact(m, n)
    best = -1
    for allocator in allocators:
        for target in targets:
            if not getattr(allocator, "saving_ranks_only", False):
                return fact.full_rank
            top = fact.saving_rank
            try:
                own = target.per_matrix([fact])
            except Exception:  # a target kind that needs more of a factorization: break-even bounds it
                own = None
            if own is not None and own[0] is not None:
                top = max(top, own[0])
            best = max(best, min(top, fact.full_rank))
    return fact.full_rank if best < 0 else best


def kept_bytes(layers: Sequence[LayerInfo], targets, allocators, storage_bytes: int) -> int:
    """Bytes of the kept factors of every layer: K (m + n) values each at the storage dtype, K = ``kept_rank``."""
    ranks: dict[tuple[int, int], int] = {}  # one per distinct shape
    total = 0
    for layer in layers:
        m, n = layer.shape
        if (m, n) not in ranks:
            ranks[m, n] = kept_rank(m, n, targets, allocators)
        total += ranks[m, n] * (m + n) * storage_bytes
    return total


def replaced_bytes(layers: Sequence[LayerInfo], target: Any, allocators: Sequence[Any], dtype_bytes: int) -> int:
    """Bytes of one cell's factored layers in the model dtype (the dense originals stay beside them).

    A ``params`` target: ``value`` x the decomposable parameters, whatever the allocator spreads; a target
    with a per-matrix rule (``rank``): that rank's K (m + n) per layer; any other: ``kept_rank``'s bound.
    """
    if target.kind == "params":
        return int(target.value * sum(m * n for m, n in (x.shape for x in layers))) * dtype_bytes
    ranks: dict[tuple[int, int], int] = {}  # one per distinct shape
    total = 0
    for layer in layers:
        m, n = layer.shape
        if (m, n) not in ranks:
            try:
                own = target.per_matrix([_ShapeFact(m, n)])
            except Exception:  # a kind that needs more of a factorization: the bound
                own = None
            ranks[m, n] = (own[0] if own is not None else kept_rank(m, n, [target], allocators)) or 0
        total += ranks[m, n] * (m + n) * dtype_bytes
    return total


# ---------------------------------------------------------------- a tuned cell's training step
ADAMW_STATE_BYTES = 12
"""Per trainable value: its float32 gradient and AdamW's two float32 moments."""


def backward_activations_bytes(tokens: int, config: dict[str, Any], dtype_bytes: int) -> int:
    """What one training step's forward keeps for the backward through the whole model, for ``tokens``
    (batch x seqlen): per token and block 8 h + 5 I values in the model dtype (the inputs of the norms, of
    q/k/v, o, gate/up and down, attention's q, k, v and output, the MLP's gate, up and activation), and the
    logits with their float32 log-softmax and gradient (3 x vocab float32 per token). An estimate: eager
    attention's probabilities (heads x seqlen per token) and the factored layers' rank-wide intermediates
    are not counted."""
    c = text_config(config)
    h, inter = int(c["hidden_size"]), int(c.get("intermediate_size", c["hidden_size"]))
    blocks = int(c["num_hidden_layers"]) * (8 * h + 5 * inter) * dtype_bytes
    return tokens * (blocks + 3 * int(c["vocab_size"]) * 4)


def training_bytes(
    layers: Sequence[LayerInfo], target: Any, allocators: Sequence[Any], tokens: int, config: dict[str, Any], wb: int
) -> int:
    """One training step of a cell whose method tunes after surgery (``Decomposer.tunes``): the backward's
    activations for one calibration batch of ``tokens`` and, for every value of the cell's factors (the
    trainable ones: ``replaced_bytes`` / ``wb``, an upper bound for adapters on them), its gradient and
    AdamW's two moments (``ADAMW_STATE_BYTES``)."""
    values = replaced_bytes(layers, target, allocators, wb) // wb
    return backward_activations_bytes(tokens, config, wb) + ADAMW_STATE_BYTES * values


def refine_bytes(
    block: Sequence[LayerInfo],
    targets: Sequence[Any],
    allocators: Sequence[Any],
    samples: int,
    batch_size: int,
    seqlen: int,
    config: dict[str, Any],
    dtype_bytes: int,
) -> int:
    """Block refinement's memory (``Decomposer.refine_block``, under propagated inputs), one block at a time:

    - the trainable factors of the block's layers, K (m + n) values each at the largest rank the method's
      (target, allocator) pairs keep (``kept_rank``), four times in the model dtype: the swapped-in copies,
      their gradients and AdamW's two moments;
    - one batch's activations kept for the backward (``tokens`` = batch_size · seqlen): 16 tensors of
      tokens · h, 4 of tokens · I (the MLP), and the attention probabilities with their gradient,
      2 · batch · heads · seqlen² (eager attention; fused kernels keep less);
    - the targets: the uncompressed block's outputs on every calibration batch, samples · seqlen · h.
    """
    c = text_config(config)
    hidden, inter = int(c["hidden_size"]), int(c.get("intermediate_size", c["hidden_size"]))
    heads = int(c.get("num_attention_heads", 1))
    trainable = sum(kept_rank(m, n, targets, allocators) * (m + n) for m, n in (x.shape for x in block))
    tokens = batch_size * seqlen
    backward = tokens * (16 * hidden + 4 * inter) + 2 * batch_size * heads * seqlen * seqlen
    return dtype_bytes * (4 * trainable + backward + samples * seqlen * hidden)


# ---------------------------------------------------------------- the block pass's timeline
class PassJob:
    """One job of the block pass as the planner sees it (``harness.run.pipeline.Job``): its needs, its groups
    (LayerInfo lists) and the bytes each group's kept factors take in host memory once factorized (0 under
    ``[factorization] keep = "disk"``: memory-mapped files, see ``kept_host_bytes``)."""

    def __init__(self, label: str, needs: frozenset[str], groups: Sequence[Sequence[LayerInfo]], kept: Sequence[int]):
        self.label, self.needs, self.groups, self.kept = label, frozenset(needs), list(groups), list(kept)


def pass_schedule(layers: Sequence[LayerInfo], jobs: Sequence[PassJob]) -> list[tuple[int, int, int]]:
    """(step, job, group) in the order the block pass factorizes them (``harness.run.pipeline._Pending``):
    by the step its last member's statistics are in (a block's index in ``blocks_of`` order; the head after
    the last block; -1 for a group without target members), then by job, then by group index."""
    step_of = {x.name: s for s, block in enumerate(blocks_of(layers)) for x in block}
    order = []
    for j, job in enumerate(jobs):
        for g, group in enumerate(job.groups):
            order.append((max((step_of[x.name] for x in group if x.name in step_of), default=-1), j, g))
    return sorted(order)


def kept_before(layers: Sequence[LayerInfo], jobs: Sequence[PassJob]) -> tuple[list[int], dict[tuple[int, int], int]]:
    """Kept factors alive in the block pass: (per step, the bytes kept for groups of earlier steps while the
    step collects; per (job, group), the bytes kept once that group is kept).

    Every job keeps each group's factors from its factorization to the session's last cell of the method
    (``BlockFactorizer.release``), so they pile up block after block: at step s, every group complete at
    an earlier step; at a group, every group up to it in ``pass_schedule`` order (its own block's too, and
    its own: ``keep`` builds the compacted factors while the raw factorization is still alive).
    Index ``len(blocks_of(layers))`` of the first list: everything the pass kept."""
    schedule = pass_schedule(layers, jobs)
    steps = len(blocks_of(layers))
    per_step = [sum(jobs[j].kept[g] for s, j, g in schedule if s < step) for step in range(steps + 1)]
    per_group, total = {}, 0
    for _, j, g in schedule:
        total += jobs[j].kept[g]
        per_group[j, g] = total
    return per_step, per_group


def pass_calibration_peak(
    layers: Sequence[LayerInfo],
    jobs: Sequence[PassJob],
    kinds: frozenset[str],
    tokens: int,
    config: dict[str, Any],
    dtype_bytes: int,
    cpu: bool = True,
) -> tuple[int, int]:
    """(on the run device, in host memory) of the block pass's calibration at its peak step, the model's
    weights and the captured activations not included; on a CPU run everything is the first figure.

    Per step s (a block, or the head): while it collects, its accumulators and one batch's transients
    (``batch_transient_bytes`` of its layers) on the device, its finished statistics and the factors kept
    for the groups of earlier steps (``kept_before``) on the host; between its groups' factorizations (the
    pass's own code, outside any ``factorize``), its held statistics (accumulators and finished copies) and
    the factors kept up to its last group, on the host (the statistics are dropped after that group).
    The largest total of either state over the steps. With factors kept in memory the last block's is the
    peak: every earlier block's factors are alive then.

    (Before: one block's statistics and transients only; at one full-width Llama-2-7B block the 0.75 GiB
    of svd-llm factors a block keeps was left out of every later block's calibration.)
    """
    before, _ = kept_before(layers, jobs)
    best = (0, 0)
    for s, block in enumerate(blocks_of(layers)):
        acc, fin = block_stats_bytes(block, kinds)
        transient = batch_transient_bytes(block, kinds, tokens, config, dtype_bytes)
        if cpu:  # one memory: the accumulators are finished in place beside their finished copies
            collecting, between = (acc + fin + transient + before[s], 0), (acc + fin + before[s + 1], 0)
        else:  # accumulated on the device, finished on the host (``_BlockCollector.finish``)
            collecting, between = (acc + transient, acc + fin + before[s]), (0, acc + fin + before[s + 1])
        best = max(best, collecting, between, key=sum)
    return best


def pass_factorization_peak(
    layers: Sequence[LayerInfo], jobs: Sequence[PassJob], kinds: frozenset[str]
) -> dict[str, tuple[int, int]]:
    """Per job label: (math, kept) at its costliest group in the block pass: the group's float64 working set
    and the statistics held for it (``working_set_bytes`` + ``held_stats_bytes``), and the factors kept up
    to and with it (``kept_before``), the largest sum over the job's groups.

    (Before: the largest group's math plus every factor the pass keeps, the later blocks' included.)"""
    _, before = kept_before(layers, jobs)
    peaks: dict[str, tuple[int, int]] = {}
    for _, j, g in pass_schedule(layers, jobs):
        job, group = jobs[j], jobs[j].groups[g]
        here = (working_set_bytes(group, job.needs) + held_stats_bytes(layers, group, kinds), before[j, g])
        peaks[job.label] = max(peaks.get(job.label, (0, 0)), here, key=sum)
    return peaks
