"""What a run will need, from the model's config alone (issue 16, point 5): ``harness plan``.

No weights are loaded. A ``random:<shape>`` model's config is the JSON in
``harness/shapes`` (this module then imports no torch, so ``harness plan`` is
instant); a local directory or hub id is read with ``transformers.AutoConfig``
(config.json only); ``embedded`` uses its cached conversion's config.json, else
the SmolLM2-135M sizes below.

One row per stage (load, calibration, factorization, factor storage,
evaluation), each with the peak device memory, host memory and disk it needs,
in bytes. On a CPU run the device *is* the host: every figure is host memory.
The figures are the tensors the code allocates (see each function's
docstring for its formula) plus ``RUNTIME_BYTES`` of host memory for the
interpreter with torch and transformers imported; allocator slack and
fragmentation are not modelled. The calibration figures are checked against a
measured peak RSS (tests/test_plan.py: within 15 %); the factorization working
sets are the float64 tensors of each method's math, an estimate (LAPACK's own
workspace is not counted). Under ``calibration.inputs = "propagated"`` the
captured activations and the block pass's kept factors count once per stream
(one per cell of the methods the pipeline serves: ``propagated_streams``).
On the block path the factors kept for earlier groups count where they are
alive (``pass_calibration_peak``, ``pass_factorization_peak``); under
``[factorization] keep = "disk"`` they are memory-mapped files: on disk (the
factor storage stage), in the page cache (reclaimable), not in the resident set
until a cell reads them, so not in host memory. A run that collects statistics
also keeps its calibration text (``CALIBRATION_DATA_BYTES``).

Decodable layers: Llama-family decoders (llama, mistral, qwen2, qwen3: every
config in harness/shapes) are laid out from the config (q, k, v, o, gate, up,
down per block; the LM head under ``surgery.lm_head``). Any other
``model_type`` is built on the meta device (torch, no memory) to list its
Linears.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.suite import Suite

from harness.api import GRADIENT_KINDS
from harness.errors import HarnessError
from harness.plan.layout import (  # noqa: F401 (re-exported: the planner's public functions)
    DTYPE_BYTES,
    FLOAT64,
    GiB,
    block_params,
    head_dim,
    linear_layers,
    model_config,
    param_count,
    text_config,
)
from harness.plan.memory import (  # noqa: F401 (re-exported)
    SHARED_INPUTS,
    PassJob,
    _ShapeFact,
    activations_bytes,
    batch_transient_bytes,
    block_stats_bytes,
    blocks_of,
    evaluation_tokens_bytes,
    forward_bytes,
    held_stats_bytes,
    input_groups,
    input_stats_bytes,
    kept_before,
    kept_bytes,
    kept_rank,
    pass_calibration_peak,
    pass_factorization_peak,
    pass_schedule,
    pipeline_stats_peak,
    refine_bytes,
    replaced_bytes,
    training_bytes,
    whole_stats_bytes,
    working_set_bytes,
)

RUNTIME_BYTES = int(0.37 * GiB)
"""Host memory of the process before any model: Python with torch and transformers imported (measured on
this CPU build: 0.37 GiB peak RSS)."""
FORWARD = frozenset({"gram", "abs_mean", "l2_seq", "out_cov", "out_mean", "anchor_cross", "gram_original"})
"""The forward statistics (``harness.run.calibration.FORWARD_KINDS``, written out: the planner loads no torch)."""
CALIBRATION_DATA_BYTES = int(0.25 * GiB)
"""Host memory a ``harness run`` keeps after reading its calibration data (the source text and its tokens, the
tokenizer): measured by bench/scale.py's "data" stage, 0.22-0.28 GiB above the loaded model at widths 512
and 4096, 4 x 256 lambada tokens, not returned afterwards. Counted in the calibration and factorization
stages of a run that collects statistics (the bare children of tests/test_plan.py read no text)."""
STAGES = ("load", "calibration", "factorization", "factor storage", "evaluation")


# ---------------------------------------------------------------- the plan
@dataclass
class Stage:
    name: str
    device: int
    host: int
    disk: int = 0
    note: str = ""


@dataclass
class Plan:
    model: str
    device: str
    """``cpu`` or ``cuda[:N]``: where the run computes."""
    dtype: str
    stages: list[Stage] = field(default_factory=list)
    device_memory: int | None = None
    """Total memory of the device (None on a CPU run: the device is the host)."""
    host_memory: int | None = None

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def peak(self, column: str) -> int:
        return max((getattr(s, column) for s in self.stages), default=0)

    def exceeded(self) -> tuple[Stage, str, int, int] | None:
        """The first (stage, 'device' or 'host memory', needed, available) that does not fit, else None."""
        for stage in self.stages:
            host = stage.host
            if self.host_memory is not None and host > self.host_memory:
                return stage, "host memory", host, self.host_memory
            if not self.on_cpu and self.device_memory is not None and stage.device > self.device_memory:
                return stage, f"{self.device} memory", stage.device, self.device_memory
        return None

    def fits(self) -> bool:
        return self.exceeded() is None

    def table(self) -> str:
        """The plan as a text table (GiB), with a last line saying whether it fits."""
        from tabulate import tabulate

        def gib(value: int) -> str:
            return f"{value / GiB:.2f}"

        rows = []
        for s in self.stages:
            device = "—" if self.on_cpu else gib(s.device)
            rows.append([s.name, device, gib(s.host), gib(s.disk), s.note])
        headers = [f"stage ({self.model}, {self.dtype}, {self.device})", "device GiB", "host GiB", "disk GiB", "what"]
        text = tabulate(rows, headers=headers)
        have = []
        if not self.on_cpu and self.device_memory is not None:
            have.append(f"{self.device} {gib(self.device_memory)} GiB")
        if self.host_memory is not None:
            have.append(f"host {gib(self.host_memory)} GiB")
        over = self.exceeded()
        verdict = "fits" if over is None else f"does NOT fit: {over[0].name} needs {gib(over[2])} GiB of {over[1]}"
        return f"{text}\n{verdict} ({', '.join(have) or 'no memory figure'})"


def plan_model(
    suite: Suite,
    spec: str,
    device: str = "cpu",
    layers: int | None = None,
    executor: str = "sequential",
    plugins=None,
) -> Plan:
    """The plan of ``suite`` on model ``spec``, computing on ``device`` (``cpu`` or ``cuda[:N]``)."""
    from harness.plugins import get_plugins

    plugins = plugins or get_plugins()
    config = model_config(spec, layers, suite.trust_remote_code)
    c = text_config(config)
    dtype = resolved_dtype(suite.dtype_setting, device)
    wb = DTYPE_BYTES[dtype]
    cal = suite.calibration
    targets_layers = linear_layers(config, suite.surgery.kinds, suite.surgery.lm_head)
    weights = param_count(config) * wb
    hidden = int(c["hidden_size"])
    cpu = device == "cpu"
    plan = Plan(spec if layers is None else f"{spec} (layers={layers})", device, dtype)

    def stage(name: str, on_device: int, on_host: int, disk: int = 0, note: str = "") -> Stage:
        """On a CPU run everything is host memory; the runtime's own bytes are host memory either way."""
        if cpu:
            return Stage(name, 0, RUNTIME_BYTES + on_device + on_host, disk, note)
        return Stage(name, on_device, RUNTIME_BYTES + on_host, disk, note)

    loaded = f"{param_count(config) / 1e9:.2f} B parameters in {dtype}"
    if suite.offload:  # blocks off the device: it holds the rest and one block (harness.offload)
        block_w = block_params(config) * wb
        blocks_w = int(c["num_hidden_layers"]) * block_w
        resident = weights - blocks_w + block_w
        host_w, disk_w = (blocks_w, 0) if suite.offload == "cpu" else (0, blocks_w)
        if suite.offload == "cpu":  # loaded on the host whole (where its blocks stay), then dispatched
            plan.stages.append(stage("load", 0, weights, 0, f"{loaded}; blocks offloaded to cpu"))
        else:  # the rest on the device, each block through the host to disk in turn (harness.models.load_model;
            # a GGUF file loads whole on the host first: the embedded model's 135M parameters, not modelled)
            note = f"{loaded}; blocks written to disk one at a time"
            plan.stages.append(stage("load", weights - blocks_w, block_w, disk_w, note))
        weights = resident
    else:
        host_w = disk_w = 0
        plan.stages.append(stage("load", weights, 0, 0, loaded))

    methods = []
    for method in suite.methods:
        decomposer = plugins.get("decomposer", method.name)
        allocators = [plugins.get("allocator", a.name) for a in method.allocators]
        needs = collected_needs(decomposer.needs_for(method.options), cal.inputs)
        methods.append((method, needs, decomposer.groups(targets_layers, method.options), allocators))
    forward = frozenset().union(*(n for _, n, _, _ in methods)) & FORWARD
    whole_kinds = frozenset().union(*(n for _, n, _, _ in methods)) if cal.pipeline == "whole" else frozenset()
    if cal.pipeline == "blocks":
        whole_kinds = frozenset().union(*(n for _, n, _, _ in methods if n & GRADIENT_KINDS))
        forward = frozenset().union(*(n for _, n, _, _ in methods if not n & GRADIENT_KINDS)) & forward
    by_name = {x.name: x for x in targets_layers}
    tokens = cal.batch_size * cal.seqlen
    refining = [m for m in methods if plugins.get("decomposer", m[0].name).refines(m[0].options)]
    streams = propagated_streams(suite, methods, refining=bool(refining))
    activations = activations_bytes(cal.samples, cal.seqlen, hidden, wb) * max(1, streams)
    on_disk = suite.factorization.keep == "disk"  # kept factors: memory-mapped group files (page cache, not RSS)
    storage = min(DTYPE_BYTES[suite.factorization.storage_dtype], wb)  # never wider than the model (compact)
    kept_dtype = suite.factorization.storage_dtype if DTYPE_BYTES[suite.factorization.storage_dtype] <= wb else dtype
    jobs = pass_jobs(methods, by_name, targets_layers, cal, storage, streams, on_disk)
    calibration_peak = (weights, 0)  # the model stays where it was loaded
    notes = []
    disk = 0
    if forward:
        device_part, host_part = pass_calibration_peak(targets_layers, jobs, forward, tokens, config, wb, cpu)
        calibration_peak = (weights + activations + device_part, host_part)
        notes.append(f"blocks: {', '.join(sorted(forward))}, one block's statistics")
        if kept_before(targets_layers, jobs)[0][-2]:  # at the last step: the earlier steps' factors
            notes.append("the factors kept for earlier blocks")
        if streams:
            notes.append(f"propagated inputs: {streams} streams of activations")
        if streams and refining:  # one refinement at a time, on the device: the largest block's
            refine = max(
                refine_bytes(block, m.targets, a, cal.samples, cal.batch_size, cal.seqlen, config, wb)
                for m, _, _, a in refining
                for block in blocks_of(targets_layers)
            )
            calibration_peak = (calibration_peak[0] + refine, calibration_peak[1])
            notes.append(f"block refinement ({', '.join(m.label for m, *_ in refining)}): factors, AdamW, backward")
    if whole_kinds:
        acc, fin = whole_stats_bytes(targets_layers, whole_kinds)
        transient = batch_transient_bytes(targets_layers, whole_kinds, tokens, config, wb)
        if whole_kinds & GRADIENT_KINDS:  # backward of one window: every block's activations kept for the gradient
            transient += 16 * cal.seqlen * hidden * wb * int(c["num_hidden_layers"])
        whole = (weights + acc + fin + transient, 0) if cpu else (weights + acc + transient, fin)
        calibration_peak = max(calibration_peak, whole, key=sum)
        disk = acc + fin  # the whole-model path caches its statistics on disk (about this much)
        notes.append(f"whole: {', '.join(sorted(whole_kinds))}, every layer's statistics, cached on disk")
    if suite.offload:
        notes.append(f"one offloaded block on the device at a time ({suite.offload})")
    data = CALIBRATION_DATA_BYTES if forward or whole_kinds else 0  # the calibration text, read once, kept
    calibration_peak = (calibration_peak[0], calibration_peak[1] + host_w + data)
    plan.stages.append(stage("calibration", *calibration_peak, disk + disk_w, "; ".join(notes) or "no statistics"))

    kept_all = 0
    passed = sum(sum(job.kept) for job in jobs)  # the pass's factors: alive until each method's last cell
    in_pass = pass_factorization_peak(targets_layers, jobs, forward)
    rows = []
    for method, needs, groups, allocators in methods:
        group_layers = [[by_name[n] for n in g if n in by_name] for g in groups]
        kept = kept_bytes(targets_layers, method.targets, allocators, storage)
        kept_all += kept
        if method.label in in_pass:  # the block pass: its costliest group, the factors kept before it
            rows.append((method.label, *in_pass[method.label], 0))
            continue
        working = max((working_set_bytes(g, needs) for g in group_layers), default=0)
        held = sum(whole_stats_bytes(targets_layers, needs)) if needs else 0
        rows.append((method.label, working + held, passed, 0 if on_disk else kept))
    if rows:
        label, math, before, own = max(rows, key=lambda r: r[1] + r[2] + r[3])
        where = "memory-mapped files (page cache, not RSS)" if on_disk else kept_dtype
        note = (
            f"{label}: largest group's float64 math; kept factors ({where}) of "
            f"{'the block pass so far' if label in in_pass else 'the block pass and the method'}"
        )
        plan.stages.append(stage("factorization", weights + math, host_w + before + own + data, disk_w, note))
    else:
        plan.stages.append(stage("factorization", weights, host_w, disk_w, "no methods"))
    store = kept_all if executor == "ray" or on_disk else 0
    if on_disk:
        what = "keep = disk: every method's kept factors in memory-mapped group files (page cache, reclaimable)"
    elif store:
        what = "Ray factstore: every method's kept factors"
    else:
        what = "in host memory (nothing on disk; Ray writes a factstore)"
    plan.stages.append(Stage("factor storage", 0, 0, store, what))
    replaced = max((replaced_bytes(targets_layers, t, a, wb) for m, _, _, a in methods for t in m.targets), default=0)
    tokens = evaluation_tokens(suite)
    logits = evaluation_tokens_bytes(tokens, int(c["vocab_size"]), wb) + forward_bytes(tokens, config, wb)
    alive = passed + max((own for *_, own in rows), default=0)  # the kept factors stay in host memory
    training = tuned_training_bytes(suite, methods, targets_layers, config, wb, plugins)
    step = max(logits, training)  # a tuned cell trains, then evaluates: the larger of the two
    tuned = "; a tuned cell's training step (backward activations, gradients, AdamW moments)" if training else ""
    if suite.offload:  # replacements are offloaded as the Linears they replace (host memory)
        note = "resident model + one block; replacements on the host; kept factors on the host" + tuned
        evaluation = (weights + step, host_w + replaced + alive, note)
    else:
        note = "model + largest replaced layer set + one batch's logits; kept factors on the host" + tuned
        evaluation = (weights + replaced + step, alive, note)
    plan.stages.append(stage("evaluation", evaluation[0], evaluation[1], disk_w, evaluation[2]))
    return plan


