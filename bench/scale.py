"""Peak RSS and time per stage of a whole `harness run`: the all-at-once path against the block pipeline.

A random Llama-2-7B-shaped model (``random:llama-2-7b?layers=N[&scale=F]``,
seeded normal weights, float32, CPU) with N blocks, one method, one target
(keep 0.8), one cell. Every configuration (method, width, N, path) is one
``harness run`` in its own child process (``ru_maxrss`` only grows), one after
another, never two at once. In the child a sampling thread reads the resident
set every few milliseconds and charges it to the stage running then; stage
boundaries are wrappers around the run's own functions (load_model, the
statistics pass, ``factorize_group`` + ``keep``, the cell's ``compress`` +
``measure``), and ``ru_maxrss`` read at every boundary makes each stage's peak
exact where the process's peak fell in it.

Stages: load; data (reading and tokenizing the calibration text, once);
calibration (statistics; on the block path everything of
``run_blocks`` except the factorizations it calls); factorization (every
``factorize_group`` + ``keep``); baseline (the dense model's perplexity); cell
(allocation, surgery and perplexity of the one compressed cell).

Per configuration it also counts the statistics tensors (the block pipeline's
``LiveStats`` peak; the whole-model pass's returned statistics), the kept
factors (bytes of the tensors ``keep`` returns) and the float64
factorizations before compaction, and sets them beside the planner's figures
(``harness.plan``: per stage and per block), then extrapolates to 32 and 80
blocks with the plan's figure for the same depth beside each.

    python bench/scale.py --json bench/results/scale-cpu.json      # ~35 min on 2 cores
    python bench/scale.py --quick                                    # a minute: the smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402

GiB = 2**30
MiB = 2**20
METHODS = ("svd-llm", "sfsd", "fwsvd", "svd", "bitstack")
OPTIONS = ("offload", "keep", "kinds")
"""A configuration's optional suite settings (``suite_text``), kept in its row where set."""
STAGES = ("load", "data", "calibration", "factorization", "baseline", "cell")
PLAN_STAGE = {"load": "load", "calibration": "calibration", "factorization": "factorization", "cell": "evaluation"}
METHOD_TOML = {
    "bitstack": 'name = "bitstack"\noptions = { niter = 16, k = 16, svd = "lowrank" }\n'
    'allocators = [{ name = "bitstack-order", options = { score = "proxy" } }]\ntargets = [{ bits = 4.0 }]\n',
}
"""Method tables other than ``name = "<method>"``: BitStack as suites/trawl_bitstack.toml runs it (its own
allocator and a bits target; keep 0.8 is a params target, which BitStack's ranks do not reach)."""


# ---------------------------------------------------------------- the suite of one configuration
def spec(blocks: int, scale: int) -> str:
    return f"random:llama-2-7b?layers={blocks}" + (f"&scale={scale}" if scale != 1 else "")


def suite_text(method: str, pipeline: str, c: dict) -> str:
    """The suite of one configuration; ``c``'s optional ``offload`` (top-level ``offload``), ``keep``
    (``[factorization] keep``) and ``kinds`` (``[surgery] kinds``) only where set (else the defaults)."""
    table = METHOD_TOML.get(method, f'name = "{method}"\n')
    offload = f'offload = "{c["offload"]}"\n' if c.get("offload") else ""
    extra = f'\n[factorization]\nkeep = "{c["keep"]}"\n' if c.get("keep") else ""
    if c.get("kinds"):
        extra += f"\n[surgery]\nkinds = {json.dumps(list(c['kinds']))}\n"
    return f"""
name = "scale"
device = "cpu"
dtype = "float32"
seed = 0
{offload}models = ["{spec(c["blocks"], c["scale"])}"]
targets = [0.8]
allocators = ["uniform"]
{extra}
[calibration]
source = "lambada"
samples = {c["samples"]}
seqlen = {c["seqlen"]}
batch_size = {c["batch_size"]}
pipeline = "{pipeline}"

[[methods]]
{table}
[[evaluators]]
name = "perplexity"
options = {{ source = "wiki-passages", seqlen = {c["eval_seqlen"]}, max_windows = {c["eval_windows"]} }}
"""


