"""Truncated SVD: the data-free baseline every other method must beat.

W = U diag(s) V^T; at rank k, A = U_k diag(s_k)^1/2 and B = diag(s_k)^1/2 V_k^T.

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|W - AB\\|_F^2 = \\sum_{i>k} s_i^2

(Eckart-Young). One SVD serves every rank: the factorization is nested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import harness
from harness.linalg import thin_svd

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SVDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the decomposition (factors are cast to the model's dtype)."""
    algorithm: Literal["gram", "lapack"] = "gram"
    """gram: eigh of the smaller Gram (fast; see harness.linalg.thin_svd); lapack: torch.linalg.svd."""


class SVD(harness.Decomposer):
    name = "svd"
    Options = SVDOptions
    description = "truncated SVD of each weight (Eckart-Young); no calibration data"

    def factorize(self, weights, stats, options, ctx):
        ((name, weight),) = weights.items()
        U, s, Vt = thin_svd(weight.to(ctx.device), DTYPES[options.dtype], options.algorithm)
        return harness.SVDLikeFactorization(name, U, s, Vt, out_dtype=weight.dtype)


@harness.hookimpl
def register_decomposers(register):
    register(SVD())
