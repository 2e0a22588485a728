"""Peak device memory per stage of one `harness run` against `harness plan` (bench/gpu_check.sh's measurement).

Runs a suite (default bench/gpu_check.toml: Llama-2-7B shapes, bf16, svd-llm
keep 0.8, calibration 32 x 2048, perplexity on 4 windows) in this process
with the stage wrappers of bench/scale.py: per stage (load, calibration,
factorization, baseline, cell) the peak CUDA memory torch allocated
(``max_memory_allocated``, reset at every stage boundary), the peak RSS and the
seconds, beside the plan's device and host figures for the same suite, model
and device (``harness.plan.plan_model``).

    python bench/gpu_check.py --json $OUT/gpu-check.json                        # a GPU
    python bench/gpu_check.py --device cpu --layers 1 --scale 8 --json x.json    # its CPU test
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402
from bench.scale import PLAN_STAGE, measure_suite  # noqa: E402

GiB = 2**30


def parse():
    parser = new_parser(__doc__)
    parser.add_argument("--suite", type=Path, default=ROOT / "bench" / "gpu_check.toml")
    parser.add_argument("--layers", type=int, default=32, help="blocks of the Llama-2-7B shape (default all 32)")
    parser.add_argument("--scale", type=int, default=1, help="divide the widths by this (random:...&scale=F)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (the script's CPU test)")
    add_common_arguments(parser)
    return parser.parse_args()


class Progress:
    """Every few seconds, the stage figures so far to a file: what a run stopped by its timeout leaves."""

    def __init__(self, path: Path | None, every: float = 5.0) -> None:
        self.path, self.every, self.last = path, every, 0.0

    def __call__(self, stages) -> None:
        now = time.monotonic()
        if self.path is None or now - self.last < self.every:
            return
        self.last = now
        figures = {"stack": list(stages.stack), "peak_rss": stages.peak, "device_peak": stages.device_peak,
                   "seconds": {k: round(v, 2) for k, v in stages.seconds.items()}}  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(figures, indent=1) + "\n")


def run(args) -> dict:
    import torch

    import harness.plan as plan_mod
    from harness.suite import load_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = f"random:llama-2-7b?layers={args.layers}" + (f"&scale={args.scale}" if args.scale != 1 else "")
    suite = replace(load_suite(args.suite), models=[spec], device=args.device)
    plan = plan_mod.plan_model(suite, spec, args.device)
    progress = Progress(args.json.with_suffix(".progress.json") if args.json else None)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        measured = measure_suite(args.suite, Path(tmp), model=spec, device=args.device, on_switch=progress)
    hardware = machine()
    if args.device.startswith("cuda"):
        hardware["hardware"] = torch.cuda.get_device_name(torch.device(args.device))
        hardware["device_memory"] = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    return {
        "config": {
            "suite": str(args.suite.relative_to(ROOT) if args.suite.is_relative_to(ROOT) else args.suite),
            "model": spec,
            "device": args.device,
            "dtype": suite.dtype,
            "seed": suite.seed,
            "calibration": {k: getattr(suite.calibration, k) for k in ("samples", "seqlen", "batch_size", "pipeline")},
        },
        "machine": hardware,
        "measured": measured,
        "plan": [{"stage": s.name, "device": s.device, "host": s.host, "note": s.note} for s in plan.stages],
        "plan_table": plan.table(),
    }


def render(outcome: dict) -> str:
    m, c = outcome["measured"], outcome["config"]
    plan = {p["stage"]: p for p in outcome["plan"]}
    on_cuda = c["device"].startswith("cuda")
    lines = [
        f"{c['model']}, {c['dtype']}, {c['device']} ({outcome['machine']['hardware']}); calibration "
        f"{c['calibration']['samples']} x {c['calibration']['seqlen']}",
        "| stage | device peak GiB | plan device GiB | host peak GiB | plan host GiB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for stage in ("load", "data", "calibration", "factorization", "baseline", "cell"):
        if stage not in m["stage_seconds"]:
            continue
        p = plan[PLAN_STAGE.get(stage, {"data": "calibration"}.get(stage, "evaluation"))]
        device = f"{m['stage_device_peak'].get(stage, 0) / GiB:.2f}" if on_cuda else "-"
        plan_device = f"{p['device'] / GiB:.2f}" if on_cuda else "-"
        lines.append(
            f"| {stage} | {device} | {plan_device} | {m['stage_peak'].get(stage, 0) / GiB:.2f} | "
            f"{p['host'] / GiB:.2f} | {m['stage_seconds'][stage]:.1f} |"
        )
    lines.append(f"cells failed: {m['failed'] or 'none'}; metrics: {m['metrics']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(script_main(parse, run, render))
