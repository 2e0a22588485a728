"""SVD-LLM V2's loss-optimized weight truncation (Algorithm 2 of the paper), in float64.

With G = X^T X the Gram of the layer's calibration inputs (tokens as rows),
its eigendecomposition G = U_s diag(lambda) U_s^T gives the whitening
S = U_s diag(lambda)^1/2 (S S^T = G, no Cholesky). The second SVD is that of
D = W S = U_ws diag(s) V_ws^T; at rank k

.. math:: W' = U_{ws,k} \\operatorname{diag}(s_k) V_{ws,k}^\\top \\operatorname{diag}(\\lambda)^{-1/2} U_s^\\top,
          \\qquad \\|(W - W') X^\\top\\|_F^2 = \\sum_{i>k} s_i^2,

because diag(lambda)^-1/2 U_s^T X^T has orthonormal rows. Where G is singular
(fewer tokens than channels, dead channels) the eigen-directions with
lambda <= rcond * lambda_max carry no calibration input: they are dropped
(their lambda^-1/2 is set to 0, a pseudo-inverse), which leaves the identity
exact on the calibration inputs with no jitter.
"""

from __future__ import annotations

import torch

import harness


def eigen_whitening(gram: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(S, S^+ , rank) of a PSD Gram (n, n): S = U_s diag(lambda)^1/2 and its pseudo-inverse, both (n, n), float64.

    ``rank`` counts the eigenvalues kept (> rcond * lambda_max); the others'
    directions get 0 in both S and S^+. Negative round-off eigenvalues count
    as zero.
    """
    G = gram.to(torch.float64)
    G = (G + G.T) / 2
    values, vectors = torch.linalg.eigh(G)
    values, vectors = values.flip(0), vectors.flip(1)  # largest first
    top = float(values[0]) if values.numel() else 0.0
    keep = values > rcond * top if top > 0 else torch.zeros_like(values, dtype=torch.bool)
    root = torch.where(keep, values.clamp_min(0).sqrt(), torch.zeros_like(values))
    inverse_root = torch.where(keep, 1 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(root))
    S = vectors * root  # U_s diag(root)
    S_pinv = inverse_root[:, None] * vectors.T  # diag(1/root) U_s^T
    return S, S_pinv, int(keep.sum())


def loss_optimized_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    rcond: float = 1e-12,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """U (m, r), s (r,), Vt (r, n) of D = W S, S^+ (n, n) to fold into the right factor, and the Gram's rank.

    ``weight`` (m, n), ``gram`` = X^T X (n, n) summed over tokens. The
    eigendecomposition is float64 on ``weight``'s device; ``dtype`` is the
    precision of the second SVD.

    References
    ----------
    X. Wang, S. Alam, Z. Wan, H. Shen, M. Zhang. SVD-LLM V2: Optimizing
    Singular Value Truncation for Large Language Model Compression. NAACL 2025
    (Algorithm 2, Theorem 3.1).
    """
    S, S_pinv, rank = eigen_whitening(gram.to(weight.device), rcond)
    U, s, Vt = harness.thin_svd(weight.to(torch.float64) @ S, dtype)
    return U, s, Vt, S_pinv.to(dtype), rank
