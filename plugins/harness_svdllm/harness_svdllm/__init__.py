"""SVD-LLM: truncation-aware data whitening (Wang et al., ICLR 2025; AIoT-MLSys-Lab/SVD-LLM).

With G = X^T X the Gram of the layer's calibration inputs and S its lower
Cholesky factor (G = S S^T), take the SVD W S = U diag(s) V^T; at rank k,
A = U_k diag(s_k)^1/2 and B = diag(s_k)^1/2 V_k^T S^-1. Since
||(W - AB) X^T||_F^2 = ||(W - AB) S||_F^2, truncating the smallest s_i is
optimal for the layer's output:

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|(W - AB) X^\\top\\|_F^2 = \\sum_{i>k} s_i^2

Where G is singular the Cholesky gets jitter on its diagonal (the repo's rule,
``harness.cholesky_with_jitter``); the objective is then that of
G + jitter I, and the jitter is recorded in ``Factorization.info``. One SVD
serves every rank. The repo's optional LoRA "parameter update" stage is not
part of this decomposer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class SVDLLMOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the SVD (the Cholesky is always float64; factors are cast to the model's dtype)."""
    jitter_eps: float = 1e-6
    """Added on top of -lambda_min to the Gram's diagonal where Cholesky fails (SVD-LLM's 1e-6,
    ``harness.CHOLESKY_EPS``; written out here so that reading the options needs no torch)."""

    def __post_init__(self) -> None:
        if self.jitter_eps <= 0:
            raise ValueError(f"jitter_eps must be positive, got {self.jitter_eps}")


class SVDLLM(harness.SingleMatrixDecomposer):
    name = "svd-llm"
    needs = frozenset({"gram"})
    Options = SVDLLMOptions
    description = "SVD of W S with S the Cholesky factor of X^T X (truncation-aware whitening)"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_svdllm.decompose import whitened_svd

        dtype = harness.float_dtype(options.dtype)
        U, s, Vt, S_inv, jitter = whitened_svd(weight, stats.gram, eps=options.jitter_eps, dtype=dtype)
        if jitter:
            ctx.log(f"svd-llm: {name}: Gram not positive definite, added {jitter:.3g} to its diagonal")
        info = {"jitter": jitter, "tokens": stats.tokens}
        return harness.SVDLikeFactorization(name, U, s, Vt, right=S_inv, out_dtype=weight.dtype, info=info)


@harness.hookimpl
def register_decomposers(register):
    register(SVDLLM())