# ---------------------------------------------------------------- measuring in the child
def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class Stages:
    """The stage running now (a stack: a factorization inside the block pass), each stage's peak RSS and its
    own seconds; a thread samples the RSS every ``interval`` s."""

    def __init__(self, interval: float = 0.005, cuda: bool = False) -> None:
        self.stack = ["start"]
        self.peak: dict[str, int] = {}
        self.cuda = cuda
        """Also each stage's peak of CUDA memory allocated by torch (``max_memory_allocated``, reset per stage)."""
        self.device_peak: dict[str, int] = {}
        self.on_switch = None
        """Called (with this object) after every stage boundary: gpu_check.py saves its progress there."""
        self.seconds: dict[str, float] = {}
        self.since = time.perf_counter()
        self.maxrss = rss_peak()
        self.interval = interval
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _charge(self, value: int) -> None:
        stage = self.stack[-1]
        if value > self.peak.get(stage, 0):
            self.peak[stage] = value

    def _sample(self) -> None:
        while not self.done.wait(self.interval):
            value = rss_now()
            with self.lock:
                self._charge(value)

    def _switch(self, push: str | None) -> None:
        with self.lock:
            now, top = time.perf_counter(), rss_peak()
            self._charge(rss_now())
            if top > self.maxrss:  # the process's peak fell in the stage ending now
                self._charge(top)
                self.maxrss = top
            stage = self.stack[-1]
            if self.cuda:
                import torch

                used = torch.cuda.max_memory_allocated()
                self.device_peak[stage] = max(self.device_peak.get(stage, 0), used)
                torch.cuda.reset_peak_memory_stats()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.since
            self.since = now
            if push is None:
                self.stack.pop()
            else:
                self.stack.append(push)
        if self.on_switch is not None:
            self.on_switch(self)

    @contextmanager
    def stage(self, name: str):
        self._switch(name)
        try:
            yield
        finally:
            self._switch(None)

    def wrap(self, owner, attribute: str, name, patches: list) -> None:
        """``owner.attribute`` run inside stage ``name`` (or ``name(*args)``, a function choosing it)."""
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            with self.stage(name(*args) if callable(name) else name):
                return original(*args, **kwargs)

        patches.append(mock.patch.object(owner, attribute, wrapped))

    def stop(self) -> None:
        self._switch("end")
        self.done.set()
        self.thread.join()


def held_bytes(value, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``value`` (attributes, containers; 4 levels)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen or value.device.type == "meta":
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if depth >= 4 or isinstance(value, str | bytes | int | float | type(None)):
        return 0
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, list | tuple | set):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return 0
    return sum(held_bytes(item, seen, depth + 1) for item in items)


def child(config: dict) -> dict:
    """One configuration's ``harness run`` in this process, measured (see the module docstring)."""
    import torch

    torch.set_num_threads(config["threads"])
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        path = Path(tmp) / "suite.toml"
        path.write_text(suite_text(config["method"], config["pipeline"], config))
        measured = measure_suite(path, Path(tmp))
    keys = ("method", "pipeline", "blocks", "scale", *(k for k in OPTIONS if config.get(k)))
    return {**{k: config[k] for k in keys}, **measured}


