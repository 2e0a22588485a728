"""Basis Sharing's decomposition: one whitened SVD of a group's stacked weights.

In harness orientation (W_i is (out m, in n), y = W_i x) the group's L
weights are stacked along the output axis and whitened on the input side by
the Cholesky factor S of the pooled Gram G = sum_i X_i^T X_i (G = S S^T):

.. math:: [W_1; \\dots; W_L]\\, S = P \\Sigma Q^\\top, \\qquad
          W_i \\approx \\underbrace{P_{i,k}}_{C_i\\,(m \\times k)}\\;
          \\underbrace{\\Sigma_k Q_k^\\top S^{-1}}_{B\\,(k \\times n),\\ \\text{shared}}

P_{i,k} is layer i's block of rows of P's first k columns. This is the
paper's horizontal concatenation [S^T W_1^T, ..., S^T W_L^T] transposed (the
official code stores W_i^T, (in, out), and takes ``torch.svd(s @ cat(W_i^T))``
with s = S^T): its basis S^-T U Sigma is B^T, its coefficients V^T are the
P_i^T. Truncating the smallest singular values is optimal for the pooled
objective

.. math:: \\sum_i \\|(W_i - C_i B) S\\|_F^2 = \\sum_i \\operatorname{tr}\\big((W_i - C_i B)\\, G\\,
          (W_i - C_i B)^\\top\\big) = \\sum_{j>k} \\sigma_j^2,

i.e. every layer's error measured on the inputs of all the group's layers
(with one layer it is SVD-LLM's ‖(W − AB) Xᵀ‖²_F exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import harness


def pooled_gram(grams: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum_i X_i^T X_i over the group's layers, float64 on ``device`` (the official code sums the pickled Grams)."""
    total = None
    for gram in grams:
        g = gram.to(device, torch.float64)
        total = g.clone() if total is None else total + g
    if total is None:
        raise ValueError("basis-sharing: a group needs at least one Gram")
    return total


def shared_basis_svd(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    *,
    eps: float = 7e-6,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The whitened SVD of the stacked ``weights`` (each (m, n)) under the pooled ``gram`` (n, n).

    Returns
    -------
    coeffs : (L m, r) tensor
        P: rows [i m, (i+1) m) are layer i's coefficients; column j serves every rank > j.
    basis : (r, n) tensor
        Sigma Q^T S^-1: row j is the j-th shared basis vector (singular value folded in, as the official code does).
    s : (r,) tensor
        Singular values of [W_1; ...; W_L] S, descending; r = min(L m, n).
    jitter : float
        What was added to the Gram's diagonal where Cholesky failed (0.0 where it did not).
    """
    device = weights[0].device
    S, jitter = harness.cholesky_with_jitter(gram.to(device, torch.float64), eps=eps)
    stacked = torch.cat([w.to(torch.float64) for w in weights]) @ S
    P, s, Qt = harness.thin_svd(stacked, dtype)
    del stacked
    basis = (s[:, None] * Qt) @ harness.lower_triangular_inverse(S).to(dtype)
    return P, basis, s, jitter
