"""Factorization speed for every decomposable matrix of a Llama-2-7B-shaped model.

Random weights with the 7B shapes (per layer q, k, v, o: 4096 x 4096; gate,
up: 11008 x 4096; down: 4096 x 11008; 32 layers), generated one layer at a
time from a seed, with a power-law column scaling so that the spectrum decays
as real weights' do. Every path runs on the same matrices, layer after layer
(interleaved, so a drift in machine load hits all of them alike), timed with a
synchronize on CUDA, and each is scored by the relative Frobenius error of its
rank-k reconstruction against the optimum (Eckart-Young, from the exact SVD):

    svd              torch.linalg.svd per matrix (the naive loop)
    gram             harness.linalg.thin_svd(method="gram"): eigh of the smaller Gram per matrix
    svd-batched      torch.linalg.svd on the stack of same-shape matrices of a layer
    gram-batched     eigh of the stacked Grams
    lowrank          torch.svd_lowrank per matrix, only the k vectors needed (q = k + oversample)
    lowrank-batched  torch.svd_lowrank on the stacks

Usage (CUDA if available, else CPU; shrink for a CPU):

    python bench/factorize.py                                  # the full 7B shapes, 32 layers
    python bench/factorize.py --layers 2 --scale 8             # 512 x 512, 1376 x 512, ... on a CPU
    python bench/factorize.py --dtype float64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.linalg import thin_svd
from harness.provenance import cpu_model

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U_k (.., m, k), s_k (.., k), Vt_k (.., k, n)


def shapes(scale: float) -> dict[str, tuple[int, int]]:
    d, f = round(HIDDEN / scale), round(INTERMEDIATE / scale)
    return {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}  # fmt: skip


def layer_weights(layer: int, scale: float, decay: float, seed: int, device, dtype) -> dict[tuple, torch.Tensor]:
    """The layer's matrices stacked by shape: {(m, n): (count, m, n)} in KINDS order."""
    generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + layer)
    stacks: dict[tuple, list[torch.Tensor]] = {}
    for m, n in shapes(scale).values():
        w = torch.randn(m, n, generator=generator, dtype=torch.float32) / math.sqrt(n)
        columns = torch.randperm(n, generator=generator)
        w *= (1.0 + columns.to(torch.float32)) ** -decay  # power-law spectrum
        stacks.setdefault((m, n), []).append(w)
    return {shape: torch.stack(ws).to(device, dtype) for shape, ws in stacks.items()}


def rank_of(m: int, n: int, fraction: float) -> int:
    return max(1, int(fraction * min(m, n)))


# ---------------------------------------------------------------- the paths
def svd_loop(stack: torch.Tensor, k: int) -> Factors:
    outs = [torch.linalg.svd(w, full_matrices=False) for w in stack]
    return truncate(outs, k)


def gram_loop(stack: torch.Tensor, k: int) -> Factors:
    return truncate([thin_svd(w, w.dtype, "gram") for w in stack], k)


def svd_batched(stack: torch.Tensor, k: int) -> Factors:
    U, s, Vt = torch.linalg.svd(stack, full_matrices=False)
    return U[..., :k], s[..., :k], Vt[..., :k, :]


