"""FWSVD: Fisher-weighted SVD (Hsu et al., ICLR 2022).

The empirical Fisher of the LM loss, F = sum over calibration windows of
(dL/dW)^2, summed over output rows gives one importance per input channel,
f_j = sum_i F_ij (the paper's "row" of x W is an input channel of PyTorch's W).
With D = diag(sqrt(f)), take the SVD W D = U diag(s) V^T; at rank k,
A = U_k diag(s_k)^1/2 and B = diag(s_k)^1/2 V_k^T D^-1:

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|(W - AB) D\\|_F^2 = \\sum_{i>k} s_i^2

Input channels whose Fisher is zero (never used on the calibration data)
would make D singular: f is floored at ``eps`` times its mean (and D = I
where the whole layer has zero Fisher). One SVD serves every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import harness
from harness import linalg

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fisher_channel_weights(fisher_in: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sqrt(f), f floored at ``eps * mean(f)`` (ones where f is all zero), float64."""
    f = fisher_in.to(torch.float64)
    mean = f.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(f)
    return f.clamp_min(eps * mean).sqrt()


def fisher_weighted_svd(
    weight: torch.Tensor,
    fisher_in: torch.Tensor,
    *,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float64,
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
        Floor of f relative to its mean (guards channels with zero Fisher).
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
    d = fisher_channel_weights(fisher_in.to(weight.device), eps)
    U, s, Vt = linalg.thin_svd(weight.to(torch.float64) * d, dtype)
    return U, s, Vt, d


@dataclass(frozen=True)
class FWSVDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the decomposition (factors are cast to the model's dtype)."""
    eps: float = 1e-6
    """Floor of each channel's Fisher, relative to the layer's mean Fisher."""

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}")


class FWSVD(harness.Decomposer):
    name = "fwsvd"
    needs = frozenset({"fisher"})
    Options = FWSVDOptions
    description = "SVD of W diag(sqrt(Fisher per input channel)) (Fisher-weighted SVD)"

    def factorize(self, weights, stats, options, ctx):
        ((name, weight),) = weights.items()
        dtype = DTYPES[options.dtype]
        U, s, Vt, d = fisher_weighted_svd(weight.to(ctx.device), stats[name].fisher_in, eps=options.eps, dtype=dtype)
        right = torch.diag(1 / d).to(dtype)
        return harness.SVDLikeFactorization(name, U, s, Vt, right=right, out_dtype=weight.dtype)


@harness.hookimpl
def register_decomposers(register):
    register(FWSVD())
