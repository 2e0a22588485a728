"""TRAWL: CP / Tucker decomposition of stacked weight matrices (Luo et al. 2024).

Several weight matrices of one shape are stacked into a 3-way tensor T
(S, m, n) and decomposed jointly:

.. math:: \\min_{\\hat T} \\|T - \\hat T\\|_F^2, \\quad
          \\hat T \\text{ of CP rank } r \\text{ (trawl-cp) or Tucker ranks } (t, r, r) \\text{ (trawl-tucker)}

by alternating least squares (tensorly, PyTorch backend, seeded random
init). ``mode = "denoise"`` writes each slice of the reconstruction back as a
dense weight (the paper's use: no memory saved); ``mode = "compress"`` keeps
the factors. See ``stacking`` for the groupings (per layer, across the model,
per third), ``validation`` for the paper's rank choice by held-out score and
``README.md`` for the conventions and deviations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import harness
from harness_trawl.stacking import FAMILIES, check_layers_spec, trawl_groups
from harness_trawl.validation import TrawlValidation

__version__ = "0.1.0"
__all__ = ["TrawlCP", "TrawlTucker", "TrawlValidation"]


@dataclass(frozen=True)
class TrawlCPOptions:
    by: Literal["layer-attn", "layer-mlp", "model-attn", "model-mlp", "thirds-attn", "thirds-mlp", "across-layers"] = (
        "layer-mlp"
    )
    """Which matrices are stacked together: per layer, across the model or per third (harness_trawl.stacking)."""
    layers: str | list[int] = field(default="all", metadata={"model": "layers"})
    """Layers treated: "all", "first:N", "last:N" or a list of indices; the rest stay dense."""
    kinds: list[str] | None = field(default=None, metadata={"unique": True, "model": "kinds"})
    """Only these projection kinds (e.g. ["gate_proj", "up_proj", "down_proj"]); None: every kind of ``by``."""
    ranks: list[int] = field(default_factory=lambda: [8, 16, 32], metadata={"minimum": 1, "min_items": 1})
    """The ranks an allocator may choose from; each is its own decomposition."""
    mode: Literal["denoise", "compress"] = "denoise"
    """denoise: dense slices of the reconstruction; compress: keep the factors."""
    n_iter_max: int = field(default=100, metadata={"minimum": 1})
    """ALS iterations at most (tensorly's default, as in the authors' code)."""
    tol: float | None = field(default=None, metadata={"exclusive_minimum": 0})
    """ALS stopping tolerance; None: tensorly's default (1e-8 CP, 1e-4 Tucker)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Precision of the decomposition (replacements are cast to the model's dtype)."""

    def __post_init__(self) -> None:
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise harness.HarnessError(f"ranks: expected a non-empty list of positive integers, got {self.ranks}")
        if self.n_iter_max < 1:
            raise harness.HarnessError(f"n_iter_max: expected at least 1, got {self.n_iter_max}")
        check_layers_spec(self.layers)
        unknown = [kind for kind in self.kinds or () if kind not in FAMILIES[self.by]]
        if unknown:  # known without the model: the kinds ``by`` stacks
            raise harness.HarnessError(
                f"kinds: expected kinds that by = {self.by!r} stacks ({', '.join(FAMILIES[self.by])}), got {unknown}"
            )


@dataclass(frozen=True)
class TrawlTuckerOptions(TrawlCPOptions):
    stack_rank: int | None = field(default=None, metadata={"minimum": 1})
    """Tucker rank of the stacking mode; None: the stack size S (no compression along it).
    The authors' code uses 2."""


class _Trawl(harness.Decomposer):
    method: ClassVar[str]

    def groups(self, layers, options):
        return trawl_groups(layers, options.by, options.layers, options.kinds)

    def factorize(self, weights, stats, options, ctx):
        from harness_trawl.factorization import TrawlFactorization

        return TrawlFactorization(
            weights,
            method=self.method,
            ranks=options.ranks,
            mode=options.mode,
            seed=ctx.seed,
            device=ctx.device,
            dtype=harness.float_dtype(options.dtype),
            stack_rank=getattr(options, "stack_rank", None),
            n_iter_max=options.n_iter_max,
            tol=options.tol,
            grouping=options.by,
        )


class TrawlCP(_Trawl):
    name = "trawl-cp"
    method = "cp"
    Options = TrawlCPOptions
    description = "TRAWL: CP (parafac) of stacked weight matrices; denoise or keep factors"


class TrawlTucker(_Trawl):
    name = "trawl-tucker"
    method = "tucker"
    Options = TrawlTuckerOptions
    description = "TRAWL: Tucker of stacked weight matrices, ranks (S, R, R); denoise or keep factors"


@harness.hookimpl
def register_decomposers(register):
    register(TrawlCP())
    register(TrawlTucker())


@harness.hookimpl
def register_rank_allocators(register):
    register(TrawlValidation())
