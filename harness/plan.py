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
workspace is not counted).

Decodable layers: Llama-family decoders (llama, mistral, qwen2, qwen3: every
config in harness/shapes) are laid out from the config (q, k, v, o, gate, up,
down per block; the LM head under ``surgery.lm_head``). Any other
``model_type`` is built on the meta device (torch, no memory) to list its
Linears.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import LayerInfo
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.suite import Suite

GiB = 2**30
FLOAT64 = 8
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
RUNTIME_BYTES = int(0.37 * GiB)
"""Host memory of the process before any model: Python with torch and transformers imported (measured on
this CPU build: 0.37 GiB peak RSS)."""
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})
SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
"""Kinds of one block that receive the very same input tensor (the pipeline keeps one accumulator for them)."""
EMBEDDED_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
"""SmolLM2-135M's sizes (the embedded model), used until its conversion's config.json is cached."""
STAGES = ("load", "calibration", "factorization", "factor storage", "evaluation")


# ---------------------------------------------------------------- the model, from its config
def model_config(spec: str, layers: int | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's config as a dict (no weights read; see the module docstring for each kind of spec)."""
    from harness import shapes

    if shapes.is_random(spec):
        return shapes.parse_random_spec(spec, layers).config()
    if layers is not None:
        raise HarnessError(f"model: layers: applies to random:<shape> models only, got {spec!r}")
    if spec == "embedded":
        return _embedded_config()
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    source = str(path) if path.exists() else spec
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing or unreadable config: the input's
        from harness.errors import first_line

        raise HarnessError(f"plan: expected a model with a config.json, got {spec!r}: {first_line(exc, 300)}") from None
    return config.to_dict()


def _embedded_config() -> dict[str, Any]:
    from harness.files import cache_dir

    for candidate in sorted((cache_dir() / "models").glob("*/config.json")):
        try:
            config = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if config.get("hidden_size") == EMBEDDED_CONFIG["hidden_size"]:
            return config
    return dict(EMBEDDED_CONFIG)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def head_dim(config: dict[str, Any]) -> int:
    """``head_dim`` where the config sets it, else hidden_size / num_attention_heads."""
    c = _text_config(config)
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def linear_layers(config: dict[str, Any], kinds: Sequence[str] | None = None, lm_head: bool = False) -> list[LayerInfo]:
    """The decomposable Linears (``harness.surgery.find_linears``'s list) from the config.

    Llama family, per block i (``model.layers.i``): q (H·d, h), k and v (Hkv·d, h), o (h, H·d),
    gate and up (I, h), down (h, I); h hidden, I intermediate, H heads, Hkv key/value heads, d head_dim;
    ``lm_head`` (V, h) last where asked. Other decoders: built on the meta device.
    """
    c = _text_config(config)
    if c.get("model_type") not in LLAMA_FAMILY:
        return _meta_linears(config, kinds, lm_head)
    h, inter, d = int(c["hidden_size"]), int(c["intermediate_size"]), head_dim(c)
    q, kv = int(c["num_attention_heads"]) * d, int(c.get("num_key_value_heads") or c["num_attention_heads"]) * d
    block = [
        ("self_attn.q_proj", (q, h)),
        ("self_attn.k_proj", (kv, h)),
        ("self_attn.v_proj", (kv, h)),
        ("self_attn.o_proj", (h, q)),
        ("mlp.gate_proj", (inter, h)),
        ("mlp.up_proj", (inter, h)),
        ("mlp.down_proj", (h, inter)),
    ]
    layers = []
    for i in range(int(c["num_hidden_layers"])):
        for suffix, shape in block:
            kind = suffix.rsplit(".", 1)[-1]
            if kinds is None or kind in kinds:
                layers.append(LayerInfo(f"model.layers.{i}.{suffix}", kind, i, shape))
    if lm_head:
        layers.append(LayerInfo("lm_head", "lm_head", None, (int(c["vocab_size"]), h)))
    return layers


def _meta_linears(config: dict[str, Any], kinds, lm_head: bool) -> list[LayerInfo]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.surgery import find_linears

    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    built = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(built)
    return find_linears(model, kinds, lm_head)


def param_count(config: dict[str, Any]) -> int:
    """Parameters of the whole model: embeddings V·h, per block its Linears (+ q/k/v biases for qwen2)
    and two norms (2h), the final norm h, and the LM head V·h unless tied to the embeddings."""
    c = _text_config(config)
    h, vocab = int(c["hidden_size"]), int(c["vocab_size"])
    total = vocab * h + h + (0 if c.get("tie_word_embeddings") else vocab * h)
    return total + int(c["num_hidden_layers"]) * block_params(c)


def block_params(config: dict[str, Any]) -> int:
    """Parameters of one decoder block (its seven Linears, qwen2's q/k/v biases, two norms)."""
    c = dict(_text_config(config), num_hidden_layers=1)
    linears = linear_layers(c)
    total = sum(m * n for _, _, _, (m, n) in (_fields(x) for x in linears)) + 2 * int(c["hidden_size"])
    if c.get("model_type") == "qwen2" or c.get("attention_bias"):
        total += sum(x.shape[0] for x in linears if x.kind in ("q_proj", "k_proj", "v_proj"))
    return total


def _fields(layer: LayerInfo) -> tuple:
    return layer.name, layer.kind, layer.index, layer.shape


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

    Accumulators: the Gram n² (``gram``), |x| sums n (``abs_mean``), x² sums n (either);
    finished: abs_mean n and sq_mean n (divided copies; the Gram is finished in place on the CPU).
    """
    if not kinds & {"gram", "abs_mean"}:
        return 0, 0
    abs_ = n if "abs_mean" in kinds else 0
    accumulator = (n * n if "gram" in kinds else 0) + abs_ + n
    return FLOAT64 * accumulator, FLOAT64 * (abs_ + n)


def block_stats_bytes(block: Sequence[LayerInfo], kinds: frozenset[str], shared: bool = True) -> tuple[int, int]:
    """(accumulators, finished) bytes of one block's statistics for ``kinds``.

    Inputs: ``input_stats_bytes`` once per distinct input (``input_groups``; once per layer where
    ``shared`` is False, as on the whole-model path); ``out_cov``: m² float64 per layer (finished in place);
    ``fisher``: n + m float64 per layer.
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
    c = _text_config(config)
    worst = 0
    for layer in layers:
        m, n = layer.shape
        size = 0
        if kinds & {"gram", "abs_mean"}:
            size += FLOAT64 * tokens * n + (FLOAT64 * n * n if "gram" in kinds else 0)
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
    c = _text_config(config)
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

    plan.stages.append(stage("load", weights, 0, 0, f"{param_count(config) / 1e9:.2f} B parameters in {dtype}"))

    methods = []
    for method in suite.methods:
        decomposer = plugins.get("decomposer", method.name)
        allocators = [plugins.get("allocator", a.name) for a in method.allocators]
        methods.append(
            (method, frozenset(decomposer.needs), decomposer.groups(targets_layers, method.options), allocators)
        )
    forward = frozenset().union(*(n for _, n, _, _ in methods)) & frozenset({"gram", "abs_mean", "out_cov"})
    whole_kinds = frozenset().union(*(n for _, n, _, _ in methods)) if cal.pipeline == "whole" else frozenset()
    if cal.pipeline == "blocks":
        whole_kinds = frozenset().union(*(n for _, n, _, _ in methods if "fisher" in n))
        forward = frozenset().union(*(n for _, n, _, _ in methods if "fisher" not in n)) & forward
    by_name = {x.name: x for x in targets_layers}
    tokens = cal.batch_size * cal.seqlen
    activations = activations_bytes(cal.samples, cal.seqlen, hidden, wb)
    calibration_peak = (weights, 0)  # the model stays where it was loaded
    notes = []
    disk = 0
    if forward:
        accumulators = max((block_stats_bytes(b, forward)[0] for b in blocks_of(targets_layers)), default=0)
        finished = pipeline_stats_peak(targets_layers, forward) - accumulators
        transient = batch_transient_bytes(targets_layers, forward, tokens, config, wb)
        if cpu:
            calibration_peak = (weights + accumulators + finished + activations + transient, 0)
        else:
            calibration_peak = (weights + accumulators + activations + transient, accumulators + finished)
        notes.append(f"blocks: {', '.join(sorted(forward))}, one block's statistics")
    if whole_kinds:
        acc, fin = whole_stats_bytes(targets_layers, whole_kinds)
        transient = batch_transient_bytes(targets_layers, whole_kinds, tokens, config, wb)
        if "fisher" in whole_kinds:  # backward of one window: every block's activations kept for the gradient
            transient += 16 * cal.seqlen * hidden * wb * int(c["num_hidden_layers"])
        whole = (weights + acc + fin + transient, 0) if cpu else (weights + acc + transient, fin)
        calibration_peak = max(calibration_peak, whole)
        disk = acc + fin  # the whole-model path caches its statistics on disk (about this much)
        notes.append(f"whole: {', '.join(sorted(whole_kinds))}, every layer's statistics, cached on disk")
    plan.stages.append(stage("calibration", *calibration_peak, disk, "; ".join(notes) or "no statistics"))

    storage = DTYPE_BYTES[suite.factorization.storage_dtype]
    kept_all = 0
    passed = 0  # the block pass keeps every method it served until the session ends (Prepared._jobs)
    rows = []
    for method, needs, groups, allocators in methods:
        group_layers = [[by_name[n] for n in g if n in by_name] for g in groups]
        working = max((working_set_bytes(g, needs) for g in group_layers), default=0)
        kept = kept_bytes(targets_layers, method.targets, allocators, storage)
        kept_all += kept
        blockwise = cal.pipeline == "blocks" and bool(needs) and "fisher" not in needs
        if blockwise:  # the statistics of the largest group's blocks, held while it is factorized
            held = sum(block_stats_bytes(b, needs)[1] for b in blocks_of(max(group_layers, key=len, default=[])))
            passed += kept
        else:
            held = sum(whole_stats_bytes(targets_layers, needs)) if needs else 0
        rows.append((method.label, working + held, 0 if blockwise else kept))
    if rows:
        label, math, own = max(rows, key=lambda r: r[1] + r[2])
        note = (
            f"{label}: largest group's float64 math; kept factors ({suite.factorization.storage_dtype}) of "
            f"{'every method of the block pass' if passed else 'the method'}"
        )
        plan.stages.append(stage("factorization", weights + math, passed + own, 0, note))
    else:
        plan.stages.append(stage("factorization", weights, 0, 0, "no methods"))
    store = kept_all if executor == "ray" else 0
    plan.stages.append(
        Stage(
            "factor storage",
            0,
            0,
            store,
            "Ray factstore: every method's kept factors"
            if store
            else "in host memory (nothing on disk; Ray writes a factstore)",
        )
    )
    replaced = max((replaced_bytes(targets_layers, t, a, wb) for m, _, _, a in methods for t in m.targets), default=0)
    logits = cal.batch_size * cal.seqlen * int(c["vocab_size"]) * 4
    plan.stages.append(stage("evaluation", weights + replaced + logits, 0, 0, "model + largest replaced layer set"))
    return plan


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
        "load": 'a smaller dtype (dtype = "bfloat16"), device_map = "auto" or --layers',
        "calibration": f"lower calibration.samples ({cal.samples}), calibration.seqlen ({cal.seqlen}) or "
        f"calibration.batch_size ({cal.batch_size})"
        + ("" if cal.pipeline == "blocks" else ', or set calibration.pipeline = "blocks"'),
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
