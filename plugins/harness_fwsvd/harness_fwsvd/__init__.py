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

from dataclasses import dataclass, field
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class FWSVDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the decomposition (factors are cast to the model's dtype)."""
    eps: float = field(default=1e-6, metadata={"exclusive_minimum": 0, "exclusive_maximum": 1})
    """guard = floor: floor of each channel's Fisher relative to the layer's mean Fisher; guard = add:
    added to every channel, relative to the layer's largest Fisher (1e-5 is the BERT re-implementation's)."""
    guard: Literal["floor", "add"] = field(default="floor", metadata={"omit_default": True})
    """How zero-Fisher channels are kept invertible: floor, f = max(f, eps mean f) (ours; channels above the
    floor are untouched); add, f = f + eps max f (the re-implementations add a small constant to every f)."""

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}")


class FWSVD(harness.SingleMatrixDecomposer):
    name = "fwsvd"
    needs = frozenset({"fisher"})
    Options = FWSVDOptions
    description = "SVD of W diag(sqrt(Fisher per input channel)) (Fisher-weighted SVD)"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_fwsvd.decompose import fisher_weighted_svd

        dtype = harness.float_dtype(options.dtype)
        U, s, Vt, d = fisher_weighted_svd(weight, stats.fisher_in, eps=options.eps, dtype=dtype, guard=options.guard)
        right = (1 / d).to(dtype)  # diag(D^-1), kept as a vector
        return harness.SVDLikeFactorization(name, U, s, Vt, right=right, out_dtype=weight.dtype)


@harness.hookimpl
def register_decomposers(register):
    register(FWSVD())