def measure_suite(path: Path, work: Path, model: str | None = None, device: str | None = None, on_switch=None) -> dict:
    """``harness run`` of the suite file ``path`` in this process (results and statistics under ``work``),
    each stage's peak RSS and seconds (and peak CUDA memory on a CUDA device), the bytes counted."""
    from dataclasses import replace

    from harness.run import blockwise, pipeline, prepare, session
    from harness.run.env import RunOptions
    from harness.run.runner import run_suite
    from harness.suite import load_suite

    suite = load_suite(path)
    if model is not None:
        suite = replace(suite, models=[model])
    if device is not None:
        suite = replace(suite, device=device)
    runtime_rss = rss_now()
    stages = Stages(cuda=suite.device.startswith("cuda"))
    stages.on_switch = on_switch
    counts = {"stats_whole": 0, "stats_blocks": 0, "kept": 0, "raw": 0, "groups": 0, "model_rss": 0}
    trackers: list = []
    patches: list = []

    def load_model(*args, **kwargs):  # under offload it returns the model dispatched (its blocks offloaded)
        with stages.stage("load"):
            loaded = session_load(*args, **kwargs)
        counts["model_rss"] = rss_now()  # what stays resident once the blocks are offloaded
        return loaded

    session_load = session.load_model
    patches.append(mock.patch.object(session, "load_model", load_model))
    stages.wrap(pipeline, "run_blocks", "calibration", patches)
    stats_original = prepare.Prepared.stats

    def stats(self, needs):
        with stages.stage("calibration"):
            result = stats_original(self, needs)
        counts["stats_whole"] = max(counts["stats_whole"], held_bytes(result))
        return result

    patches.append(mock.patch.object(prepare.Prepared, "stats", stats))
    stages.wrap(prepare.Prepared, "batches", "data", patches)
    for module in (prepare, blockwise):
        stages.wrap(module, "factorize_group", "factorization", patches)
        keep_original = module.keep

        def keep(raw, *args, _keep=keep_original, **kwargs):
            with stages.stage("factorization"):
                kept = _keep(raw, *args, **kwargs)
            counts["raw"] += held_bytes(raw)
            counts["kept"] += held_bytes(kept, set())
            counts["groups"] += 1
            return kept

        patches.append(mock.patch.object(module, "keep", keep))
    job_original = blockwise.BlockFactorizer.job

    def job(self, *args, **kwargs):  # a group's factorize_group and keep as one stage: the raw factorization
        made = job_original(self, *args, **kwargs)  # alive between the two is the factorization's, not the pass's
        factorize = made.factorize

        def staged(group, group_stats):
            with stages.stage("factorization"):
                return factorize(group, group_stats)

        made.factorize = staged
        return made

    patches.append(mock.patch.object(blockwise.BlockFactorizer, "job", job))
    init_original = blockwise.BlockFactorizer.__init__

    def init(self, *args, **kwargs):
        init_original(self, *args, **kwargs)
        self.tracker = pipeline.LiveStats()
        trackers.append(self.tracker)

    patches.append(mock.patch.object(blockwise.BlockFactorizer, "__init__", init))
    stages.wrap(session, "compress", "cell", patches)

    def cell_or_baseline(env, prepared, cell, replacements, dense) -> str:
        return "cell" if replacements else "baseline"

    stages.wrap(session, "measure", cell_or_baseline, patches)
    options = RunOptions(results_root=work / "results", force=True, progress=False, calibration_cache=work / "cal")
    for p in patches:
        p.start()
    started = time.perf_counter()
    try:
        summary = run_suite(suite, options)
    finally:
        for p in reversed(patches):
            p.stop()
    wall = time.perf_counter() - started
    stages.stop()
    counts["stats_blocks"] = max((t.peak for t in trackers), default=0)
    return {
        "runtime_rss": runtime_rss,
        "peak_rss": rss_peak(),
        "stage_peak": {s: stages.peak.get(s, 0) for s in STAGES if s in stages.seconds},
        "stage_device_peak": {s: stages.device_peak[s] for s in STAGES if s in stages.device_peak},
        "stage_seconds": {s: round(stages.seconds[s], 3) for s in STAGES if s in stages.seconds},
        "wall_seconds": round(wall, 3),
        **counts,
        "failed": [f"{r.cell_id}: {r.error and r.error.get('message')}" for r in summary.results if not r.ok],
        "metrics": {k: v for r in summary.results if r.method for k, v in r.metrics.items()},
    }


