"""BitStack: residual 1-bit blocks for any memory budget (Wang et al. 2024, xinghaow99/BitStack).

Training-free. Each weight's input channels are scaled by an activation
statistic (see ``decompose.activation_scales``), then the weight is peeled
into ``niter`` residual blocks sign(R) ⊙ (rank-k approximation of |R|),
each block minimising the scaled residual:

.. math:: \\|(W - \\hat W_r)\\, \\operatorname{diag}(s)\\|_F^2

The Factorization's rank is the number of blocks kept (0..niter); the
``bitstack-order`` allocator ranks every block of every weight globally and
loads the longest prefix that fits a memory budget, so one decomposition and
one order serve every size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

import harness

__version__ = "0.1.0"
__all__ = [
    "BitStack",
    "BitStackFactorization",
    "BitStackLinear",
    "BitStackOrder",
    "bitstack_bytes",
    "pack_signs",
    "unpack_signs",
]

_SUBMODULE = {  # resolved on first use (PEP 562), so that importing the plugin loads no torch
    "BitStackFactorization": "factorization",
    "BitStackLinear": "factorization",
    "bitstack_bytes": "factorization",
    "BitStackOrder": "order",
    "pack_signs": "packing",
    "unpack_signs": "packing",
}


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module 'harness_bitstack' has no attribute {name!r}")
    return getattr(importlib.import_module(f"harness_bitstack.{_SUBMODULE[name]}"), name)


@dataclass(frozen=True)
class BitStackOptions:
    niter: int = 16
    """Blocks per weight (the repo's default for its results)."""
    k: int = 16
    """Rank of each block's magnitude approximation."""
    scale: bool = True
    """Activation-aware scaling of the input channels (the repo's default)."""
    statistic: Literal["l2", "abs_mean"] = "l2"
    """l2: per-sequence L2 norm of each channel, sqrt(seqlen * sq_mean) (the repo's); abs_mean: mean |x| (AWQ's)."""
    seqlen: int = 2048
    """Tokens per sequence in the l2 statistic (the repo's calibration length); only weighs eps = 1e-3."""
    svd: Literal["full", "lowrank"] = "full"
    """full: exact SVD of |R| per block (the repo's); lowrank: randomized rank-(k+8) SVD with 4 power
    iterations (torch.svd_lowrank, 4 power iterations, seeded), much faster on CPU and close for the top k."""
    cache_dense: bool = False
    """Materialized layers rebuild the weight once and keep it (faster, more memory) instead of every forward."""

    def __post_init__(self) -> None:
        for key in ("niter", "k", "seqlen"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected a positive integer, got {getattr(self, key)}")


class BitStack(harness.SingleMatrixDecomposer):
    name = "bitstack"
    needs = frozenset({"abs_mean"})
    Options = BitStackOptions
    description = "BitStack: residual blocks of packed signs x rank-k magnitudes; rank = blocks kept"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_bitstack.decompose import activation_scales, bitstack_decompose
        from harness_bitstack.factorization import BitStackFactorization

        info = {"niter": options.niter, "k": options.k}
        scales = None
        if options.scale:
            scales, info["scales"] = activation_scales(stats, options.statistic, options.seqlen)
        blocks = bitstack_decompose(weight, scales, options.niter, options.k, options.svd)
        info["rel_error"] = [
            round((e / blocks.errors[0]) ** 0.5, 6) if blocks.errors[0] else 0.0 for e in blocks.errors
        ]
        return BitStackFactorization(name, blocks, cache_dense=options.cache_dense, info=info)


@harness.hookimpl
def register_decomposers(register):
    register(BitStack())


@harness.hookimpl
def register_rank_allocators(register):
    from harness_bitstack.order import BitStackOrder

    register(BitStackOrder())
