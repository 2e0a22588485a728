"""AA-SVD against SVD-LLM on propagated inputs, block by block: the anchored objective in and out of sample.

Why: on the embedded model `suites/frontier_propagated.toml` gives aa-svd a
perplexity about 110x svd-llm's at every kept fraction, although aa-svd
minimizes, per Linear, the very objective both are judged by here,

    E(W') = ||W X^T - W' X'^T||_F^2 / ||W X^T||_F^2      (the paper's Objective 4, relative)

with X the original model's inputs of the Linear and X' the inputs it gets
once the blocks before it are compressed. On the calibration windows aa-svd's
E can only be lower than svd-llm's (it is the minimizer at that rank). This
script measures E on the calibration windows AND on held-out windows of
another text, for both methods, each on its own propagated stream (block b is
calibrated on the outputs of blocks 0..b-1 compressed by the same method, the
statistics from the uncompressed block, as `harness run` does with
`inputs = "propagated"`), and the perplexity of each compressed model on the
held-out windows.

Both factorizations come from the plugins' own code (`harness_aasvd.decompose.anchored_svd`;
with cross = gram it is SVD-LLM's whitening of X'^T X', what `svd-llm` computes
on propagated inputs). Ranks: the uniform allocator's floor(keep * m n / (m + n)).
Optionally `--ridge r` adds r * mean(diag X'^T X') to X'^T X' before both
(a ridge on the regression aa-svd solves; not in the paper).

    python bench/anchored_heldout.py --threads 1 --samples 16 --json bench/results/anchored-heldout-16.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness_aasvd.decompose import anchored_svd  # noqa: E402

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402
from harness.data import calibration_batches, lambada_passages, wiki_passages  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.run.blocks import capture_inputs  # noqa: E402

METHODS = ("svd-llm", "aa-svd")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def run_block(block: nn.Module, batch) -> torch.Tensor:
    out = block(batch.hidden, *batch.args, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


def linear_inputs(block: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Each Linear's input (tokens x n, float64) for one batch through the uncompressed block."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        return lambda module, args, out: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_hook(keep(name)) for name, m in block_linears(block).items()]
    try:
        run_block(block, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: x.to(torch.float64) for n, x in seen.items()}


@contextmanager
def swapped(block: nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The block with each named Linear's weight replaced by ``weights`` (float64, cast), restored after."""
    linears = block_linears(block)
    saved = {n: linears[n].weight.data for n in (weights or {})}
    try:
        for n, w in (weights or {}).items():
            linears[n].weight.data = w.to(saved[n].dtype)
        yield
    finally:
        for n, w in saved.items():
            linears[n].weight.data = w


def second_moments(
    block: nn.Module, original: list, shifted: list, weights: dict | None = None, names: tuple | None = None
) -> dict[str, tuple]:
    """(X^T X, X^T X', X'^T X') per Linear (``names``: those only), summed over the paired batches; X from the
    uncompressed block, X' from the block with ``weights`` in place (its layers compressed so far)."""
    sums: dict[str, list] = {}
    for xb, sb in zip(original, shifted, strict=True):
        xs = linear_inputs(block, xb)
        with swapped(block, weights):
            ss = linear_inputs(block, sb)
        for name, x in xs.items():
            if names is not None and name not in names:
                continue
            s = ss[name]
            terms = (x.T @ x, x.T @ s, s.T @ s)
            sums[name] = [a + t for a, t in zip(sums[name], terms, strict=True)] if name in sums else list(terms)
    return {n: tuple(v) for n, v in sums.items()}


def relative_objective(w: torch.Tensor, approx: torch.Tensor, moments: tuple) -> float:
    """||W X^T - W' X'^T||^2 / ||W X^T||^2 from the three second moments."""
    g, c, gp = moments
    base = float(((w @ g) * w).sum())
    cross = float(((w @ c) * approx).sum())
    second = float(((approx @ gp) * approx).sum())
    return (base - 2 * cross + second) / base