# ---------------------------------------------------------------- the plan beside it
def plan_figures(method: str, pipeline: str, c: dict, blocks: int) -> dict:
    """The planner's figures for one configuration at depth ``blocks`` (any depth: the config's layer count is
    set directly, so 80 blocks of the 7B width can be planned too), torch-free."""
    import harness.plan as plan
    from harness import shapes
    from harness.suite import load_suite

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "suite.toml"
        path.write_text(suite_text(method, pipeline, {**c, "blocks": 1}))
        suite = load_suite(path)
    config = shapes.parse_random_spec(spec(1, c["scale"])).config()
    config["num_hidden_layers"] = blocks
    with mock.patch.object(plan, "model_config", lambda *a, **k: dict(config)):
        stages = plan.plan_model(suite, f"llama-2-7b x{blocks}", "cpu").stages
    one = plan.linear_layers({**config, "num_hidden_layers": 1}, suite.surgery.kinds)
    decomposer = plan_decomposer(method)
    methods = suite.methods[0]
    # what the pass collects for the method's options (svd-llm's gram_original only for its closed-form update)
    needs = plan.collected_needs(decomposer.needs_for(methods.options), suite.calibration.inputs)
    from harness.plugins import get_plugins

    allocators = [get_plugins().get("allocator", a.name) for a in methods.allocators]
    forward = needs & plan.FORWARD
    blockwise = pipeline == "blocks" and forward and not needs & {"fisher", "grad"}
    stats = sum(plan.block_stats_bytes(one, needs, shared=bool(blockwise)))
    return {
        "host": {s.name: s.host for s in stages},
        "stats_per_block": stats,
        "kept_per_block": plan.kept_bytes(one, methods.targets, allocators, 4),
        "weights_per_block": plan.block_params(config) * 4,
    }


def row_options(row: dict) -> dict:
    """The width and the optional suite settings of a result row (what ``plan_figures`` needs beyond ``c``)."""
    return {"scale": row["scale"], **{k: row[k] for k in OPTIONS if row.get(k)}}


def plan_decomposer(method: str):
    from harness.plugins import get_plugins

    return get_plugins().get("decomposer", method)


# ---------------------------------------------------------------- the parent
def configurations(args) -> list[dict]:
    """Reduced width (``--scale``): every method at each N; then full width: ``--full-width-methods`` at each
    ``--full-width-blocks`` N (last: the longest, and the largest peaks)."""
    runs = []
    for method in args.methods:
        for blocks in args.blocks:
            for pipeline in ("whole", "blocks"):
                if pipeline in args.paths:
                    runs.append({"method": method, "pipeline": pipeline, "blocks": blocks, "scale": args.scale})
    for method in args.full_width_methods:
        for blocks in args.full_width_blocks:
            for pipeline in ("blocks", "whole"):
                if pipeline in args.paths:
                    runs.append({"method": method, "pipeline": pipeline, "blocks": blocks, "scale": 1})
    options = {k: v for k in ("offload", "keep", "kinds") if (v := getattr(args, k))}
    return [{**r, **options} for r in runs]


def common_config(args) -> dict:
    keys = ("samples", "seqlen", "batch_size", "eval_seqlen", "eval_windows", "threads")
    return {k: getattr(args, k) for k in keys}


def replan(outcome: dict) -> dict:
    """``outcome`` (a ``--json`` file's figures) with the plan's figures computed afresh (after a planner fix)."""
    c = {k: outcome["config"][k] for k in ("samples", "seqlen", "batch_size", "eval_seqlen", "eval_windows", "threads")}
    for row in outcome["rows"]:
        if "error" not in row:
            row["plan"] = plan_figures(row["method"], row["pipeline"], {**c, **row_options(row)}, row["blocks"])
    outcome["extrapolated"] = extrapolate(outcome["rows"], c)
    return outcome


