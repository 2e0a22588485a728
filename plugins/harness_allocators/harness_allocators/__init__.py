"""Rank allocators: choose each group's rank to meet a suite's global target."""

from __future__ import annotations

import harness
from harness_allocators.uniform import Uniform

__version__ = "0.1.0"


@harness.hookimpl
def register_rank_allocators(register):
    register(Uniform())
