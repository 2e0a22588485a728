"""Latency of prefill and decode, per batch size.

Prefill: one forward pass of a ``prompt_len``-token prompt that fills the
KV cache (``use_cache=True``). Decode: ``generate`` of exactly ``new_tokens``
tokens (greedy, ``min_new_tokens == max_new_tokens``); per generated token
``(t_generate(new_tokens) - p50 t_generate(1)) / (new_tokens - 1)``, so the
prefill and the set-up that ``generate`` does on every call cancel. Prompts are seeded random token ids. CUDA is
timed with events (synchronized before reading), CPU with
``time.perf_counter``; every measurement warms up, then repeats until both
``min_runs`` and ``min_seconds`` are met. Raw samples are kept in info.
"""

from __future__ import annotations

import os

import torch

import harness
from harness_profilers.options import LatencyOptions
from harness_profilers.timing import UNIT, Timer, generate, model_device, prompt_ids, sample, summarize

STATS = ("p50", "p90", "p99")


def metric_names(batch: int) -> dict[str, bool]:
    """Metric name -> higher is better, for one batch size."""
    names = {f"{phase}_ms_{stat}_b{batch}": False for phase in ("prefill", "decode") for stat in STATS}
    names |= {f"prefill_spread_b{batch}": False, f"decode_spread_b{batch}": False}
    names[f"decode_tokens_per_s_b{batch}"] = True
    return names


def profile(model, tokenizer, options: LatencyOptions, ctx):
    """``Latency.profile``: the measurement (this module imports torch)."""
    device = model_device(model, ctx.device)
    metrics: dict[str, float] = {}
    higher: dict[str, bool] = {}
    per_batch = {}
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        used_threads = torch.get_num_threads()
        for batch in options.batch_sizes:
            outcome = measure_batch(model, batch, options, ctx.seed, device)
            per_batch[str(batch)] = outcome
            metrics |= batch_metrics(batch, outcome)
            higher |= metric_names(batch)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    info = {
        "units": {
            "prefill": f"{UNIT} per prompt",
            "decode": f"{UNIT} per generated token",
            "spread": "(p90-p10)/p50",
        },
        "clock": Timer(device).clock,
        "torch_threads": used_threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "prompt": f"{options.prompt_len} seeded random token ids",
        "method": "prefill = forward(prompt, use_cache); decode = (generate(n) - p50 generate(1)) / (n - 1)",
        "options": {"prompt_len": options.prompt_len, "new_tokens": options.new_tokens},
        "batches": per_batch,
    }
    return harness.EvalResult(metrics, info, higher)


@torch.inference_mode()
def measure_batch(model, batch: int, options: LatencyOptions, seed: int, device: torch.device) -> dict:
    ids = prompt_ids(model, batch, options.prompt_len, seed, device)
    loop = dict(
        warmup=options.warmup, min_runs=options.min_runs, min_seconds=options.min_seconds, max_runs=options.max_runs
    )
    prefill = sample(lambda: model(input_ids=ids, use_cache=True), device, **loop)
    first = sample(lambda: generate(model, ids, 1), device, **loop)
    first_p50 = summarize(first)["p50"]
    totals = sample(lambda: generate(model, ids, options.new_tokens), device, **loop)
    decode = [max(t - first_p50, 0.0) / (options.new_tokens - 1) for t in totals]
    return {
        "prefill": {"samples_ms": prefill, **summarize(prefill)},
        "decode": {
            "samples_ms": decode,
            "generate_samples_ms": totals,
            "generate_1_token_samples_ms": first,
            **summarize(decode),
        },
    }


def batch_metrics(batch: int, outcome: dict) -> dict[str, float]:
    metrics = {}
    for phase in ("prefill", "decode"):
        stats = outcome[phase]
        for stat in STATS:
            metrics[f"{phase}_ms_{stat}_b{batch}"] = stats[stat]
        metrics[f"{phase}_spread_b{batch}"] = stats["rel_spread"]
    p50 = outcome["decode"]["p50"]
    metrics[f"decode_tokens_per_s_b{batch}"] = batch * 1000.0 / p50 if p50 > 0 else float("nan")
    return metrics