def run(args) -> dict:
    if args.replan:
        merged = json.loads(args.replan[0].read_text())  # its "command" (where recorded): the measurement's
        for more in args.replan[1:]:
            merged["rows"] += json.loads(more.read_text())["rows"]
        merged["config"]["models"] = sorted({spec(r["blocks"], r["scale"]) for r in merged["rows"]})
        merged["config"]["shapes"] = {str(s): shape_of(s) for s in sorted({r["scale"] for r in merged["rows"]})}
        return replan(merged)
    if args.quick:
        args.full_width_methods, args.methods, args.blocks, args.scale = [], ["svd-llm"], [1, 2], 16
        args.samples, args.seqlen, args.eval_windows = 2, 128, 1
    c = common_config(args)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for run_config in configurations(args):
        label = f"{run_config['method']} {run_config['pipeline']} N={run_config['blocks']} scale={run_config['scale']}"
        print(f"[scale] {label} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--child", json.dumps({**c, **run_config})]
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            rows.append({**run_config, "error": out.stderr.strip().splitlines()[-1:]})
            print(f"[scale] {label} FAILED: {out.stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["plan"] = plan_figures(row["method"], row["pipeline"], {**c, **row_options(row)}, row["blocks"])
        print(f"[scale] {label}: peak {row['peak_rss'] / GiB:.2f} GiB, {row['wall_seconds']:.0f} s", file=sys.stderr)
        rows.append(row)
        if args.json:  # the figures so far, in case a later configuration does not finish
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(outcome(rows, c, args.threads), indent=2) + "\n")
    return outcome(rows, c, args.threads)


def outcome(rows: list[dict], c: dict, threads: int) -> dict:
    return {
        "command": " ".join(["python", "bench/scale.py", *sys.argv[1:]]),
        "config": {
            **c,
            "device": "cpu",
            "dtype": "float32",
            "seed": 0,
            "target": "keep 0.8 (params), uniform; bitstack: bits 4.0, bitstack-order (proxy)",
            "models": sorted({spec(r["blocks"], r["scale"]) for r in rows}),
            "shapes": {str(s): shape_of(s) for s in sorted({r["scale"] for r in rows})},
        },
        "machine": machine_info(threads),
        "rows": rows,
        "extrapolated": extrapolate(rows, c),
    }


def shape_of(scale: int) -> dict:
    from harness import shapes

    config = shapes.parse_random_spec(spec(1, scale)).config()
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {k: config[k] for k in keys}


