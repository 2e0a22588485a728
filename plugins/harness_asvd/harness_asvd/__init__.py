"""ASVD: activation-aware SVD (Yuan et al. 2023; hahnyuan/ASVD4LLM).

Input channels are scaled by their activation magnitude on calibration data,
s_j = (mean_t |X_tj| + eps)^alpha with alpha = 0.5 by default, S = diag(s).
SVD W S = U diag(sigma) V^T; at rank k, A = U_k diag(sigma_k)^1/2 and
B = diag(sigma_k)^1/2 V_k^T S^-1:

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|(W - AB) S\\|_F^2 = \\sum_{i>k} \\sigma_i^2

The scaling ``rms`` uses sqrt(mean_t X_tj^2) instead of mean |X_tj| (both come
from the same calibration pass). By default one exact SVD serves every rank
(nested); ``svd = "lowrank"`` is the repo's randomized SVD per rank
(``lowrank``). ``ratio = "asvd"`` states the repo's ratio convention (every
Linear, the LM head included) and refuses a suite that does not decompose the
head. ASVD's sensitivity-based rank search is a rank allocator, not part of
this decomposer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class ASVDOptions:
    alpha: float = field(default=0.5, metadata={"minimum": 0})
    """Exponent of the activation magnitude (ASVD's default 0.5)."""
    scaling: Literal["abs_mean", "rms"] = "abs_mean"
    """Activation magnitude per input channel: mean |x| (ASVD) or sqrt(mean x^2)."""
    eps: float = field(default=1e-6, metadata={"exclusive_minimum": 0})
    """Added to the magnitude before the power (the repo's guard against zero channels)."""
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the decomposition with ``svd = "full"`` (factors are cast to the model's dtype)."""
    svd: Literal["full", "lowrank"] = field(default="full", metadata={"omit_default": True})
    """full: one exact SVD serves every rank (nested); lowrank: the reference code's
    ``torch.svd_lowrank(W S, q=rank, niter=niter)`` per rank, in float32 (not nested)."""
    niter: int = field(default=2, metadata={"omit_default": True, "minimum": 0})
    """Power iterations of ``svd = "lowrank"`` (torch's default, which the reference code uses)."""
    ratio: Literal["harness", "asvd"] = field(default="harness", metadata={"omit_default": True})
    """harness: a kept fraction counts the suite's decomposable weights; asvd: every Linear with the LM head,
    as the reference code's param ratio (needs ``[surgery] lm_head = true``, refused otherwise)."""

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {self.alpha}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.niter < 0:
            raise ValueError(f"niter must be 0 or more, got {self.niter}")


class ASVD(harness.SingleMatrixDecomposer):
    name = "asvd"
    needs = frozenset({"abs_mean"})
    Options = ASVDOptions
    description = "SVD of W diag(mean|x|^alpha) (activation-aware SVD)"

    def groups(self, layers, options):
        if options.ratio == "asvd" and not any(layer.kind in HEAD_KINDS for layer in layers):
            raise harness.HarnessError(
                'asvd: ratio = "asvd" counts the LM head in the kept fraction and decomposes it, as the '
                'reference code does; set [surgery] lm_head = true (or use ratio = "harness")'
            )
        return super().groups(layers, options)

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_asvd.decompose import activation_aware_svd, activation_scales

        magnitude = stats.abs_mean if options.scaling == "abs_mean" else stats.sq_mean.sqrt()
        scales = activation_scales(magnitude.to(ctx.device), options.alpha, options.eps)
        if options.svd == "lowrank":
            return self.lowrank(name, weight, scales, options, ctx)
        dtype = harness.float_dtype(options.dtype)
        U, s, Vt = activation_aware_svd(weight, scales, dtype=dtype)
        right = (1 / scales).to(dtype)  # diag(S^-1), kept as a vector
        return harness.SVDLikeFactorization(name, U, s, Vt, right=right, out_dtype=weight.dtype)

    @staticmethod
    def lowrank(name, weight, scales, options, ctx):
        from harness_asvd.lowrank import LowrankASVDFactorization

        s32 = scales.to(weight.device, harness.float_dtype("float32"))
        info = {"svd": f"svd_lowrank per rank, niter={options.niter}, float32"}
        return LowrankASVDFactorization(
            name, weight.float() * s32, s32, niter=options.niter, seed=ctx.seed, out_dtype=weight.dtype, info=info
        )


HEAD_KINDS = ("lm_head", "embed_out", "output")
"""Layer kinds of an output head (the names ``harness`` finds with ``[surgery] lm_head = true``)."""


@harness.hookimpl
def register_decomposers(register):
    register(ASVD())
