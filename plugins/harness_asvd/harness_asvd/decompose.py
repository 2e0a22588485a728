"""ASVD's decomposition: the SVD of the weight with activation-scaled input channels."""

from __future__ import annotations

import torch

import harness


def activation_scales(magnitude: torch.Tensor, alpha: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """s = (magnitude + eps)^alpha per input channel, float64 (``eps`` guards dead channels)."""
    return (magnitude.to(torch.float64) + eps).pow(alpha)


def activation_aware_svd(
    weight: torch.Tensor,
    scales: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``weight`` (m, n) with its input channels scaled by ``scales`` (n,).

    Minimizes the activation-scaled reconstruction error

    .. math:: \\|(W - AB) S\\|_F^2, \\qquad S = \\operatorname{diag}(s),

    whose minimum at rank k is the sum of the discarded squared singular values
    of W S.

    Parameters
    ----------
    weight : (m, n) tensor
    scales : (n,) tensor of positive channel scales (``activation_scales``).
    dtype : torch.dtype
        Precision of the SVD.

    Returns
    -------
    U (m, r), s (r,), Vt (r, n)
        SVD of W S, r = min(m, n).

    References
    ----------
    Z. Yuan, Y. Shang, Y. Song, Q. Wu, Y. Yan, G. Sun. ASVD: Activation-aware
    Singular Value Decomposition for Compressing Large Language Models.
    arXiv:2312.05821, 2023.
    """
    return harness.thin_svd(weight.to(torch.float64) * scales.to(weight.device, torch.float64), dtype)