def machine_info(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    return {"device": "cpu", **machine()}


def extrapolate(rows: list[dict], c: dict) -> list[dict]:
    """Per (method, path, width): the per-block bytes measured (statistics, kept factors, float64 before
    compaction) against the plan's, and the calibration and factorization peaks at 32 and 80 blocks: the
    peak measured at the largest N plus, per further block, what grows per block as measured (its weights
    and kept factors; the statistics too where every block's are alive at once), the plan's figure for the
    same depth beside each (the block path's calibration grows by the kept factors too: ``harness.plan``'s
    ``pass_calibration_peak``). (A linear fit of the RSS over N = 1, 2, 4 would extrapolate the allocator's
    noise: at a reduced width a block adds less than that noise.)"""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            options = json.dumps({k: r[k] for k in OPTIONS if r.get(k)}, sort_keys=True)
            groups.setdefault((r["method"], r["pipeline"], r["scale"], options), []).append(r)
    out = []
    for (method, pipeline, scale, _), members in groups.items():
        members.sort(key=lambda r: r["blocks"])
        last = members[-1]
        cc = {**c, **row_options(last)}
        per_block_kept = last["kept"] / last["blocks"]
        every_block = pipeline == "whole" or "fisher" in plan_decomposer(method).needs
        per_block_stats = last["stats_whole"] / last["blocks"] if every_block else last["stats_blocks"]
        entry = {
            "method": method,
            "pipeline": pipeline,
            "scale": scale,
            "measured_blocks": [r["blocks"] for r in members],
            "per_block": {
                "kept": per_block_kept,
                "raw_float64": last["raw"] / last["blocks"],
                "stats": per_block_stats,
                "plan_kept": last["plan"]["kept_per_block"],
                "plan_stats": last["plan"]["stats_per_block"],
                "weights": last["plan"]["weights_per_block"],
            },
        }
        for stage in ("calibration", "factorization"):
            measured = last["stage_peak"].get(stage)
            if not measured:
                continue
            # a block's weights, where they stay in host memory (offload = "disk": memory-mapped, one at a time)
            weights = last["plan"]["weights_per_block"] * (last.get("offload") != "disk")
            grows = weights + (per_block_stats if every_block else 0)
            # the kept factors: in factorization on both paths; in calibration on the block path too, where
            # each block collects with every earlier block's factors alive (none in RSS under keep = "disk")
            kept_in_rss = per_block_kept * (last.get("keep") != "disk")
            grows += kept_in_rss * (stage == "factorization" or (pipeline == "blocks" and not every_block))
            for depth in (32, 80):
                entry.setdefault(stage, {})[str(depth)] = {
                    "measured": measured + grows * (depth - last["blocks"]),
                    "plan": plan_figures(method, pipeline, cc, depth)["host"][stage],
                }
        out.append(entry)
    return out


# ---------------------------------------------------------------- the tables
def gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def render(outcome: dict) -> str:
    c = outcome["config"]
    rows = [r for r in outcome["rows"] if "error" not in r]
    lines = [
        f"Llama-2-7B shapes, float32, CPU, {outcome['machine']['threads']} thread(s); calibration {c['samples']} x "
        f"{c['seqlen']} tokens (batch {c['batch_size']}); perplexity {c['eval_windows']} x {c['eval_seqlen']}",
        *stage_table(rows),
        *[f"FAILED: {r['method']} {r['pipeline']} N={r['blocks']} scale={r['scale']}: {r['error']}"
          for r in outcome["rows"] if "error" in r],
        *ratio_table(rows),
        *growth_table(rows),
        *per_block_table(outcome["extrapolated"]),
        *extrapolation_table(outcome["extrapolated"]),
    ]  # fmt: skip
    return "\n".join(lines)


def width(scale: int) -> int:
    return shape_of(scale)["hidden_size"]


def path_label(r: dict) -> str:
    """The path, with the row's optional settings (offload, keep, kinds) where set."""
    extra = [f"{k} {' '.join(r[k]) if k == 'kinds' else r[k]}" for k in OPTIONS if r.get(k)]
    return ", ".join([r["pipeline"], *extra])


def stage_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "peak RSS GiB per stage [plan's host figure]; seconds of load/calibration/factorization/cell",
        "| method | width | N | path | load | calibration | factorization | cell | peak | model | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, s, t = r["plan"]["host"], r["stage_peak"], r["stage_seconds"]
        stages = ("load", "calibration", "factorization", "cell")
        cells = [f"{gib(s[x])} [{gib(p[PLAN_STAGE[x]])}]" if x in s else f"- [{gib(p[PLAN_STAGE[x]])}]" for x in stages]
        times = "/".join(f"{t.get(x, 0):.0f}" for x in stages)
        lines.append(
            f"| {r['method']} | {width(r['scale'])} | {r['blocks']} | {path_label(r)} | {' | '.join(cells)} | "
            f"{gib(r['peak_rss'])} | {gib(r['model_rss'])} | {times} |"
        )
    return lines


def ratio_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "whole / blocks: the process's peak RSS, and the peak above the model after load",
        "| method | width | N | peak ratio | above-model ratio |",
        "|---|---|---|---|---|",
    ]
    by = {(r["method"], r["scale"], r["blocks"], r["pipeline"]): r for r in rows}
    for (method, scale, blocks, pipeline), r in by.items():
        other = by.get((method, scale, blocks, "whole"))
        if pipeline == "blocks" and other is not None:
            above = (other["peak_rss"] - other["model_rss"]) / max(1, r["peak_rss"] - r["model_rss"])
            ratio = other["peak_rss"] / r["peak_rss"]
            lines.append(f"| {method} | {width(scale)} | {blocks} | {ratio:.2f} | {above:.2f} |")
    return lines


