"""AA-SVD (Sinha, Fleuret; arXiv 2604.02119, 2026): anchored and adaptive SVD.

Decomposer ``aa-svd``: each Linear's rank-k factors minimize the distance
between the ORIGINAL model's outputs and the compressed layer's outputs on the
inputs it actually receives once the blocks before it are compressed
(the paper's Objective 4, its default ``obj4`` in the official code):

    min_{rank W' <= k} ||W X^T - W' X'^T||_F^2,
    W' = [W C L^-T]_k L^-1,  C = X^T X',  X'^T X' = L L^T.

Run it with ``[calibration] pipeline = "blocks"``, ``inputs = "propagated"``:
then ``gram`` is X'^T X' and ``anchor_cross`` is X^T X' (the core keeps a
stream of the original model's activations beside each compressed one). On
original inputs X' = X and the factors are SVD-LLM's, bit for bit.

Under propagated inputs a block's statistics are collected stage by stage by default (``sequential``:
q/k/v, o, gate/up, down, each with the block's earlier stages compressed, as the official code does).

``refine = true`` adds the paper's block-level refinement (a weight optimization,
off by default): under propagated inputs each compressed block's factors are
trained so that its outputs on X' match the original block's outputs on X
(``harness_aasvd.refine``, through the core's ``Decomposer.refine_block``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import harness

__version__ = "0.2.0"


@dataclass(frozen=True)
class AASVDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the SVD (the Cholesky is always float64; factors are cast to the model's dtype)."""
    jitter_eps: float = field(default=1e-6, metadata={"exclusive_minimum": 0})
    """Added on top of -lambda_min to the diagonal of X'^T X' where its Cholesky fails (SVD-LLM's 1e-6,
    ``harness.CHOLESKY_EPS``, grown tenfold while it still fails; the official code adds 1e-3 once)."""

    sequential: bool = field(default=True, metadata={"omit_default": True})
    """Under propagated inputs, a block's statistics stage by stage (q/k/v, then o, then gate/up, then down),
    each stage's X' through the block's earlier stages compressed, as the official code collects them
    (``Decomposer.sequential_within_block``); false: one forward through the uncompressed block, X' carrying
    only the earlier blocks' shift (0.1.0's only way)."""
    refine: bool = field(default=False, metadata={"omit_default": True})
    """Block-level refinement (a weight optimization, the official code's default; off here): each block's
    factors trained to the original block's outputs. Needs ``calibration.inputs = "propagated"`` and the
    ``uniform`` allocator with a per-matrix target (params or rank)."""
    refine_lr: float = field(default=1e-4, metadata={"exclusive_minimum": 0, "omit_default": True})
    """AdamW's peak learning rate."""
    refine_weight_decay: float = field(default=0.01, metadata={"minimum": 0, "omit_default": True})
    """AdamW's weight decay."""
    refine_epochs: int = field(default=25, metadata={"minimum": 1, "omit_default": True})
    """Passes over the calibration batches (one optimizer step per batch)."""
    refine_warmup: float = field(default=0.1, metadata={"minimum": 0, "exclusive_maximum": 1, "omit_default": True})
    """Fraction of the steps with a linear warm-up of the learning rate from 0."""
    refine_final_lr: float = field(default=0.1, metadata={"minimum": 0, "maximum": 1, "omit_default": True})
    """Where the cosine decay after the warm-up ends, as a fraction of ``refine_lr``."""
    refine_clip: float = field(default=1.0, metadata={"exclusive_minimum": 0, "omit_default": True})
    """Gradient clipping: the largest norm of the factors' gradients (all together) per step."""

    def __post_init__(self) -> None:
        if not self.jitter_eps > 0:
            raise ValueError(f"jitter_eps: expected a positive number, got {self.jitter_eps!r}")


class AASVD(harness.SingleMatrixDecomposer):
    name = "aa-svd"
    needs = frozenset({"gram", "anchor_cross"})
    Options = AASVDOptions
    description = "SVD of W C L^-T, C = X^T X' (original x propagated inputs), L L^T = X'^T X' (anchored, shift-aware)"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_aasvd.decompose import anchored_svd, no_shift

        if stats is None or stats.gram is None or stats.anchor_cross is None:
            raise harness.HarnessError(f"aa-svd: {name} has no calibration statistics (needs 'gram', 'anchor_cross')")
        dtype = harness.float_dtype(options.dtype)
        U, s, Vt, L_inv, jitter = anchored_svd(
            weight, stats.gram, stats.anchor_cross, eps=options.jitter_eps, dtype=dtype
        )
        if jitter:
            ctx.log(f"aa-svd: {name}: X'^T X' not positive definite, added {jitter:.3g} to its diagonal")
        shifted = not no_shift(stats.gram, stats.anchor_cross)
        info = {"jitter": jitter, "tokens": stats.tokens, "shifted": shifted}
        return harness.SVDLikeFactorization(name, U, s, Vt, right=L_inv, out_dtype=weight.dtype, info=info)

    def sequential_within_block(self, options) -> bool:
        return bool(options.sequential)

    def refines(self, options) -> bool:
        return bool(options.refine)

    def refine_block(self, block, replacements, inputs, targets, options, ctx):
        from harness_aasvd.refine import refine_block

        return refine_block(replacements, inputs, targets, options, ctx)


@harness.hookimpl
def register_decomposers(register):
    register(AASVD())