def factor(method: str, w: torch.Tensor, moments: tuple, keep: float, ridge: float) -> torch.Tensor:
    """The method's rank-k W' (float64) from calibration moments."""
    _, c, gp = moments
    if ridge:
        gp = gp + ridge * gp.diagonal().mean() * torch.eye(gp.shape[0], dtype=gp.dtype)
    m, n = w.shape
    k = math.floor(keep * m * n / (m + n))
    cross = c if method == "aa-svd" else gp
    U, s, Vt, L_inv, _ = anchored_svd(w, gp, cross)
    return (U[:, :k] * s[:k]) @ Vt[:k] @ L_inv


def advance(block: nn.Module, batches: list, weights: dict[str, torch.Tensor] | None) -> list:
    """The block's outputs for ``batches``, with each Linear's weight replaced by ``weights`` if given."""
    with swapped(block, weights):
        return [replace(b, hidden=run_block(block, b)) for b in batches]


STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
"""The official AA-SVD code's order within a block: each stage's statistics with the earlier stages compressed."""


def stage_of(name: str) -> int:
    return next(i for i, kinds in enumerate(STAGES) if name.rsplit(".", 1)[-1] in kinds)


def perplexity(model, streams: list, windows: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token loss) of the final hidden states ``streams`` on ``windows``."""
    inner = model.model
    total, count = 0.0, 0
    for batch, ids in zip(streams, windows.split(batch_size), strict=True):
        logits = model.lm_head(inner.norm(batch.hidden)).float()
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        loss = nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return math.exp(total / count)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("embedded")
    model, tok = loaded.model.eval(), loaded.tokenizer
    cal_ids = calibration_batches(tok, lambada_passages(), args.samples, args.seqlen, args.seed)
    held_text = wiki_passages() if args.held_out_source == "wiki-passages" else lambada_passages()
    held_ids = calibration_batches(tok, held_text, args.held_out, args.seqlen, args.held_out_seed)
    blocks = list(model.model.layers)
    cpu = torch.device("cpu")
    start = time.perf_counter()
    per_block: list[dict] = []
    with torch.no_grad():
        cal = capture_inputs(model, blocks[0], cal_ids, args.batch_size, cpu)
        held = capture_inputs(model, blocks[0], held_ids, args.batch_size, cpu)
        streams = {m: {"cal": list(cal), "held": list(held)} for m in METHODS}
        if args.shared_stream:  # one stream, svd-llm's: the two factorizations judged on the same X'
            streams["aa-svd"] = streams["svd-llm"]
        for b, block in enumerate(blocks[: args.blocks or None]):
            row: dict = {"block": b}
            linears = block_linears(block)
            moments: dict[int, tuple] = {}
            for method in METHODS if not args.shared_stream else reversed(METHODS):  # shared: aa-svd first
                sequential = args.sequential and method == "aa-svd"
                weights = {}
                for stage in range(len(STAGES)) if sequential else [None]:
                    names = tuple(n for n in linears if stage is None or stage_of(n) == stage)
                    if sequential:  # this stage's X' with the block's earlier stages compressed
                        cal_m = second_moments(block, cal, streams[method]["cal"], weights, names)
                        held_m = second_moments(block, held, streams[method]["held"], weights, names)
                    else:
                        key = id(streams[method])  # shared stream: its moments once
                        if key not in moments:
                            moments[key] = (
                                second_moments(block, cal, streams[method]["cal"]),
                                second_moments(block, held, streams[method]["held"]),
                            )
                        cal_m, held_m = moments[key]
                    for name in names:
                        w = linears[name].weight.data.to(torch.float64)
                        approx = factor(method, w, cal_m[name], args.keep, args.ridge)
                        weights[name] = approx
                        row.setdefault(name, {})[method] = {
                            "calibration": relative_objective(w, approx, cal_m[name]),
                            "held_out": relative_objective(w, approx, held_m[name]),
                        }
                if method == "svd-llm" or not args.shared_stream:
                    for split in ("cal", "held"):
                        streams[method][split] = advance(block, streams[method][split], weights)
            cal, held = advance(block, cal, None), advance(block, held, None)
            per_block.append(row)
            print(f"block {b}: " + summary_line(row), file=sys.stderr, flush=True)
        ppl = {}
        if not args.blocks:  # the whole model compressed: each method's held-out perplexity
            ppl = {m: perplexity(model, streams[m]["held"], held_ids, args.batch_size) for m in METHODS}
            ppl["dense"] = perplexity(model, held, held_ids, args.batch_size)
    windows = f"seeded random windows, seed {args.seed}"
    return {
        "per_block": per_block,
        "perplexity_held_out": ppl,
        "seconds": round(time.perf_counter() - start, 1),
        "config": {
            "command": " ".join(["python", "bench/anchored_heldout.py", *sys.argv[1:]]),
            "model": "embedded",
            "calibration": f"lambada, {args.samples} x {args.seqlen} tokens, {windows}",
            "held_out": f"{args.held_out_source}, {args.held_out} x {args.seqlen} tokens, "
            f"seeded random windows, seed {args.held_out_seed}",
            "keep": args.keep,
            "ridge": args.ridge,
            "streams": "shared (svd-llm's)" if args.shared_stream else "one per method",
            "aa_svd_within_block": "sequential (official order)" if args.sequential else "one uncompressed forward",
            "blocks": args.blocks or len(blocks),
            "allocator": "uniform (floor(keep * m n / (m + n)))",
            **machine(),
        },
    }


def summary_line(row: dict) -> str:
    """Mean relative objective over the block's Linears, per method and split."""
    names = [k for k in row if k != "block"]
    parts = []
    for method in METHODS:
        for split in ("calibration", "held_out"):
            mean = sum(row[n][method][split] for n in names) / len(names)
            parts.append(f"{method} {split} {mean:.4f}")
    return ", ".join(parts)


