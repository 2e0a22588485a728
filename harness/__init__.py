"""harness: compare weight-decomposition methods for LLM compression, reproducibly.

The public API for plugins is re-exported here: ``hookimpl``, the component
base classes, ``Factorization`` and its replacements, ``Target`` and
``HarnessError``.
"""

from __future__ import annotations

import pluggy

from harness.api import (
    STAT_KINDS,
    AllocationContext,
    Decomposer,
    EvalResult,
    Evaluator,
    FactorizeContext,
    LayerInfo,
    LayerStats,
    NoOptions,
    Profiler,
    RankAllocator,
    RunContext,
    Tracker,
)
from harness.errors import HarnessError
from harness.factorization import (
    Dense,
    Factorization,
    LowRank,
    ProjectionFactorization,
    Replacement,
    SVDLikeFactorization,
    break_even_rank,
    lowrank_params,
)
from harness.targets import Target

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("harness")

__all__ = [
    "STAT_KINDS",
    "AllocationContext",
    "Decomposer",
    "Dense",
    "EvalResult",
    "Evaluator",
    "Factorization",
    "FactorizeContext",
    "HarnessError",
    "LayerInfo",
    "LayerStats",
    "LowRank",
    "NoOptions",
    "Profiler",
    "ProjectionFactorization",
    "RankAllocator",
    "Replacement",
    "RunContext",
    "SVDLikeFactorization",
    "Target",
    "Tracker",
    "__version__",
    "break_even_rank",
    "hookimpl",
    "lowrank_params",
]