def tuned_training_bytes(suite: Suite, methods: list, layers: list, config: dict, wb: int, plugins) -> int:
    """The largest training step (``harness.plan.memory.training_bytes``) of a cell whose method tunes after
    surgery (``Decomposer.tunes``), for one calibration batch at ``calibration.seqlen``; 0 where none tunes."""
    tokens = suite.calibration.batch_size * suite.calibration.seqlen
    return max(
        (
            training_bytes(layers, target, allocators, tokens, config, wb)
            for method, _, _, allocators in methods
            if plugins.get("decomposer", method.name).tunes(method.options)
            for target in method.targets
        ),
        default=0,
    )


def pass_jobs(methods: list, by_name: dict, layers: list, cal, storage: int, streams: int, on_disk: bool) -> list:
    """The block pass's jobs (``PassJob``): one per method it serves (forward statistics only, ``pipeline =
    "blocks"``), one per cell of those under propagated inputs (each keeps its factors for its own (target,
    allocator) alone), with each group's kept bytes in host memory (0 under ``keep = "disk"``)."""
    if cal.pipeline != "blocks":
        return []
    jobs = []
    for method, needs, groups, allocators in methods:
        if not needs or needs & GRADIENT_KINDS:
            continue
        group_layers = [[by_name[n] for n in g if n in by_name] for g in groups]
        pairs = [(t, a) for t in method.targets for a in allocators] if streams else [(method.targets, allocators)]
        for targets, chosen in pairs:
            targets, chosen = (targets, chosen) if not streams else ([targets], [chosen])
            counted: set[str] = set()  # each layer's factors once, at the first group naming it (a group may
            kept = []  # name a partner for its statistics only: BitStack's scale fusion)
            for group in group_layers:
                own = [x for x in group if x.name not in counted]
                counted.update(x.name for x in own)
                kept.append(0 if on_disk else kept_bytes(own, targets, chosen, storage))
            jobs.append(PassJob(method.label, needs, group_layers, kept))
    return jobs