def render(outcome: dict) -> str:
    head = "| block | svd-llm cal | aa-svd cal | svd-llm held-out | aa-svd held-out"
    lines = [head + " | worst Linear, held-out aa / svd-llm |"]
    lines.append("|---|---|---|---|---|---|")
    for row in outcome["per_block"]:
        names = [k for k in row if k != "block"]

        def mean(method: str, split: str, names=names, row=row) -> float:
            return sum(row[n][method][split] for n in names) / len(names)

        worst = max(names, key=lambda n: row[n]["aa-svd"]["held_out"] / row[n]["svd-llm"]["held_out"])
        ratio = row[worst]["aa-svd"]["held_out"] / row[worst]["svd-llm"]["held_out"]
        lines.append(
            f"| {row['block']} | {mean('svd-llm', 'calibration'):.4f} | {mean('aa-svd', 'calibration'):.4f} | "
            f"{mean('svd-llm', 'held_out'):.4f} | {mean('aa-svd', 'held_out'):.4f} | {worst} {ratio:.2f}x |"
        )
    ppl = outcome["perplexity_held_out"]
    if ppl:
        lines.append("")
        lines.append("held-out perplexity: " + ", ".join(f"{k} {v:.4g}" for k, v in ppl.items()))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (frontier_propagated: 16)")
    parser.add_argument("--held-out", type=int, default=16, help="held-out windows of wiki-passages")
    parser.add_argument("--held-out-source", choices=["wiki-passages", "lambada"], default="wiki-passages")
    parser.add_argument("--held-out-seed", type=int, default=1, help="lambada: other windows than calibration's")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sequential", action="store_true", help="aa-svd: the official order within a block (q/k/v, o, gate/up, down)"
    )
    parser.add_argument("--shared-stream", action="store_true", help="both methods on svd-llm's propagated stream")
    parser.add_argument("--blocks", type=int, default=0, help="first N blocks only (0: all, with perplexity)")
    parser.add_argument("--ridge", type=float, default=0.0, help="relative ridge on X'^T X' (0: none, as the paper)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(script_main(parse, run, render))