def growth_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "growth with N of the calibration+factorization peak above the model (and above the model and the kept "
        "factors), N=max / N=1",
        "| method | width | path | above model N=1 | N=max | ratio | without kept factors N=1 | N=max | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, scale, pipeline in sorted({(r["method"], r["scale"], r["pipeline"]) for r in rows}):
        series = sorted(
            (r for r in rows if (r["method"], r["scale"], r["pipeline"]) == (method, scale, pipeline)),
            key=lambda r: r["blocks"],
        )
        if len(series) < 2:
            continue
        low, high = series[0], series[-1]
        a, b = working(low, False), working(high, False)
        x, y = working(low), working(high)
        lines.append(
            f"| {method} | {width(scale)} | {pipeline} | {gib(a)} | {gib(b)} (N={high['blocks']}) | "
            f"{b / max(1, a):.2f} | {gib(x)} | {gib(y)} | {y / max(1, x):.2f} |"
        )
    return lines


def per_block_table(extrapolated: list[dict]) -> list[str]:
    lines = [
        "",
        "per block: measured MiB [plan]",
        "| method | width | path | statistics | kept factors | float64 before compaction |",
        "|---|---|---|---|---|---|",
    ]
    for e in extrapolated:
        pb = e["per_block"]
        lines.append(
            f"| {e['method']} | {width(e['scale'])} | {e['pipeline']} | {pb['stats'] / MiB:.1f} "
            f"[{pb['plan_stats'] / MiB:.1f}] | {pb['kept'] / MiB:.1f} [{pb['plan_kept'] / MiB:.1f}] | "
            f"{pb['raw_float64'] / MiB:.1f} |"
        )
    return lines


def extrapolation_table(extrapolated: list[dict]) -> list[str]:
    lines = [
        "",
        "peak RSS GiB at 32 and 80 blocks: measured at the largest N + measured bytes per further block [plan]",
        "| method | width | path | calibration 32 | 80 | factorization 32 | 80 |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in extrapolated:
        cells = []
        for stage in ("calibration", "factorization"):
            for depth in ("32", "80"):
                f = e.get(stage, {}).get(depth)
                cells.append(f"{gib(f['measured'])} [{gib(f['plan'])}]" if f else "-")
        lines.append(f"| {e['method']} | {width(e['scale'])} | {e['pipeline']} | {' | '.join(cells)} |")
    return lines


def working(r: dict, without_kept: bool = True) -> int:
    """The calibration+factorization peak above the model after load (and the factors kept by the end)."""
    peak = max(r["stage_peak"].get("calibration", 0), r["stage_peak"].get("factorization", 0))
    return peak - r["model_rss"] - (r["kept"] if without_kept else 0)


def parse():
    parser = new_parser(__doc__)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="at the reduced width")
    parser.add_argument("--paths", nargs="+", default=["whole", "blocks"], choices=["whole", "blocks"])
    parser.add_argument("--full-width-methods", nargs="*", default=["svd-llm"], choices=METHODS, help="at full width")
    parser.add_argument("--full-width-blocks", nargs="+", type=int, default=[1], help="depths at full width")
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 4], help="depths at the reduced width")
    parser.add_argument("--scale", type=int, default=8, help="the reduced width's divisor (random:...&scale=F)")
    parser.add_argument("--offload", choices=["cpu", "disk"], help="the suite's offload (block-wise; default: none)")
    parser.add_argument("--keep", choices=["memory", "disk"], help="[factorization] keep (default: the suite's)")
    parser.add_argument("--kinds", nargs="+", help="[surgery] kinds: only these Linears (default: every kind)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-seqlen", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="a minute's smoke: svd-llm and sfsd at width 256, N = 1, 2"
    )
    parser.add_argument(
        "--replan", type=Path, nargs="+", help="the measured figures of FILE(s), merged, with the plan's figures afresh"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_common_arguments(parser)
    parser.set_defaults(threads=2)
    return parser.parse_args()


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(child(json.loads(parse().child))))
        sys.exit(0)
    sys.exit(script_main(parse, run, render))
