"""Zero Sum SVD (Abbasi, Thrash, Qin, Sharma, Seifi, Kolouri; ICML 2026; arXiv 2602.02848; mint-vu/Zero-Sum-SVD).

Two components, used together (the allocator reads scores only this decomposer computes):

- decomposer ``zs-svd``: SVD-LLM's whitened SVD, W L = U diag(sigma) V^T with
  L the Cholesky factor of X^T X, plus each component's first-order predicted
  loss change Delta L_i = -sigma_i u_i^T G L^-T v_i from the calibration loss's
  weight gradient G (the ``grad`` statistic; ``harness_zssvd.scores``). The
  factors and error are exactly ``svd-llm``'s.
- allocator ``zs-svd``: global selection of the components to drop, smallest
  singular value first within each matrix, across matrices by the zero-sum
  rule on the running sum of Delta L, until the target is met
  (``harness_zssvd.select``).

The paper's optional correction (one projected gradient step on the truncated
weights, then re-truncation) is weight optimization on calibration data and
is not offered (README, deviations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class ZSSVDOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the SVD (the Cholesky and the scores are float64; factors are cast to the model's dtype)."""
    jitter_eps: float = field(default=1e-6, metadata={"exclusive_minimum": 0})
    """Added on top of -lambda_min to the Gram's diagonal where Cholesky fails (SVD-LLM's rule,
    ``harness.cholesky_with_jitter``)."""

    def __post_init__(self) -> None:
        if not self.jitter_eps > 0:
            raise ValueError(f"jitter_eps: expected a positive number, got {self.jitter_eps!r}")


class ZSSVD(harness.SingleMatrixDecomposer):
    name = "zs-svd"
    needs = frozenset({"gram", "grad"})
    Options = ZSSVDOptions
    description = "SVD-LLM's whitened SVD with first-order loss scores -sigma_i u_i^T G L^-T v_i per component"

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_zssvd.decompose import scored_whitened_svd

        if stats is None or stats.gram is None or stats.grad is None:
            raise harness.HarnessError(f"zs-svd: {name} has no calibration Gram and gradient (needs 'gram', 'grad')")
        dtype = harness.float_dtype(options.dtype)
        U, s, Vt, S_inv, jitter, deltas = scored_whitened_svd(
            weight, stats.gram, stats.grad, eps=options.jitter_eps, dtype=dtype
        )
        if jitter:
            ctx.log(f"zs-svd: {name}: Gram not positive definite, added {jitter:.3g} to its diagonal")
        from harness_zssvd.select import SCORES

        info = {"jitter": jitter, "tokens": stats.tokens, "predicted_change_total": sum(deltas), SCORES: deltas}
        return harness.SVDLikeFactorization(name, U, s, Vt, right=S_inv, out_dtype=weight.dtype, info=info)


@dataclass(frozen=True)
class ZSSVDAllocatorOptions:
    min_rank: int = field(default=1, metadata={"minimum": 0})
    """No matrix is truncated below this rank (the official code's floor at keep_rank_ratio = 0)."""
    keep_rank_ratio: float = field(default=0.0, metadata={"minimum": 0, "maximum": 1})
    """Also no matrix below ceil(keep_rank_ratio * its break-even rank) (the official ``--keep_rank_ratio``;
    its scripts use 0 at 20 % and 40 % removed, 0.3 at 60 %)."""

    def __post_init__(self) -> None:
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise ValueError(f"min_rank: expected a rank >= 0, got {self.min_rank!r}")
        if isinstance(self.keep_rank_ratio, bool) or not 0 <= self.keep_rank_ratio <= 1:
            raise ValueError(f"keep_rank_ratio: expected a number in [0, 1], got {self.keep_rank_ratio!r}")


class ZSSVDAllocator(harness.RankAllocator):
    name = "zs-svd"
    saving_ranks_only = True
    Options = ZSSVDAllocatorOptions
    description = "zero-sum rule: drop components smallest sigma first, keeping the summed -sigma dL/dsigma near 0"

    def allocate(self, factorizations, target, options, ctx):
        from harness_zssvd.select import floor_rank, scores_of, zero_sum_select

        facts = list(factorizations)
        scores = [scores_of(fact, i) for i, fact in enumerate(facts)]
        floors = [floor_rank(fact, options.min_rank, options.keep_rank_ratio) for fact in facts]
        ranks, steps = zero_sum_select(facts, scores, floors, target, ctx.dtype_bytes)
        total = steps[-1].total if steps else 0.0
        largest = max((abs(step.delta) for step in steps), default=0.0)
        dense = sum(rank is None for rank in ranks)
        ctx.log(
            f"zs-svd: {len(steps)} components removed, predicted loss change {total:+.4g} "
            f"(largest single |change| {largest:.4g}); {dense} of {len(facts)} matrices left dense"
        )
        return ranks


@harness.hookimpl
def register_decomposers(register):
    register(ZSSVD())


@harness.hookimpl
def register_rank_allocators(register):
    register(ZSSVDAllocator())
