"""Decode latency of the factored model vs dense, against the byte-ratio prediction.

A Llama-2-7B-shaped model with random weights (``--layers`` and ``--scale``
shrink it for a CPU; head_dim stays 128) is timed dense and with every
decomposable Linear replaced by a rank-k ``FactoredLinear`` (two matmuls,
the harness's own surgery) at kept fractions 0.8, 0.6 and 0.4 of the
decomposable parameters, uniform per matrix (k = floor(f * m n / (m + n))).

At batch 1, decoding is bound by reading the weights: the prediction for a
kept fraction is the dense time scaled by the bytes read per token (every
weight except the embedding table, of which one row is read). The table
shows measured / predicted: 1.0 is "factoring saves exactly what the bytes
say"; above 1, two skinny matmuls cost more than their bytes (launch
overhead, poorer kernels at small k).

Decode per token is ``(t_generate(n) - p50 t_generate(1)) / (n - 1)``, greedy,
exactly n tokens (the latency profiler's own measurement, harness_profilers).
``--compile`` adds torch.compile(mode="reduce-overhead") with a static KV cache
(CUDA graphs; meant for a GPU).

    python bench/decode.py                                 # full 7B shapes (a GPU: fp16)
    python bench/decode.py --layers 4 --scale 8 --dtype float32 --new-tokens 16   # a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins" / "harness_profilers"))
from harness_profilers.latency import LatencyOptions, measure_batch  # noqa: E402

from harness.factorization import LowRank  # noqa: E402
from harness.provenance import cpu_model  # noqa: E402
from harness.surgery import count_layers, find_linears, replaced  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEAD_DIM = 4096, 11008, 32, 32000, 128


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = round(HIDDEN / args.scale / HEAD_DIM) * HEAD_DIM or HEAD_DIM
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=round(INTERMEDIATE / args.scale),
        num_hidden_layers=args.layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=hidden // HEAD_DIM,
        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens + 8),
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def factored(model, fraction: float, seed: int) -> dict[str, LowRank]:
    """Uniform rank per matrix keeping ``fraction`` of its parameters; random factors (timing only)."""
    generator = torch.Generator().manual_seed(seed)
    replacements = {}
    for layer in find_linears(model):
        m, n = layer.shape
        k = max(1, math.floor(fraction * m * n / (m + n)))
        A = torch.randn(m, k, generator=generator) / math.sqrt(k)
        B = torch.randn(k, n, generator=generator) / math.sqrt(n)
        replacements[layer.name] = LowRank(A, B)
    return replacements


def bytes_read_per_token(model) -> int:
    """Bytes of every weight a decode step reads: all parameters but the embedding table (one row)."""
    embedding = model.get_input_embeddings().weight
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    if not tied:
        total -= embedding.numel() * embedding.element_size() - embedding.shape[1] * embedding.element_size()
    return total


def measure(model, args, device: torch.device) -> dict:
    options = LatencyOptions(
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batch_sizes=[args.batch],
        warmup=args.warmup,
        min_runs=args.min_runs,
        min_seconds=args.min_seconds,
    )
    if args.compile:
        return measure_compiled(model, options, args, device)
    return measure_batch(model, args.batch, options, args.seed, device)


def measure_compiled(model, options: LatencyOptions, args, device: torch.device) -> dict:
    """reduce-overhead torch.compile of the forward, static KV cache (shapes fixed for CUDA graphs)."""
    from harness_profilers import latency, timing

    original = model.forward
    model.forward = torch.compile(original, mode="reduce-overhead", fullgraph=False)
    plain = timing.generate

    def static_generate(m, ids, new_tokens, **kwargs):
        return plain(m, ids, new_tokens, cache_implementation="static", **kwargs)

    latency.generate = static_generate
    try:
        return measure_batch(model, args.batch, options, args.seed, device)
    finally:
        latency.generate = plain
        model.forward = original
        torch._dynamo.reset()


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    model = build_model(args, device, dtype)
    names = [layer.name for layer in find_linears(model)]
    dense_layers_bytes = count_layers(model, names)[1]
    rows = []
    dense_ms = dense_bytes = None
    for fraction in [1.0, *args.fractions]:
        replacements = {} if fraction == 1.0 else factored(model, fraction, args.seed)
        with replaced(model, replacements):
            nbytes = bytes_read_per_token(model)
            outcome = measure(model, args, device)
            kept = count_layers(model, names)[1] / dense_layers_bytes
        decode = outcome["decode"]
        if fraction == 1.0:
            dense_ms, dense_bytes = decode["p50"], nbytes
        predicted = dense_ms * nbytes / dense_bytes
        rows.append(
            {
                "kept_fraction": fraction,
                "kept_bytes_decomposable": kept,
                "bytes_read_per_token_mb": nbytes / 1e6,
                "predicted_ms": predicted,
                "decode_ms_p50": decode["p50"],
                "decode_ms_p90": decode["p90"],
                "rel_spread": decode["rel_spread"],
                "measured_over_predicted": decode["p50"] / predicted,
                "speedup_vs_dense": dense_ms / decode["p50"],
                "prefill_ms_p50": outcome["prefill"]["p50"],
                "runs": decode["n"],
            }
        )
        print(f"kept {fraction}: decode {decode['p50']:.3f} ms/token", file=sys.stderr, flush=True)
    return {"config": config(args, device, dtype, model), "rows": rows}


def config(args, device, dtype, model) -> dict:
    c = model.config
    return {
        "device": str(device),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "mode": "torch.compile reduce-overhead, static cache" if args.compile else "eager",
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "model_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def render(outcome: dict) -> str:
    from tabulate import tabulate

    c = outcome["config"]
    head = (
        f"{c['layers']} layers, hidden {c['hidden']}, intermediate {c['intermediate']}, vocab {c['vocab']} "
        f"({c['model_params_m']:.0f} M params), {c['dtype']}, {c['mode']}; batch {c['batch']}, prompt "
        f"{c['prompt_len']}, {c['new_tokens']} new tokens; {c['device']} ({c['hardware']}, {c['threads']} threads), "
        f"torch {c['torch']}"
    )
    headers = ["kept", "bytes/token (MB)", "predicted ms", "decode ms p50", "p90", "spread", "measured/predicted",
               "speed-up vs dense"]  # fmt: skip
    rows = [
        [f"{r['kept_fraction']:g}", f"{r['bytes_read_per_token_mb']:.1f}", f"{r['predicted_ms']:.3f}",
         f"{r['decode_ms_p50']:.3f}", f"{r['decode_ms_p90']:.3f}", f"{r['rel_spread']:.2f}",
         f"{r['measured_over_predicted']:.2f}", f"{r['speedup_vs_dense']:.2f}x"]
        for r in outcome["rows"]
    ]  # fmt: skip
    return head + "\n\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--scale", type=float, default=1.0, help="divide the 7B widths by this")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA, else float32"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile reduce-overhead + static cache (GPU)")
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
