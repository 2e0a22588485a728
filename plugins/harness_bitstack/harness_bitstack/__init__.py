"""BitStack: residual 1-bit blocks for any memory budget (Wang et al. 2024, xinghaow99/BitStack).

Training-free. Each weight's input channels are scaled by an activation
statistic (see ``decompose.activation_scales``) and, with ``fuse_scale`` (the
repo's default), up_proj's and v_proj's output rows by the next layer's
(see ``fusion``); then the weight is peeled
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
from dataclasses import dataclass, field
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
    niter: int = field(default=16, metadata={"minimum": 1})
    """Blocks per weight (the repo's default for its results)."""
    k: int = field(default=16, metadata={"minimum": 1})
    """Rank of each block's magnitude approximation."""
    scale: bool = True
    """Activation-aware scaling of the input channels (the repo's default)."""
    fuse_scale: bool = True
    """The repo's default: fold down_proj's scales into up_proj's rows and, on multi-head attention,
    o_proj's into v_proj's rows before decomposing (o_proj unscaled under grouped-query attention, as
    the repo); false: every weight only has its input columns scaled (the repo's --no_fuse_scale)."""
    statistic: Literal["l2_seq", "l2", "abs_mean"] = "l2_seq"
    """l2_seq (the repo's): each sequence's L2 norm per channel, averaged over sequences (``LayerStats.l2_seq``);
    l2: the pooled sqrt(seqlen * sq_mean) (the default before l2_seq; an upper bound of the repo's);
    abs_mean: mean |x| (AWQ's)."""
    seqlen: int = field(default=2048, metadata={"minimum": 1})
    """Tokens per sequence in the pooled l2 statistic (the repo's calibration length); only weighs eps = 1e-3."""
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
    needs = frozenset({"abs_mean", "l2_seq"})
    Options = BitStackOptions
    description = "BitStack: residual blocks of packed signs x rank-k magnitudes; rank = blocks kept"

    def groups(self, layers, options):
        """One weight per Factorization; with scale fusion a fused weight's group also names its partner
        (statistics only, see ``fusion``)."""
        if not (options.scale and options.fuse_scale):
            return super().groups(layers, options)
        from harness_bitstack.fusion import fusion_groups

        return fusion_groups(layers)

    def factorize(self, weights, stats, options, ctx):
        name, *partner = weights
        weight = weights[name].to(ctx.device)
        other = (partner[0], weights[partner[0]].shape, stats.get(partner[0])) if partner else None
        return self.factorize_fused(name, weight, stats.get(name), other, options, ctx)

    def factorize_matrix(self, name, weight, stats, options, ctx):
        return self.factorize_fused(name, weight, stats, None, options, ctx)

    def factorize_fused(self, name, weight, stats, partner, options, ctx):
        """``partner``: (name, shape, stats) of the fusion partner, or None (see ``fusion``)."""
        from harness_bitstack.decompose import bitstack_decompose
        from harness_bitstack.factorization import BitStackFactorization

        info = {"niter": options.niter, "k": options.k}
        scales, rows = self.scales(name, tuple(weight.shape), stats, partner, options, info)
        blocks = bitstack_decompose(weight, scales, options.niter, options.k, options.svd, row_scales=rows)
        info["rel_error"] = [
            round((e / blocks.errors[0]) ** 0.5, 6) if blocks.errors[0] else 0.0 for e in blocks.errors
        ]
        return BitStackFactorization(name, blocks, cache_dense=options.cache_dense, info=info)

    @staticmethod
    def scales(name, shape, stats, partner, options, info):
        """(input-column scales or None, output-row scales or None), each labelled in ``info``."""
        from harness_bitstack.decompose import activation_scales
        from harness_bitstack.fusion import kind_of, multi_head

        if not options.scale:
            return None, None
        kind = kind_of(name)
        fused = options.fuse_scale and partner is not None
        if fused and kind == "o_proj" and not multi_head(partner[1], shape):
            info["scales"] = "none: grouped-query attention, o_proj is not scaled (the repo's fuse_scale)"
            return None, None
        scales, info["scales"] = activation_scales(stats, options.statistic, options.seqlen)
        rows = None
        if fused and (kind == "up_proj" or (kind == "v_proj" and multi_head(shape, partner[1]))):
            rows, label = activation_scales(partner[2], options.statistic, options.seqlen)
            info["row_scales"] = f"{partner[0].rpartition('.')[2]}'s {label} (fused)"
        elif options.fuse_scale and kind in ("up_proj", "v_proj"):
            info["row_scales"] = "none: not fused (" + ("partner not decomposed" if partner is None else "GQA") + ")"
        return scales, rows


@harness.hookimpl
def register_decomposers(register):
    register(BitStack())


@harness.hookimpl
def register_rank_allocators(register):
    from harness_bitstack.order import BitStackOrder

    register(BitStackOrder())
