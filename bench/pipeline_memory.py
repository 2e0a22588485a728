"""Peak RSS of calibration statistics: the whole-model pass against the layer-sequential pipeline.

A random Llama-2-7B-shaped model cut to a few blocks (the harness's shape-only
``random:llama-2-7b?layers=N``: hidden 4096, intermediate 11008, 32 heads, vocab
32000, seeded normal weights in float32, drawn in place), calibration
windows of random token ids, the ``gram`` statistics of every Linear of the
blocks and nothing else (no factorization). Each path runs in its own child
process (``ru_maxrss`` only grows), side by side in one run; each reports its
peak RSS, the RSS of the model alone before calibration, and the bytes of
statistics tensors alive at the peak where the path can count them.

    OMP_NUM_THREADS=1 python bench/pipeline_memory.py --json bench/results/pipeline-memory.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402

GiB = 2**30


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build(blocks: int, seed: int):
    """A random Llama-2-7B-shaped model cut to ``blocks`` blocks (the harness's shape-only model)."""
    from harness.models import load_model

    return load_model(f"random:llama-2-7b?layers={blocks}&seed={seed}", "float32", "cpu").model.eval()


def child(mode: str, blocks: int, samples: int, seqlen: int, batch_size: int, threads: int) -> dict:
    import torch

    from harness.run import pipeline
    from harness.run.calibration import collect_stats
    from harness.surgery import find_linears

    if threads:
        torch.set_num_threads(threads)
    model = build(blocks, seed=0)
    layers = find_linears(model)
    batches = torch.randint(0, 32000, (samples, seqlen), generator=torch.Generator().manual_seed(1))
    model_rss = rss_now()
    started = time.perf_counter()
    stats_bytes = None
    if mode == "whole":
        stats = collect_stats(model, layers, batches, {"gram"}, torch.device("cpu"), batch_size, progress=False)
        stats_bytes = sum(8 * (s.gram.numel() + 2 * s.sq_mean.numel()) for s in stats.values())  # + x^2 sums
        del stats
    else:
        tracker = pipeline.LiveStats()
        job = pipeline.Job("gram", frozenset({"gram"}), [[layer.name] for layer in layers], lambda g, s: None)
        pipeline.run_blocks(
            model, layers, batches, [job], device=torch.device("cpu"), batch_size=batch_size, progress=False,
            tracker=tracker,
        )  # fmt: skip
        assert job.error is None, job.error
        stats_bytes = tracker.peak
    return {
        "mode": mode,
        "seconds": time.perf_counter() - started,
        "model_rss": model_rss,
        "peak_rss": rss_peak(),
        "stats_bytes": stats_bytes,
    }


def parse():
    parser = new_parser(__doc__)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", choices=["whole", "blocks"], help=argparse_hidden())
    add_common_arguments(parser)
    return parser.parse_args()


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def run(args) -> dict:
    rows = []
    for mode in ("whole", "blocks"):
        command = [
            sys.executable, __file__, "--child", mode, "--blocks", str(args.blocks), "--samples", str(args.samples),
            "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        ]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    config = {k: getattr(args, k) for k in ("blocks", "samples", "seqlen", "batch_size")}
    return {"config": config, "machine": machine(), "rows": rows}


def render(outcome: dict) -> str:
    c = outcome["config"]
    lines = [
        f"Llama-2-7B shapes, {c['blocks']} blocks, float32, gram only, {c['samples']} x {c['seqlen']} tokens, "
        f"batch {c['batch_size']}, {outcome['machine']['threads']} thread(s)",
        "| path | peak RSS GiB | model alone GiB | peak - model GiB | statistics GiB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in outcome["rows"]:
        lines.append(
            f"| {r['mode']} | {r['peak_rss'] / GiB:.2f} | {r['model_rss'] / GiB:.2f} | "
            f"{(r['peak_rss'] - r['model_rss']) / GiB:.2f} | {r['stats_bytes'] / GiB:.3f} | {r['seconds']:.1f} |"
        )
    whole, blocks = outcome["rows"]
    ratio = (whole["peak_rss"] - whole["model_rss"]) / max(1, blocks["peak_rss"] - blocks["model_rss"])
    lines.append(f"peak above the model: whole / blocks = {ratio:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--child" in sys.argv:
        args = parse()
        print(json.dumps(child(args.child, args.blocks, args.samples, args.seqlen, args.batch_size, args.threads)))
        sys.exit(0)
    sys.exit(script_main(parse, run, render))
