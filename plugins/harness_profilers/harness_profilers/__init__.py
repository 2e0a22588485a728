"""Hardware profilers: ``latency`` (prefill and per-token decode, ms), ``memory``
(peak allocated/reserved on CUDA, peak RSS on CPU, weight bytes) and ``energy``
(joules per generated token from NVML, GPU only).

All three set ``hardware_bound = True``: their numbers depend on the machine,
so the runner records their metric names in ``result["hardware_metrics"]`` and
the leaderboard never puts rows from different hardware in one such table.
"""

from __future__ import annotations

import harness
from harness_profilers.energy import Energy
from harness_profilers.latency import Latency
from harness_profilers.memory import Memory

__version__ = "0.1.0"


@harness.hookimpl
def register_profilers(register):
    register(Latency())
    register(Memory())
    register(Energy())
