"""SFSD: surgical feature-space decomposition (Chavan et al. 2024; nyunAI/SFSD-LLM).

Decompose in the layer's output (feature) space rather than its weight space:
with C = Y^T Y the covariance of the layer's outputs on calibration data
(uncentered, summed over tokens) and U_k its top-k eigenvectors, W ~ U_k (U_k^T W),
i.e. A = U_k and B = U_k^T W:

.. math:: \\min_{U^\\top U = I_k} \\|(I - U U^\\top) W X^\\top\\|_F^2 = \\sum_{i>k} \\lambda_i(C)

Since U_k spans the top-k left singular vectors of W X^T, the projection is
the best rank-k approximation of the outputs (Eckart-Young on W X^T). One
eigendecomposition serves every rank. The "surgical" part of SFSD, the
last-to-first rank search against task accuracy or perplexity, is a rank
allocator, not part of this decomposer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import harness
from harness import linalg

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def feature_space_projection(out_cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions of a layer's outputs: eigenvectors of ``out_cov`` = Y^T Y (m, m).

    The rank-k factorization A = U_k, B = U_k^T W minimizes the output error
    among projections of the output space,

    .. math:: \\|(W - U_k U_k^\\top W) X^\\top\\|_F^2 = \\sum_{i>k} \\lambda_i,

    the sum of the discarded eigenvalues of Y^T Y.

    Parameters
    ----------
    out_cov : (m, m) tensor, Y^T Y of the layer's calibration outputs.

    Returns
    -------
    U : (m, m) tensor, eigenvectors (columns), largest eigenvalue first, float64.
    eigvals : (m,) tensor, descending, clamped at 0, float64.

    References
    ----------
    A. Chavan, N. Lele, D. Gupta. Rethinking Compression: Reduced Order
    Modelling of Latent Features in Large Language Models. arXiv:2312.07046.
    """
    eigvals, U = linalg.eigh_descending(out_cov)
    return U, eigvals


@dataclass(frozen=True)
class SFSDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision the factors are kept in until truncation (the eigendecomposition is float64)."""


class SFSD(harness.Decomposer):
    name = "sfsd"
    needs = frozenset({"out_cov"})
    Options = SFSDOptions
    description = "projection onto the top eigenvectors of the output covariance Y^T Y (feature space)"

    def factorize(self, weights, stats, options, ctx):
        ((name, weight),) = weights.items()
        U, eigvals = feature_space_projection(stats[name].out_cov.to(ctx.device))
        W = weight.to(ctx.device, DTYPES[options.dtype])
        return harness.ProjectionFactorization(name, W, U.to(W.dtype), eigvals, out_dtype=weight.dtype)


@harness.hookimpl
def register_decomposers(register):
    register(SFSD())
