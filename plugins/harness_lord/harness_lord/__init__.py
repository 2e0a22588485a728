"""LoRD: low-rank decomposition of code LLMs (Kaushal, Vaidhya, Rish 2023, arXiv:2309.14021).

**Data-driven, not weight SVD.** LoRD decomposes each Linear from its outputs
on calibration data, the feature-based decomposition of Yu & Wu (2023,
"Compressing Transformers: Features Are Low-Rank, but Weights Are Not!",
Atomic Feature Mimicking): with C = Y^T Y the covariance of the layer's
outputs and U_k its top-k eigenvectors, W ~ U_k (U_k^T W), i.e. A = U_k and
B = U_k^T W:

.. math:: \\min_{U^\\top U = I_k} \\|(I - U U^\\top) W X^\\top\\|_F^2 = \\sum_{i>k} \\lambda_i(C)

Sources: the paper's abstract (arXiv:2309.14021, one-shot, StarCoder 16B to
13.2B in under 10 minutes on one A100, no training); its method section could
not be read through the tools available here, so the classification rests on
Ji et al. (EMNLP 2024, "Adaptive Feature-based Low-Rank Compression of LLMs
via Bayesian Optimization"), which lists LoRD (Kaushal et al., 2023) with
Chen et al. (2021) and Yu & Wu (2023) as *feature-based* decomposition that
"aims to minimize the reconstruction error of features". AFM centres the
outputs and compensates the bias, (I - U_k U_k^T) E[Y]; Llama-style layers
have no bias and the harness's ``LowRank`` replacement carries none, so the
uncentered covariance is used here, which makes the factors the same as
``sfsd``'s (both are ``harness.ProjectionFactorization.from_output_covariance``).
What distinguishes the papers is how ranks are chosen per layer,
which is an allocator's job here (LoRD's own rank policy could not be
checked from its text). One eigendecomposition serves every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class LoRDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision the factors are kept in until truncation (the eigendecomposition is float64)."""


class LoRD(harness.SingleMatrixDecomposer):
    name = "lord"
    needs = frozenset({"out_cov"})
    Options = LoRDOptions
    description = "feature-based decomposition: PCA of the layer's outputs (LoRD / atomic feature mimicking)"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        dtype = harness.float_dtype(options.dtype)
        return harness.ProjectionFactorization.from_output_covariance(name, weight, stats.out_cov, dtype=dtype)


@harness.hookimpl
def register_decomposers(register):
    register(LoRD())