ORIGINAL_STREAM_KINDS = frozenset({"anchor_cross", "gram_original"})
"""Kinds that, under propagated inputs, need one more stream: the uncompressed model's activations."""


def collected_needs(needs: frozenset[str], inputs: str) -> frozenset[str]:
    """What the pass collects for ``needs``: under original inputs ``anchor_cross`` and ``gram_original``
    are the Gram itself (``harness.run.calibration``), under propagated inputs statistics of their own."""
    needs = frozenset(needs)
    if inputs == "propagated" or not needs & ORIGINAL_STREAM_KINDS:
        return needs
    return (needs - ORIGINAL_STREAM_KINDS) | {"gram"}


def propagated_streams(suite: Suite, methods: list, refining: bool = False) -> int:
    """Activation streams of a ``calibration.inputs = "propagated"`` pass: one per cell (target x allocator)
    of every method the pipeline serves (forward statistics only), plus the uncompressed model's where a
    method needs it (``anchor_cross``, ``gram_original``, or ``refining``: block refinement's targets);
    0 under ``original``."""
    if suite.calibration.inputs != "propagated":
        return 0
    forward = FORWARD
    served = [(m, needs, a) for m, needs, _, a in methods if needs and needs <= forward]
    original = refining or any(needs & ORIGINAL_STREAM_KINDS for _, needs, _ in served)  # shared by all
    return sum(len(m.targets) * len(allocators) for m, _, allocators in served) + int(original)


