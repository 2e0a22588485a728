"""ZS-SVD's decomposer numerics: SVD-LLM's Cholesky whitening, then the first-order scores (float64)."""

from __future__ import annotations

import torch

import harness
from harness_zssvd.scores import predicted_changes, sigma_gradients


def scored_whitened_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    grad: torch.Tensor,
    *,
    eps: float = harness.CHOLESKY_EPS,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, list[float]]:
    """U, s, Vt of W L (L L^T = X^T X + jitter I), L^-1, the jitter, and Delta L_i per component.

    ``weight`` (m, n), ``gram`` X^T X (n, n) summed over tokens, ``grad`` the
    calibration loss's dL/dW (m, n). The Cholesky, its inverse and the scores
    are float64 on ``weight``'s device; ``dtype`` is the SVD's precision.
    """
    L, jitter = harness.cholesky_with_jitter(gram.to(weight.device))
    L_inv = harness.lower_triangular_inverse(L)
    U, s, Vt = harness.thin_svd(weight.to(torch.float64) @ L, dtype)
    deltas = predicted_changes(s, sigma_gradients(U, Vt, L_inv, grad))
    return U, s, Vt, L_inv.to(dtype), jitter, deltas