def gram_batched(stack: torch.Tensor, k: int) -> Factors:
    """Top-k of the stacked Grams' eigh; the other side by one batched matmul."""
    m, n = stack.shape[-2:]
    tall = m >= n
    gram = stack.mT @ stack if tall else stack @ stack.mT
    values, vectors = torch.linalg.eigh(gram)
    top = vectors[..., -k:].flip(-1)
    s = values[..., -k:].flip(-1).clamp_min(0).sqrt()
    inverse = torch.where(s > 0, 1 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    if tall:
        return (stack @ top) * inverse[..., None, :], s, top.mT
    return top, s, (top.mT @ stack) * inverse[..., :, None]


def lowrank(oversample: int, niter: int) -> Callable[[torch.Tensor, int], Factors]:
    def run_loop(stack: torch.Tensor, k: int) -> Factors:
        outs = []
        for w in stack:
            U, s, V = torch.svd_lowrank(w, q=min(k + oversample, *w.shape), niter=niter)
            outs.append((U, s, V.mT))
        return truncate(outs, k)

    return run_loop


def lowrank_batched(oversample: int, niter: int) -> Callable[[torch.Tensor, int], Factors]:
    def run_batched(stack: torch.Tensor, k: int) -> Factors:
        U, s, V = torch.svd_lowrank(stack, q=min(k + oversample, *stack.shape[-2:]), niter=niter)
        return U[..., :k], s[..., :k], V.mT[..., :k, :]

    return run_batched


def truncate(outs: list[Factors], k: int) -> Factors:
    return (
        torch.stack([U[:, :k] for U, _, _ in outs]),
        torch.stack([s[:k] for _, s, _ in outs]),
        torch.stack([Vt[:k] for _, _, Vt in outs]),
    )


def paths(args) -> dict[str, Callable[[torch.Tensor, int], Factors]]:
    every = {
        "svd": svd_loop,
        "gram": gram_loop,
        "svd-batched": svd_batched,
        "gram-batched": gram_batched,
        "lowrank": lowrank(args.oversample, args.niter),
        "lowrank-batched": lowrank_batched(args.oversample, args.niter),
    }
    return {name: every[name] for name in args.paths}


# ---------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Factors], device: torch.device) -> tuple[Factors, float]:
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - started


def relative_errors(stack: torch.Tensor, factors: Factors) -> torch.Tensor:
    """||W - U_k S_k V_k^T||_F / ||W||_F per matrix, in float64."""
    U, s, Vt = (t.to(torch.float64) for t in factors)
    W = stack.to(torch.float64)
    return torch.linalg.matrix_norm(W - (U * s[..., None, :]) @ Vt) / torch.linalg.matrix_norm(W)


def optimal_errors(stack: torch.Tensor, k: int) -> torch.Tensor:
    s = torch.linalg.svdvals(stack.to(torch.float64))
    return (s[..., k:].square().sum(-1) / s.square().sum(-1)).sqrt()


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    methods = paths(args)
    totals = {name: 0.0 for name in methods}
    errors = {name: [] for name in methods}
    excess = {name: [] for name in methods}
    matrices = 0
    warmup = layer_weights(0, args.scale, args.decay, args.seed + 1, device, dtype)
    for fn in methods.values():  # untimed: library handles, kernels, allocator pools
        for stack in warmup.values():
            fn(stack[:1], rank_of(*stack.shape[-2:], args.rank_fraction))
    for layer in range(args.layers):
        stacks = layer_weights(layer, args.scale, args.decay, args.seed, device, dtype)
        for (m, n), stack in stacks.items():
            k = rank_of(m, n, args.rank_fraction)
            best = optimal_errors(stack, k)
            matrices += stack.shape[0]
            for name, fn in methods.items():
                factors, seconds = timed(lambda fn=fn, stack=stack, k=k: fn(stack, k), device)
                totals[name] += seconds
                err = relative_errors(stack, factors)
                errors[name] += err.tolist()
                excess[name] += (err / best - 1).tolist()
        print(f"layer {layer + 1}/{args.layers} done", file=sys.stderr, flush=True)
    rows = []
    for name in methods:
        rows.append(
            {
                "path": name,
                "seconds": totals[name],
                "ms_per_matrix": 1000 * totals[name] / matrices,
                "speedup_vs_svd": totals["svd"] / totals[name] if "svd" in totals else None,
                "rel_error_mean": sum(errors[name]) / len(errors[name]),
                "excess_over_optimal_max": max(excess[name]),
            }
        )
    return {"config": config(args, device, matrices), "rows": rows}


def config(args, device: torch.device, matrices: int) -> dict:
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}"
    return {
        "device": str(device),
        "hardware": hardware,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "layers": args.layers,
        "scale": args.scale,
        "shapes": {kind: list(shape) for kind, shape in shapes(args.scale).items()},
        "matrices": matrices,
        "rank_fraction": args.rank_fraction,
        "oversample": args.oversample,
        "niter": args.niter,
        "decay": args.decay,
        "seed": args.seed,
    }


def render(outcome: dict) -> str:
    from tabulate import tabulate

    c = outcome["config"]
    head = (
        f"{c['matrices']} matrices ({c['layers']} layers, 7B shapes / {c['scale']:g}: "
        f"{c['shapes']['q_proj']}, {c['shapes']['gate_proj']}, {c['shapes']['down_proj']}), {c['dtype']}, "
        f"rank {c['rank_fraction']:g} x min(m, n); {c['device']} ({c['hardware']}, {c['threads']} threads), "
        f"torch {c['torch']}"
    )
    rows = [
        [r["path"], f"{r['seconds']:.3f}", f"{r['ms_per_matrix']:.2f}",
         "—" if r["speedup_vs_svd"] is None else f"{r['speedup_vs_svd']:.2f}x",
         f"{r['rel_error_mean']:.5f}", f"{r['excess_over_optimal_max']:.2e}"]
        for r in outcome["rows"]
    ]  # fmt: skip
    headers = ["path", "total s", "ms / matrix", "speed-up vs svd", "rel. error at k", "max excess over optimum"]
    return head + "\n\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers (default 32)")
    parser.add_argument("--scale", type=float, default=1.0, help="divide the 7B widths by this (default 1)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    parser.add_argument("--rank-fraction", type=float, default=0.25, help="k = fraction x min(m, n) (default 0.25)")
    parser.add_argument(
        "--paths", nargs="+", default=["svd", "gram", "svd-batched", "gram-batched", "lowrank", "lowrank-batched"]
    )
    parser.add_argument("--oversample", type=int, default=10, help="svd_lowrank: q = k + oversample")
    parser.add_argument("--niter", type=int, default=2, help="svd_lowrank power iterations")
    parser.add_argument("--decay", type=float, default=0.5, help="power-law exponent of the column scaling")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    outcome = run(args)
    print(render(outcome))
    if args.json:
        Path(args.json).write_text(json.dumps(outcome, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
