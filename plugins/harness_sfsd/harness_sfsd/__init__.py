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

Reference: A. Chavan, N. Lele, D. Gupta. Rethinking Compression: Reduced Order
Modelling of Latent Features in Large Language Models. arXiv:2312.07046.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class SFSDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision the factors are kept in until truncation (the eigendecomposition is float64)."""


class SFSD(harness.SingleMatrixDecomposer):
    name = "sfsd"
    needs = frozenset({"out_cov"})
    Options = SFSDOptions
    description = "projection onto the top eigenvectors of the output covariance Y^T Y (feature space)"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        dtype = harness.float_dtype(options.dtype)
        return harness.ProjectionFactorization.from_output_covariance(name, weight, stats.out_cov, dtype=dtype)


@harness.hookimpl
def register_decomposers(register):
    register(SFSD())
