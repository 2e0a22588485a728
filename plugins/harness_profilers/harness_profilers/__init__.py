"""Hardware profilers: ``latency`` (prefill and per-token decode, ms), ``memory``
(peak allocated/reserved on CUDA, peak RSS on CPU, weight bytes) and ``energy``
(joules per generated token from NVML, GPU only).

All three set ``hardware_bound = True``: their numbers depend on the machine,
so the runner records their metric names in ``CellRecord.hardware_metrics`` and
the leaderboard never puts rows from different hardware in one such table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import harness
from harness_profilers.options import EnergyOptions, LatencyOptions, MemoryOptions

__version__ = "0.1.0"

# The measurements (torch) are in latency.py, memory.py and energy.py, imported by ``profile``:
# this module is what ``harness validate`` loads.


def measured_in(module: str) -> Callable[..., harness.EvalResult]:
    """A profiler's ``profile``: ``harness_profilers.<module>.profile``, imported on the first call."""

    def profile(self: harness.Profiler, model: Any, tokenizer: Any, options: Any, ctx: Any) -> harness.EvalResult:
        return importlib.import_module(f"harness_profilers.{module}").profile(model, tokenizer, options, ctx)

    return profile


class Latency(harness.Profiler):
    name = "latency"
    Options = LatencyOptions
    description = "prefill and per-token decode latency (ms), p50/p90/p99"
    hardware_bound = True

    profile = measured_in("latency")


class Memory(harness.Profiler):
    name = "memory"
    Options = MemoryOptions
    description = "peak memory of a forward pass (CUDA allocator or process RSS) and weight bytes"
    hardware_bound = True

    profile = measured_in("memory")


class Energy(harness.Profiler):
    name = "energy"
    Options = EnergyOptions
    description = "joules per generated token from NVML's energy counter (GPU only)"
    hardware_bound = True

    profile = measured_in("energy")


@harness.hookimpl
def register_profilers(register):
    register(Latency())
    register(Memory())
    register(Energy())
