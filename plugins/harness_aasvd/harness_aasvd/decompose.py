"""AA-SVD's anchored, shift-aware factorization (the paper's Objective 4), in float64.

With X the original model's inputs of a Linear (tokens as rows), X' the inputs
it receives once the blocks before it are compressed, G' = X'^T X' = L L^T
(lower Cholesky) and C = X^T X' (the ``anchor_cross`` statistic):

.. math:: \\|W X^\\top - W' X'^\\top\\|_F^2
          = \\|W C L^{-\\top} - W' L\\|_F^2 + \\text{const},

the constant tr(W X^T X W^T) - ||W C L^-T||_F^2 being what no W' can remove.
So the best W' of rank k is W' = [W C L^-T]_k L^-1 (Eckart-Young on
M = W C L^-T), and the removable error at rank k is the tail of M's squared
singular values. Where X' = X, C = G' and M = W L: SVD-LLM's whitening.
"""

from __future__ import annotations

import torch

import harness


def anchored_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    *,
    eps: float = harness.CHOLESKY_EPS,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """U (m, r), s (r,), Vt (r, n) of M = W C L^-T, L^-1 (n, n) to fold into the right factor, and the jitter.

    ``weight`` (m, n); ``gram`` = X'^T X' and ``cross`` = X^T X' (n, n), summed
    over the same tokens. The Cholesky of ``gram`` is float64 with
    ``harness.cholesky_with_jitter``'s rule (the jitter it added, 0.0 where
    G' is positive definite); ``dtype`` is the precision of the SVD. Where
    ``cross`` equals ``gram`` (original inputs, X' = X: the core hands the Gram
    itself), M = W L exactly, SVD-LLM's whitened weight, with no round trip through L^-T.

    References
    ----------
    A. K. Sinha, F. Fleuret. AA-SVD: Anchored and Adaptive SVD for Large
    Language Model Compression. arXiv 2604.02119 (2026), Objective 4.
    """
    L, jitter = harness.cholesky_with_jitter(gram.to(weight.device), eps=eps)
    L_inv = harness.lower_triangular_inverse(L)
    W = weight.to(torch.float64)
    # original inputs (X' = X): W C L^-T = W L, SVD-LLM's whitened weight
    M = W @ L if no_shift(gram, cross) else (W @ cross.to(device=weight.device, dtype=torch.float64)) @ L_inv.T
    U, s, Vt = harness.thin_svd(M, dtype)
    return U, s, Vt, L_inv.to(dtype), jitter


def no_shift(gram: torch.Tensor, cross: torch.Tensor) -> bool:
    """True where X^T X' is X'^T X' exactly (the same tensor, or equal entries: no upstream shift)."""
    return cross is gram or (cross.shape == gram.shape and torch.equal(cross.to(gram.device), gram))