def evaluation_tokens(suite: Suite) -> int:
    """Tokens of one evaluation batch: the largest batch_size x seqlen among the evaluators' options that
    have both (perplexity's), else the calibration's."""
    sizes = [
        c.options.batch_size * c.options.seqlen
        for c in suite.evaluators
        if isinstance(getattr(c.options, "batch_size", None), int)
        and isinstance(getattr(c.options, "seqlen", None), int)
    ]
    return max(sizes, default=suite.calibration.batch_size * suite.calibration.seqlen)


def resolved_dtype(setting: str, device: str) -> str:
    """``dtype = "auto"`` resolved as ``harness.models.resolve_dtype`` does: bfloat16 on CUDA, float32 elsewhere."""
    if setting != "auto":
        return setting
    return "bfloat16" if device.startswith("cuda") else "float32"


def resolve_plan_device(device: str) -> str:
    """``auto`` -> ``cuda`` where a CUDA device is present (asks torch only where an NVIDIA driver is), else ``cpu``."""
    if device != "auto":
        return device
    if not os.path.exists("/proc/driver/nvidia/version"):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def host_memory() -> int:
    """This machine's RAM in bytes (/proc/meminfo's MemTotal, else psutil)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().total)


def device_memory(device: str) -> int | None:
    """Total memory of a CUDA device (``torch.cuda.get_device_properties``); None for the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    index = int(device.partition(":")[2] or 0)
    return int(torch.cuda.get_device_properties(index).total_memory)


