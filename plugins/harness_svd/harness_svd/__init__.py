"""Truncated SVD: the data-free baseline every other method must beat.

W = U diag(s) V^T; at rank k, A = U_k diag(s_k)^1/2 and B = diag(s_k)^1/2 V_k^T.

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|W - AB\\|_F^2 = \\sum_{i>k} s_i^2

(Eckart-Young). One SVD serves every rank: the factorization is nested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class SVDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the decomposition (factors are cast to the model's dtype)."""
    algorithm: Literal["gram", "lapack"] = "gram"
    """gram: eigh of the smaller Gram (fast; see harness.thin_svd); lapack: torch.linalg.svd."""


class SVD(harness.SingleMatrixDecomposer):
    name = "svd"
    Options = SVDOptions
    description = "truncated SVD of each weight (Eckart-Young); no calibration data"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        U, s, Vt = harness.thin_svd(weight, harness.float_dtype(options.dtype), options.algorithm)
        return harness.SVDLikeFactorization(name, U, s, Vt, out_dtype=weight.dtype)


@harness.hookimpl
def register_decomposers(register):
    register(SVD())
