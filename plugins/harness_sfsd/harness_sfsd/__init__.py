"""SFSD: surgical feature-space decomposition (Chavan, Lele, Gupta, ACL 2024, arXiv:2405.13039;
code nyunAI/SFSD-LLM).

Two components:

- decomposer ``sfsd``: each Linear decomposed in its output (feature) space, as the
  code's ``DecomposeLinearEigen`` does: the top-k eigenvectors U_k of the *centred*
  covariance of the layer's outputs, A = U_k, B = U_k^T W, and a bias that puts the
  discarded directions back at the outputs' mean mu, (I - U_k U_k^T) mu
  (``harness_sfsd.feature``). ``centre = false`` is the uncentred projection onto the
  eigenvectors of Y^T Y with no bias (the numbers of this plugin before 0.2.0, the
  factors of uncentred ``lord`` and, with a full-rank Gram, of ``svd-llm``);
  ``compensate = false`` keeps the centred eigenvectors without the bias, which is
  what the code computes (its compensation term evaluates to zero, README.md).
- allocator ``surgical``: the code's perplexity-based surgical rank search
  (``perplexity_test.py``), last layer to first (``harness_sfsd.surgical``).

SFSD's code collects each layer's statistics on the progressively decomposed model;
a suite gets that with ``[calibration] inputs = "propagated"`` (suites/sfsd_paper.toml), within a block
stage by stage (``sequential``, the default).
The decomposer cannot see the suite, so it cannot check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import harness

__version__ = "0.3.0"

MEAN_STAT = "out_mean"


@dataclass(frozen=True)
class SFSDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision the factors are kept in until truncation (the eigendecomposition is float64)."""
    centre: bool = True
    """Eigenvectors of the centred output covariance (the code's ``torch.cov``); false: of Y^T Y, uncentred."""
    compensate: bool | None = None
    """Bias (I - U_k U_k^T) mu for the discarded directions. Unset: as ``centre`` (true with the centred
    covariance; false with the uncentred one, today's ``sfsd`` numbers)."""
    sequential: bool = field(default=True, metadata={"omit_default": True})
    """Under propagated inputs, each layer's statistics with the layers of its own block that run before it
    already decomposed (stage by stage: q/k/v, o, gate/up, down), as the code's decomposed layers each
    initialize on the first forward that reaches them (``Decomposer.sequential_within_block``); false: one
    forward through the uncompressed block (0.2.0)."""

    def __post_init__(self) -> None:
        if self.compensate is None:
            object.__setattr__(self, "compensate", self.centre)


class SFSD(harness.SingleMatrixDecomposer):
    name = "sfsd"
    needs = frozenset({"out_cov", MEAN_STAT})
    Options = SFSDOptions
    description = "feature space: top eigenvectors of the centred output covariance plus a mean bias (SFSD)"

    def sequential_within_block(self, options) -> bool:
        return bool(options.sequential)

    def factorize_matrix(self, name, weight, stats, options, ctx):
        dtype = harness.float_dtype(options.dtype)
        if stats is None or stats.out_cov is None:
            raise RuntimeError(f"sfsd: no 'out_cov' statistic for {name}")
        if not options.centre and not options.compensate:
            return harness.ProjectionFactorization.from_output_covariance(name, weight, stats.out_cov, dtype=dtype)
        mean = getattr(stats, MEAN_STAT, None)
        if mean is None:
            raise RuntimeError(f"sfsd: no {MEAN_STAT!r} statistic for {name}; centre and compensate need it")
        from harness_sfsd.feature import FeatureFactorization

        return FeatureFactorization(
            name,
            weight,
            stats.out_cov,
            mean,
            stats.tokens,
            centre=options.centre,
            compensate=options.compensate,
            layer_bias=getattr(stats, "bias", None),
            dtype=dtype,
        )


@harness.hookimpl
def register_decomposers(register):
    register(SFSD())


@harness.hookimpl
def register_rank_allocators(register):
    from harness_sfsd.surgical import Surgical

    register(Surgical())