def plan_suite(
    suite: Suite,
    device: str | None = None,
    layers: int | None = None,
    memory_gib: float | None = None,
    executor: str = "sequential",
) -> list[Plan]:
    """One plan per model of ``suite``, with the memory of the chosen device (``memory_gib`` overrides it:
    the device's on CUDA, the host's on CPU)."""
    chosen = resolve_plan_device(device or suite.device)
    plans = []
    for spec in suite.models:
        plan = plan_model(suite, spec, chosen, layers, executor)
        override = None if memory_gib is None else int(memory_gib * GiB)
        if plan.on_cpu:
            plan.host_memory = override if override is not None else host_memory()
        else:
            plan.device_memory = override if override is not None else device_memory(chosen)
            plan.host_memory = host_memory()
        plans.append(plan)
    return plans


def refusal(plan: Plan, suite: Suite) -> str | None:
    """One line for ``harness run``'s refusal where ``plan`` exceeds the device, else None."""
    over = plan.exceeded()
    if over is None:
        return None
    stage, what, need, have = over
    cal = suite.calibration
    advice = {
        "load": 'a smaller dtype (dtype = "bfloat16"), device_map = "auto", offload = "disk" '
        '("cpu" on a GPU) or --layers',
        "calibration": f"lower calibration.samples ({cal.samples}), calibration.seqlen ({cal.seqlen}) or "
        f"calibration.batch_size ({cal.batch_size})"
        + ("" if cal.pipeline == "blocks" else ', or set calibration.pipeline = "blocks"')
        + ("" if cal.inputs == "original" else ', fewer targets x allocators, or calibration.inputs = "original"'),
        "factorization": (
            'set [factorization] storage_dtype = "float32", ' if suite.factorization.storage_dtype != "float32" else ""
        )
        + "fewer methods per suite, a device with more memory, or --layers",
        "factor storage": "fewer methods per suite",
        "evaluation": "lower calibration.batch_size or --layers",
    }[stage.name]
    return (
        f"plan: {plan.model}: stage {stage.name} needs {need / GiB:.2f} GiB of {what}, {have / GiB:.2f} GiB "
        f"available; {advice} (or --no-plan-check to run anyway)"
    )


def check_run(suite, memory_gib: float | None, executor: str) -> None:
    """HarnessError (exit 2, one line naming the stage and the setting to change) where a model's plan
    exceeds the device's memory (``harness.plan``). A plan that cannot be made is a one-line note; under
    ``--executor ray`` the check runs only with ``--memory`` (the cells run on the cluster's machines)."""
    if executor == "ray" and memory_gib is None:  # the cells run on the cluster's machines, not this one
        return
    try:
        plans = plan_suite(suite, memory_gib=memory_gib, executor=executor)
    except Exception:  # a model the planner cannot read is no reason to refuse the run: loading it will say
        # what is wrong with it (one error line), so this is a note without the planner's own reason
        print(
            "[harness] no memory plan for this run (its config cannot be read alone); running unchecked",
            file=sys.stderr,
        )
        return
    for plan in plans:
        line = refusal(plan, suite)
        if line is not None:
            raise HarnessError(line)
