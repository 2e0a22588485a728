"""LoRD: low-rank decomposition of code LLMs (Kaushal, Vaidhya, Rish 2023, arXiv:2309.14021).

**Data-driven, not weight SVD.** Each Linear is decomposed from its outputs on
calibration data (feature-based decomposition, Yu & Wu 2023's atomic feature
mimicking), as the re-implementation of LoRD in Ji et al. (EMNLP 2024 Findings,
Dereck0602/Bolaco ``lib/prune.py``: ``prune_LORD``, ``EIG_Decomposition``) does:
the *centred* output covariance, its top-k eigenvectors U_k, A = U_k,
B = U_k^T W and a bias (I - U_k U_k^T) mu that puts the discarded directions
back at the outputs' mean mu:

.. math:: \\min_{U^\\top U = I_k,\\, c} \\sum_t \\|y_t - (U U^\\top y_t + c)\\|^2
          = \\sum_{i>k} \\lambda_i\\big(\\textstyle\\sum_t (y_t - \\mu)(y_t - \\mu)^\\top\\big)

(``harness_lord.centred``). LoRD's own method section could not be read here
(README.md says what was read). ``centre = false`` is the uncentred projection
onto the eigenvectors of Y^T Y with no bias, the factors of ``sfsd`` and, with a
full-rank Gram, of ``svd-llm`` (``harness.ProjectionFactorization``).

The centred form needs the mean of each layer's outputs, calibration statistic
``out_mean``. ``centre`` left unset resolves, when the suite is read, to
whether the harness collects it (``"out_mean" in harness.STAT_KINDS``), and the
resolved value is what the cell's id records: a harness without it runs the
uncentred form, and the cells change id, not silently their numbers, once the
statistic exists. Ranks per layer are an allocator's job; one
eigendecomposition serves every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import harness

__version__ = "0.2.0"

MEAN_STAT = "out_mean"


def mean_collected() -> bool:
    """Whether this harness collects the mean of each layer's outputs (``out_mean``)."""
    return MEAN_STAT in harness.STAT_KINDS


@dataclass(frozen=True)
class LoRDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision the factors are kept in until truncation (the eigendecomposition is float64)."""
    centre: bool | None = None
    """Centred covariance and bias (I - U_k U_k^T) mu (the re-implementation LoRD is read from); false: the
    uncentred projection, no bias. Unset: true where the harness collects ``out_mean``, else false."""

    def __post_init__(self) -> None:
        if self.centre is None:
            object.__setattr__(self, "centre", mean_collected())
        elif self.centre and not mean_collected():
            raise ValueError(
                f"centre: true needs the mean of each layer's outputs (calibration statistic {MEAN_STAT!r}), "
                f"which this harness does not collect (statistics: {', '.join(harness.STAT_KINDS)}); "
                "leave centre unset or set it to false"
            )


class LoRD(harness.SingleMatrixDecomposer):
    name = "lord"
    Options = LoRDOptions
    description = "feature-based decomposition: centred PCA of the layer's outputs plus a mean bias (LoRD)"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"out_cov", MEAN_STAT}) if mean_collected() else frozenset({"out_cov"})

    def factorize_matrix(self, name, weight, stats, options, ctx):
        dtype = harness.float_dtype(options.dtype)
        if not options.centre:
            return harness.ProjectionFactorization.from_output_covariance(name, weight, stats.out_cov, dtype=dtype)
        from harness_lord.centred import CentredProjectionFactorization

        mean = getattr(stats, MEAN_STAT, None)
        if mean is None:
            raise RuntimeError(f"lord: no {MEAN_STAT!r} statistic for {name}; centre = true needs it")
        return CentredProjectionFactorization(
            name, weight, stats.out_cov, mean, stats.tokens, layer_bias=getattr(stats, "bias", None), dtype=dtype
        )


@harness.hookimpl
def register_decomposers(register):
    register(LoRD())
