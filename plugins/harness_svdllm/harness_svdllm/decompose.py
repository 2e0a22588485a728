"""SVD-LLM's decomposition: the SVD of the weight whitened by the Cholesky factor of its input Gram."""

from __future__ import annotations

import torch

import harness


def whitened_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    eps: float = harness.CHOLESKY_EPS,
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
    S, jitter = harness.cholesky_with_jitter(gram.to(weight.device), eps=eps)
    U, s, Vt = harness.thin_svd(weight.to(torch.float64) @ S, dtype)
    return U, s, Vt, harness.lower_triangular_inverse(S).to(dtype), jitter
