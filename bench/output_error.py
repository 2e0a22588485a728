"""Each SVD-family method's output error on calibration activations, at the same parameters.

Why the methods rank as they do on a model: SVD-LLM minimizes, per matrix,
the output error ||(W - AB) X^T||_F on the calibration inputs X exactly
(whitening by the Cholesky factor of X^T X), so at a given rank no method can
do better on that data. The others minimize a proxy (plain SVD: the weights'
own error; FWSVD: Fisher-weighted; ASVD: input channels scaled by mean |x|^a;
LoRD/SFSD: projection onto the output covariance's top directions). This
script factorizes the model with each method exactly as `harness run` does
(the suite's calibration data and settings, its uniform allocator and
targets), and reports

    relative output error = sum_l tr(dW_l G_l dW_l^T) / sum_l tr(W_l G_l W_l^T),   G_l = X_l^T X_l,

over all decomposable matrices, and its ratio to the smallest of them (SVD-LLM's, the optimum).
No evaluation runs: it explains a leaderboard, it does not replace one.

    python bench/output_error.py --suite suites/svd_family.toml --json bench/results/output-error-embedded.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402
from harness.api import AllocationContext  # noqa: E402
from harness.run.runner import RunOptions, SuiteRunner  # noqa: E402
from harness.suite import load_suite  # noqa: E402
from harness.surgery import weights_of  # noqa: E402


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """tr(dW G dW^T) and tr(W G W^T) in float64."""
    w = weight.to(torch.float64)
    delta = w - approx.to(torch.float64)
    g = gram.to(torch.float64)
    return float(((delta @ g) * delta).sum()), float(((w @ g) * w).sum())


def method_errors(session, method, cells, grams: dict) -> dict[str, float]:
    """Relative output error of ``method`` at each of its uniform-allocator cells' targets."""
    factorizations, _ = session.factorize(method)
    allocator = session.env.plugins.get("allocator", "uniform")
    layers = {layer.name: layer for layer in session.layers}
    ctx = AllocationContext(seed=session.env.suite.seed, layers=layers, log=lambda _: None)
    out = {}
    for cell in cells:
        assignment = allocator.allocate(factorizations, cell.target, cell.allocator.options, ctx)
        error = total = 0.0
        for fact, rank in zip(factorizations, assignment, strict=True):
            (name,) = fact.names  # the SVD family factorizes one matrix per group
            weight = weights_of(session.loaded.model, fact.names)[name]
            approx = weight if rank is None else torch.matmul(*fact.factors(rank))  # None: left dense
            e, t = output_error(weight, approx, grams[name])
            error, total = error + e, total + t
        out[cell.target.label] = error / total
    return out


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite)
    with tempfile.TemporaryDirectory() as tmp:
        runner = SuiteRunner(suite, RunOptions(results_root=Path(tmp), progress=False))
        session = runner.open_session(suite.models[0])
        grams = {name: stats.gram for name, stats in session.stats({"gram"}).items()}
        cells = [c for c in session.cells()[1:] if c.allocator.name == "uniform"]
        errors = {}
        for method in suite.methods:
            mine = [c for c in cells if c.method is method]
            if mine and method.name in args.methods:
                errors[method.label] = method_errors(session, method, mine, grams)
    calibration = suite.calibration
    return {
        "relative_output_error": errors,
        "config": {
            "command": " ".join(["python", "bench/output_error.py", *sys.argv[1:]]),
            "suite": str(args.suite),
            "model": suite.models[0],
            "calibration": f"{calibration.source}, {calibration.samples} x {calibration.seqlen} tokens",
            "seed": suite.seed,
            "allocator": "uniform",
            **machine(),
        },
    }


def render(outcome: dict) -> str:
    errors = outcome["relative_output_error"]
    targets = list(dict.fromkeys(t for values in errors.values() for t in values))
    best = {t: v for values in errors.values() for t, v in values.items()}
    for values in errors.values():  # the optimum per target: the smallest error any method reached
        best |= {t: min(best[t], v) for t, v in values.items()}
    head = "| method | " + " | ".join(f"{t}: rel. output error (× best)" for t in targets) + " |"
    lines = [head, "|---|" + "---|" * len(targets)]
    for label, values in errors.items():
        cells = [f"{values[t]:.4f} ({values[t] / best[t]:.2f}×)" if t in values else "—" for t in targets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--suite", type=Path, default=ROOT / "suites" / "svd_family.toml")
    parser.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "asvd", "svd-llm", "lord", "sfsd"])
    add_common_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(script_main(parse, run, render))
