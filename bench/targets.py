"""One factorization serves every target: a suite with 4 targets against the same suite with 1.

The same suite (the embedded model, the methods below, the uniform allocator,
the `params` profiler only, so that the cells cost allocation, truncation and
counting) is run in process with 1 target and with 4 targets, interleaved
round by round, ``--force`` each time (calibration statistics come from the
disk cache after the first round). Each method's ``factorize`` is wrapped to
count its calls and add up its time: if the runner refactorized per target,
the 4-target suite would spend 4× as long factorizing.

    python bench/targets.py --repeats 2 --json bench/results/targets-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402
from harness.plugins import get_plugins, set_plugins  # noqa: E402
from harness.run.runner import RunOptions, run_suite  # noqa: E402
from harness.suite import load_suite  # noqa: E402

SUITE = """
name = "targets_{n}"
seed = 0
device = "cpu"
dtype = "float32"
models = ["embedded"]
targets = {targets}
allocators = ["uniform"]
[calibration]
source = "lambada"
samples = 16
seqlen = 256
batch_size = 4
loss_samples = 2
{methods}
[[profilers]]
name = "params"
"""
ONE, FOUR = [0.9], [0.95, 0.9, 0.8, 0.7]


class Stopwatch:
    """Wraps every registered decomposer's factorize: calls and seconds per method."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def install(self) -> None:
        plugins = get_plugins()
        for name in plugins.names("decomposer"):
            decomposer = plugins.get("decomposer", name)
            decomposer.factorize = self.wrap(name, decomposer.factorize)

    def wrap(self, name, factorize):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return factorize(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return timed


def run_once(suite_path: Path, results: Path) -> dict:
    set_plugins(None)
    watch = Stopwatch()
    watch.install()
    started = time.perf_counter()
    summary = run_suite(load_suite(suite_path), RunOptions(results_root=results, force=True, progress=False))
    wall = time.perf_counter() - started
    assert not summary.failed, [r["error"] for r in summary.failed]
    return {"wall_s": wall, "cells": summary.computed, "calls": dict(watch.calls), "seconds": dict(watch.seconds)}


def write_suites(work: Path, methods: list[str]) -> dict[int, Path]:
    blocks = "\n".join(f'[[methods]]\nname = "{m}"' for m in methods)
    paths = {}
    for targets in (ONE, FOUR):
        path = work / f"targets_{len(targets)}.toml"
        path.write_text(SUITE.format(n=len(targets), targets=json.dumps(targets), methods=blocks))
        paths[len(targets)] = path
    return paths


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: dict[int, list[dict]] = {1: [], 4: []}
    with tempfile.TemporaryDirectory() as tmp:
        suites = write_suites(Path(tmp), args.methods)
        for round_ in range(args.repeats):
            for n, path in suites.items():
                runs[n].append(run_once(path, Path(tmp) / "results"))
                print(f"round {round_ + 1}: {n} target(s): {runs[n][-1]['wall_s']:.1f} s", file=sys.stderr)
    return {
        "runs": {str(n): r for n, r in runs.items()},
        "config": {
            "command": " ".join(["python", "bench/targets.py", *sys.argv[1:]]),
            "model": "embedded SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32)",
            "methods": args.methods,
            "targets": {"1": ONE, "4": FOUR},
            "calibration": "lambada, 16 x 256 tokens (cached on disk after the first run)",
            "repeats": args.repeats,
            **machine(),
        },
    }


def render(outcome: dict) -> str:
    one, four = outcome["runs"]["1"], outcome["runs"]["4"]
    lines = [
        "| method | factorize calls, 1 target | 4 targets | factorize s, 1 target | 4 targets | ratio 4/1 |",
        "|---|---|---|---|---|---|",
    ]
    for method in outcome["config"]["methods"]:
        s1 = median(r["seconds"][method] for r in one)
        s4 = median(r["seconds"][method] for r in four)
        c1, c4 = one[0]["calls"][method], four[0]["calls"][method]
        lines.append(f"| {method} | {c1} | {c4} | {s1:.2f} | {s4:.2f} | {s4 / s1:.2f} |")
    t1 = median(sum(r["seconds"].values()) for r in one)
    t4 = median(sum(r["seconds"].values()) for r in four)
    w1, w4 = median(r["wall_s"] for r in one), median(r["wall_s"] for r in four)
    lines.append(f"| all | | | {t1:.2f} | {t4:.2f} | {t4 / t1:.2f} |")
    lines.append("")
    lines.append(f"Whole run (model load, calibration cache, cells): {w1:.1f} s vs {w4:.1f} s ({w4 / w1:.2f}×).")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "asvd", "svd-llm", "lord", "sfsd"])
    add_common_arguments(parser, repeats=2)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(script_main(parse, run, render))
