"""Timing shared by the profilers: a synchronizing timer, a sampling loop, statistics.

``Timer`` is a context manager: on CUDA it records events around the block and
synchronizes before reading them (kernels are asynchronous; a host clock would
time the launch, not the work); on CPU it reads ``time.perf_counter``.
``sample`` warms up, then repeats until both a minimum count and a minimum
duration are met (optimum-benchmark's ``LatencyTracker`` habit), and keeps every
raw sample. ``summarize`` gives percentiles and the relative spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

UNIT = "ms"


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


class Timer:
    """``with Timer(device) as t: work()`` then ``t.ms``: wall time of the block in milliseconds."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = is_cuda(self.device) and torch.cuda.is_available()
        self.ms = float("nan")

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.ms = float(self._start.elapsed_time(self._end))
        else:
            self.ms = (time.perf_counter() - self._t0) * 1000.0

    @property
    def clock(self) -> str:
        return "cuda events" if self.cuda else "time.perf_counter"


def sample(
    work: Callable[[], Any],
    device: torch.device | str,
    warmup: int,
    min_runs: int,
    min_seconds: float,
    max_runs: int,
) -> list[float]:
    """Milliseconds of ``work()`` per run: ``warmup`` untimed runs, then runs until
    at least ``min_runs`` and ``min_seconds`` (never more than ``max_runs``)."""
    for _ in range(warmup):
        work()
    synchronize(device)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - started < min_seconds):
        with Timer(device) as timer:
            work()
        samples.append(timer.ms)
    return samples


def summarize(samples: list[float]) -> dict[str, float]:
    """n, mean, std, min, max, p10/p50/p90/p99 and ``rel_spread`` = (p90 - p10) / p50."""
    values = np.asarray(samples, dtype=np.float64)
    p10, p50, p90, p99 = (float(v) for v in np.percentile(values, [10, 50, 90, 99]))
    return {
        "n": len(samples),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "p10": p10,
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "rel_spread": (p90 - p10) / p50 if p50 > 0 else float("nan"),
    }


def prompt_ids(model: torch.nn.Module, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids (batch, length): timing must not depend on text."""
    vocab = int(getattr(model.config, "vocab_size", 32000))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device(fallback)


def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (end-of-sequence suppressed until then);
    ``kwargs`` go to ``generate`` (e.g. ``cache_implementation="static"``)."""
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        **kwargs,
    )
