"""SVD-LLM V2 (Wang, Alam, Wan, Shen, Zhang; NAACL 2025), built from the paper: its code is unreleased.

Two components, usable apart:

- decomposer ``svd-llm-v2``: loss-optimized weight truncation. The input Gram
  G = X^T X is whitened by its eigendecomposition, S = U_s diag(lambda)^1/2
  (no Cholesky, so no positive-definiteness needed and no jitter), then
  W S = U diag(s) V^T; at rank k, A = U_k diag(s_k)^1/2 and
  B = diag(s_k)^1/2 V_k^T diag(lambda)^-1/2 U_s^T, and the output error
  ||(W - AB) X^T||_F^2 is exactly sum_{i>k} s_i^2 (``Factorization.error``).
- allocator ``svd-llm-v2``: heterogeneous compression ratios. Within each
  matrix type, each matrix's removed fraction is proportional to 1 / ln of
  its truncation loss at the uniform ratio, the type's mean ratio kept
  (``harness_svdllm_v2.allocate``).

The paper pairs them; either works with other components (the allocator reads
only ``Factorization.error``, so with ``svd-llm`` it allocates on the same
whitened losses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class SVDLLMV2Options:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the second SVD (the eigendecomposition is always float64; factors are cast to the model's dtype)."""
    rcond: float = field(default=1e-12, metadata={"minimum": 0, "exclusive_maximum": 1})
    """Eigenvalues of the Gram at or below rcond * lambda_max count as zero: their directions are dropped
    from the whitening (a pseudo-inverse), since no calibration input lies along them."""

    def __post_init__(self) -> None:
        if not 0 <= self.rcond < 1:
            raise ValueError(f"rcond: expected a number in [0, 1), got {self.rcond!r}")


class SVDLLMV2(harness.SingleMatrixDecomposer):
    name = "svd-llm-v2"
    needs = frozenset({"gram"})
    Options = SVDLLMV2Options
    description = (
        "SVD of W U_s diag(lambda)^1/2, X^T X = U_s diag(lambda) U_s^T (eigendecomposition whitening, no Cholesky)"
    )

    def factorize_matrix(self, name, weight, stats, options, ctx):
        from harness_svdllm_v2.decompose import loss_optimized_svd

        if stats is None or stats.gram is None:
            raise harness.HarnessError(f"svd-llm-v2: {name} has no calibration Gram (needs 'gram')")
        dtype = harness.float_dtype(options.dtype)
        U, s, Vt, S_pinv, rank = loss_optimized_svd(weight, stats.gram, rcond=options.rcond, dtype=dtype)
        n = weight.shape[1]
        if rank < n:
            ctx.log(f"svd-llm-v2: {name}: input Gram has rank {rank} of {n}; the null directions are dropped")
        info = {"gram_rank": rank, "tokens": stats.tokens}
        return harness.SVDLikeFactorization(name, U, s, Vt, right=S_pinv, out_dtype=weight.dtype, info=info)


@dataclass(frozen=True)
class SVDLLMV2AllocatorOptions:
    min_rank: int = field(default=1, metadata={"minimum": 0})
    """No matrix is factored below this rank (0 allows a matrix whose ratio clips to 1 to be removed)."""

    def __post_init__(self) -> None:
        if isinstance(self.min_rank, bool) or self.min_rank < 0:
            raise ValueError(f"min_rank: expected a rank >= 0, got {self.min_rank!r}")


class SVDLLMV2Allocator(harness.RankAllocator):
    name = "svd-llm-v2"
    saving_ranks_only = True
    Options = SVDLLMV2AllocatorOptions
    description = "SVD-LLM V2: per type, removed fraction proportional to 1/ln(truncation loss at the uniform ratio)"

    def allocate(self, factorizations, target, options, ctx):
        from harness_svdllm_v2.allocate import allocate

        return allocate(list(factorizations), target, ctx.layers, ctx.dtype_bytes, options.min_rank, ctx.log)


@harness.hookimpl
def register_decomposers(register):
    register(SVDLLMV2())


@harness.hookimpl
def register_rank_allocators(register):
    register(SVDLLMV2Allocator())
