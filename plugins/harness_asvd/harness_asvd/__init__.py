"""ASVD: activation-aware SVD (Yuan et al. 2023; hahnyuan/ASVD4LLM).

Input channels are scaled by their activation magnitude on calibration data,
s_j = (mean_t |X_tj| + eps)^alpha with alpha = 0.5 by default, S = diag(s).
SVD W S = U diag(sigma) V^T; at rank k, A = U_k diag(sigma_k)^1/2 and
B = diag(sigma_k)^1/2 V_k^T S^-1:

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|(W - AB) S\\|_F^2 = \\sum_{i>k} \\sigma_i^2

The scaling ``rms`` uses sqrt(mean_t X_tj^2) instead of mean |X_tj| (both come
from the same calibration pass). Unlike the repo, which calls a randomized SVD
per rank, one exact SVD serves every rank (nested). ASVD's sensitivity-based
rank search is a rank allocator, not part of this decomposer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class ASVDOptions:
    alpha: float = 0.5
    """Exponent of the activation magnitude (ASVD's default 0.5)."""
    scaling: Literal["abs_mean", "rms"] = "abs_mean"
    """Activation magnitude per input channel: mean |x| (ASVD) or sqrt(mean x^2)."""
    eps: float = 1e-6
    """Added to the magnitude before the power (the repo's guard against zero channels)."""
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the decomposition (factors are cast to the model's dtype)."""

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {self.alpha}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")


class ASVD(harness.SingleMatrixDecomposer):
    name = "asvd"
    needs = frozenset({"abs_mean"})
    Options = ASVDOptions
    description = "SVD of W diag(mean|x|^alpha) (activation-aware SVD)"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_asvd.decompose import activation_aware_svd, activation_scales

        magnitude = stats.abs_mean if options.scaling == "abs_mean" else stats.sq_mean.sqrt()
        scales = activation_scales(magnitude.to(ctx.device), options.alpha, options.eps)
        dtype = harness.float_dtype(options.dtype)
        U, s, Vt = activation_aware_svd(weight, scales, dtype=dtype)
        right = (1 / scales).to(dtype)  # diag(S^-1), kept as a vector
        return harness.SVDLikeFactorization(name, U, s, Vt, right=right, out_dtype=weight.dtype)


@harness.hookimpl
def register_decomposers(register):
    register(ASVD())
