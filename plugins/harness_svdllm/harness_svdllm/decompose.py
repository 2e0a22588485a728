"""SVD-LLM's decomposition: the SVD of the weight whitened by the Cholesky factor of its input Gram,
and the closed-form (least-squares) update of the left factor with the right factor fixed."""

from __future__ import annotations

from typing import Literal

import torch

import harness

Jitter = Literal["harness", "repo"]


def repo_cholesky(gram: torch.Tensor, eps: float = harness.CHOLESKY_EPS) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor by the official code's rule, exactly (``profle_svdllm``, SVDLLM.py l.63-69).

    The Gram in float64 as it is (not symmetrized); where the factorization
    fails, add ``(-lambda_min + eps) I`` once, lambda_min = ``eigvalsh(G)[0]``,
    and factor again; a second failure raises (the repo has no second try).
    Unlike ``harness.cholesky_with_jitter``, the shift is not floored at
    ``eps``: where lambda_min > eps (a positive definite Gram that failed by
    round-off) it subtracts, as the repo does. Returns ``(L, jitter)``.
    """
    G = gram.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return L, 0.0
    jitter = -float(torch.linalg.eigvalsh(G)[0]) + eps
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G + jitter * eye)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky failed after the repo's one shift of {jitter:.3g} (jitter = 'repo')")
    return L, jitter


def cholesky(gram: torch.Tensor, eps: float, jitter: Jitter) -> tuple[torch.Tensor, float]:
    """The whitening Cholesky factor by the chosen jitter rule ("harness": ``harness.cholesky_with_jitter``)."""
    if jitter == "repo":
        return repo_cholesky(gram, eps)
    return harness.cholesky_with_jitter(gram, eps=eps)


def whitened_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    eps: float = harness.CHOLESKY_EPS,
    dtype: torch.dtype = torch.float64,
    jitter: Jitter = "harness",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Truncation-aware whitened SVD of ``weight`` (m, n) given the input Gram ``gram`` (n, n).

    Minimizes the output error of every truncation,

    .. math:: \\|(W - A B) X^\\top\\|_F^2 = \\|(W - AB) S\\|_F^2, \\qquad G = X^\\top X = S S^\\top,

    whose minimum at rank k is the sum of the discarded squared singular values
    of W S.

    Parameters
    ----------
    weight : (m, n) tensor
    gram : (n, n) tensor, X^T X of the calibration inputs (summed over tokens).
    eps : float
        Added on top of -lambda_min to the diagonal where Cholesky fails.
    dtype : torch.dtype
        Precision of the SVD (the Cholesky is always float64).
    jitter : "harness" or "repo"
        The rule where Cholesky fails (``cholesky``).

    Returns
    -------
    U (m, r), s (r,), Vt (r, n)
        SVD of W S, r = min(m, n).
    S_inv : (n, n) tensor
        S^-1, to fold into the right factor.
    jitter : float
        What was added to G's diagonal (0.0 where G was positive definite).

    References
    ----------
    X. Wang, Y. Zheng, Z. Wan, M. Zhang. SVD-LLM: Truncation-aware Singular
    Value Decomposition for Large Language Model Compression. ICLR 2025.
    """
    S, shift = cholesky(gram.to(weight.device), eps, jitter)
    U, s, Vt = harness.thin_svd(weight.to(torch.float64) @ S, dtype)
    return U, s, Vt, harness.lower_triangular_inverse(S).to(dtype), shift


# ---------------------------------------------------------------- the closed-form update (v1)
def closed_form_left(weight: torch.Tensor, B: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The left factor A (m, k) minimizing ||(W - A B) X^T||_F^2 with B (k, n) fixed and G = X^T X.

    The normal equations of the least squares ``X B^T A^T ~ X W^T`` (the repo's
    ``torch.linalg.lstsq(x, outs)``, SVDLLM.py l.484-485, with x = X B^T):

    .. math:: A = W G B^\\top (B G B^\\top)^{-1}

    Only the Gram of the inputs is needed, not the inputs. float64; B G B^T
    must be invertible (``orthogonalized_update`` handles singular ones).
    """
    W, G, B = (t.to(torch.float64) for t in (weight, gram, B))
    H = B @ G @ B.T
    return torch.linalg.solve(H, B @ G @ W.T).T


def orthogonalized_update(
    weight: torch.Tensor, B: torch.Tensor, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The closed-form update at every rank at once: (Q (m, r), C (r, n), jitter) with, for every k,

    .. math:: Q_{:,:k} C_{:k} = A_k B_{:k}, \\qquad A_k = W G B_{:k}^\\top (B_{:k} G B_{:k}^\\top)^{-1},

    the product of ``closed_form_left`` at rank k (B's first k rows), and
    ``||(W - Q_k C_k) X^T||^2 = tr(W G W^T) - sum_{i<k} ||Q_{:,i}||^2``.

    Why: with H = B G B^T = L L^T (Cholesky), C = L^-1 B has G-orthonormal
    rows (C G C^T = I) and, L being lower triangular, C's first k rows span
    the same space as B's; the least-squares fit onto G-orthonormal rows is
    the sum of the projections, Q = W G C^T. So the update is nested: one
    Cholesky serves every rank, as one SVD does for the whitening. A singular
    H (zero singular values, rank-deficient inputs) gets
    ``harness.cholesky_with_jitter``'s jitter (a ridge term), returned.
    """
    W, G, B = (t.to(torch.float64) for t in (weight, gram, B))
    L, jitter = harness.cholesky_with_jitter(B @ G @ B.T)
    C = torch.linalg.solve_triangular(L, B, upper=False)
    return W @ G @ C.T, C, jitter


def svd_like(Q: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, Vt)`` for ``harness.SVDLikeFactorization`` from nested factors Q (m, r), C (r, n):
    s_i = ||Q_{:,i}|| (so its tail sums are the output error where C has G-orthonormal rows),
    U = Q / s (0 where s_i = 0), Vt = C; then A_k B_k = U_k diag(s_k) Vt_k = Q_k C_k."""
    s = torch.linalg.vector_norm(Q, dim=0)
    U = torch.where(s > 0, Q / torch.where(s > 0, s, 1.0), 0.0)
    return U, s, C


def plain_right(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diag(s)^1/2 Vt of the plain SVD of W (r, n): the right factor the repo's update-only mode keeps
    (``local_update(..., direct_update=True)``, SVDLLM.py l.451-452, 469)."""
    _, s, Vt = harness.thin_svd(weight.to(torch.float64), dtype)
    return s.to(torch.float64).sqrt()[:, None] * Vt.to(torch.float64)


def whitened_right(
    weight: torch.Tensor, gram: torch.Tensor, *, eps: float, jitter: Jitter, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, float]:
    """diag(s)^1/2 Vt S^-1 of the whitening on ``gram`` (r, n) and the jitter it took: the right factor
    of SVD-LLM's step 2 (whitening, then the update, SVDLLM.py l.455-471)."""
    _, s, Vt, S_inv, shift = whitened_svd(weight, gram, eps=eps, dtype=dtype, jitter=jitter)
    return (s.to(torch.float64).sqrt()[:, None] * Vt.to(torch.float64)) @ S_inv.to(torch.float64), shift
