"""FWSVD's decomposition: the SVD of the weight with Fisher-weighted input channels."""

from __future__ import annotations

import torch

import harness


def fisher_channel_weights(fisher_in: torch.Tensor, eps: float = 1e-6, guard: str = "floor") -> torch.Tensor:
    """sqrt(f) with zero channels guarded (ones where f is all zero), float64.

    ``guard = "floor"``: f floored at ``eps * mean(f)``; ``guard = "add"``:
    ``f + eps * max(f)``, the small constant the re-implementations add to
    every channel (relative to the largest, so that it does not depend on the
    loss's scale; the BERT one normalizes f by its max, then adds 1e-5).
    """
    f = fisher_in.to(torch.float64)
    mean = f.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(f)
    if guard == "add":
        return (f + eps * f.max()).sqrt()
    return f.clamp_min(eps * mean).sqrt()


def fisher_weighted_svd(
    weight: torch.Tensor,
    fisher_in: torch.Tensor,
    *,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    guard: str = "floor",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fisher-weighted SVD of ``weight`` (m, n) given per-input-channel Fisher ``fisher_in`` (n,).

    Minimizes the Fisher-weighted reconstruction error

    .. math:: \\|(W - AB) D\\|_F^2, \\qquad D = \\operatorname{diag}(\\sqrt{f}),\\;
              f_j = \\textstyle\\sum_i F_{ij},

    whose minimum at rank k is the sum of the discarded squared singular values
    of W D.

    Parameters
    ----------
    weight : (m, n) tensor
    fisher_in : (n,) tensor, the empirical Fisher summed over output rows.
    eps : float
        Floor of f relative to its mean (``guard = "floor"``), or the constant
        added relative to its max (``guard = "add"``).
    dtype : torch.dtype
        Precision of the SVD.

    Returns
    -------
    U (m, r), s (r,), Vt (r, n)
        SVD of W D, r = min(m, n).
    d : (n,) tensor
        The diagonal of D (float64).

    References
    ----------
    Y.-C. Hsu, T. Hua, S. Chang, Q. Lou, Y. Shen, H. Jin. Language Model
    Compression with Weighted Low-Rank Factorization. ICLR 2022.
    """
    d = fisher_channel_weights(fisher_in.to(weight.device), eps, guard)
    U, s, Vt = harness.thin_svd(weight.to(torch.float64) * d, dtype)
    return U, s, Vt, d
