"""SVD-LLM: truncation-aware data whitening (Wang et al., ICLR 2025; AIoT-MLSys-Lab/SVD-LLM).

With G = X^T X the Gram of the layer's calibration inputs and S its lower
Cholesky factor (G = S S^T), take the SVD W S = U diag(s) V^T; at rank k,
A = U_k diag(s_k)^1/2 and B = diag(s_k)^1/2 V_k^T S^-1. Since
||(W - AB) X^T||_F^2 = ||(W - AB) S||_F^2, truncating the smallest s_i is
optimal for the layer's output:

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|(W - AB) X^\\top\\|_F^2 = \\sum_{i>k} s_i^2

Where G is singular the Cholesky gets jitter on its diagonal (the repo's rule,
``harness.linalg.cholesky_with_jitter``); the objective is then that of
G + jitter I, and the jitter is recorded in ``Factorization.info``. One SVD
serves every rank. The repo's optional LoRA "parameter update" stage is not
part of this decomposer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import harness
from harness import linalg

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def whitened_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    eps: float = linalg.CHOLESKY_EPS,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Truncation-aware whitened SVD of ``weight`` (m, n) given the input Gram ``gram`` (n, n).

    Minimizes the output error of every truncation,

    .. math:: \\|(W - A B) X^\\top\\|_F^2 = \\|(W - AB) S\\|_F^2, \\qquad G = X^\\top X = S S^\\top,

    whose minimum at rank k is the sum of the discarded squared singular values
    of W S.

    Parameters
    ----------
    weight : (m, n) tensor
    gram : (n, n) tensor, X^T X of the calibration inputs (summed over tokens).
    eps : float
        Added on top of -lambda_min to the diagonal where Cholesky fails.
    dtype : torch.dtype
        Precision of the SVD (the Cholesky is always float64).

    Returns
    -------
    U (m, r), s (r,), Vt (r, n)
        SVD of W S, r = min(m, n).
    S_inv : (n, n) tensor
        S^-1, to fold into the right factor.
    jitter : float
        What was added to G's diagonal (0.0 where G was positive definite).

    References
    ----------
    X. Wang, Y. Zheng, Z. Wan, M. Zhang. SVD-LLM: Truncation-aware Singular
    Value Decomposition for Large Language Model Compression. ICLR 2025.
    """
    S, jitter = linalg.cholesky_with_jitter(gram.to(weight.device), eps=eps)
    U, s, Vt = linalg.thin_svd(weight.to(torch.float64) @ S, dtype)
    return U, s, Vt, linalg.lower_triangular_inverse(S).to(dtype), jitter


@dataclass(frozen=True)
class SVDLLMOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the SVD (the Cholesky is always float64; factors are cast to the model's dtype)."""
    jitter_eps: float = linalg.CHOLESKY_EPS
    """Added on top of -lambda_min to the Gram's diagonal where Cholesky fails (SVD-LLM: 1e-6)."""

    def __post_init__(self) -> None:
        if self.jitter_eps <= 0:
            raise ValueError(f"jitter_eps must be positive, got {self.jitter_eps}")


class SVDLLM(harness.Decomposer):
    name = "svd-llm"
    needs = frozenset({"gram"})
    Options = SVDLLMOptions
    description = "SVD of W S with S the Cholesky factor of X^T X (truncation-aware whitening)"

    def factorize(self, weights, stats, options, ctx):
        ((name, weight),) = weights.items()
        layer = stats[name]
        U, s, Vt, S_inv, jitter = whitened_svd(
            weight.to(ctx.device), layer.gram, eps=options.jitter_eps, dtype=DTYPES[options.dtype]
        )
        if jitter:
            ctx.log(f"svd-llm: {name}: Gram not positive definite, added {jitter:.3g} to its diagonal")
        info = {"jitter": jitter, "tokens": layer.tokens}
        return harness.SVDLikeFactorization(name, U, s, Vt, right=S_inv, out_dtype=weight.dtype, info=info)


@harness.hookimpl
def register_decomposers(register):
    register(SVDLLM())
