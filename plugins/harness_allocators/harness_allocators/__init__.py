"""Rank allocators: choose each group's rank to meet a suite's global target.

- ``uniform``: the same kept fraction for every matrix (SVD-LLM's default).
- ``energy``: the smallest rank keeping a common fraction of each matrix's energy.
- ``global-greedy``: directions across all matrices by error reduction per unit of budget.
- ``sensitivity``: ASVD's measured calibration loss per layer and ratio, one global threshold.
- ``welore``: WeLore's min-max normalized singular values below one global τ dropped.
"""

from __future__ import annotations

import harness
from harness_allocators.energy import Energy
from harness_allocators.greedy import GlobalGreedy
from harness_allocators.sensitivity import Sensitivity
from harness_allocators.uniform import Uniform
from harness_allocators.welore import WeLore

__version__ = "0.1.0"


@harness.hookimpl
def register_rank_allocators(register):
    register(Uniform())
    register(Energy())
    register(GlobalGreedy())
    register(Sensitivity())
    register(WeLore())
