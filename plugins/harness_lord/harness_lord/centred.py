"""Centred output PCA with a bias term: the rank-k affine map closest to a layer's outputs.

For outputs y = W x (the calibration tokens' Y, mean mu, centred scatter
C = sum_t (y_t - mu)(y_t - mu)^T = Y^T Y - T mu mu^T), the best approximation
of the form  y_hat = U U^T y + c  with U^T U = I_k is PCA of the centred
outputs:

.. math:: U_k = \\text{top-}k \\text{ eigenvectors of } C, \\qquad c_k = (I - U_k U_k^\\top)\\,\\mu,
          \\qquad \\sum_t \\|y_t - \\hat y_t\\|^2 = \\sum_{i>k} \\lambda_i(C).

For a Linear with a bias b (y = W x + b) the same optimum is
y_hat = U_k (U_k^T W) x + P b + (I - P) mu, P = U_k U_k^T. As a layer:
``harness.LowRank(A, B, bias)`` with A = U_k, B = U_k^T W and the whole output
offset c_k = b + (I - P)(mu - b) (= (I - P) mu where the layer has no bias, as
Llama-style projections), in place of the Linear's own b: y_hat = A (B x) + c_k. The uncentred projection (C = Y^T Y,
no bias: ``harness.ProjectionFactorization``) leaves the mean direction to
compete with the variance; with a non-zero mean the centred map is never worse
and usually better at equal rank (tests/test_lord.py checks both on planted data).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

import harness


def centred_scatter(out_cov: torch.Tensor, out_mean: torch.Tensor, tokens: int) -> torch.Tensor:
    """sum_t (y_t - mu)(y_t - mu)^T from the uncentred sum Y^T Y, the mean mu and the token count, float64."""
    mu = out_mean.double()
    return out_cov.double() - tokens * torch.outer(mu, mu)


class CentredProjectionFactorization(harness.Factorization):
    """One layer as U_k (U_k^T W) x + (I - U_k U_k^T) mu, U the eigenvectors of the centred output scatter."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        out_cov: torch.Tensor,
        out_mean: torch.Tensor,
        tokens: int,
        *,
        layer_bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        m, n = weight.shape
        device = weight.device
        scatter = centred_scatter(out_cov.to(device), out_mean.to(device), tokens)
        eigvals, U = torch.linalg.eigh((scatter + scatter.T) / 2)
        eigvals, U = eigvals.flip(0), U.flip(1)  # descending
        r = min(m, n)  # the centred outputs (X - mean) W^T have rank <= n
        self.names, self.shapes = (name,), ((m, n),)
        self.U = U[:, :r].to(dtype)
        self.UtW = self.U.T @ weight.to(dtype)
        self.layer_bias = None if layer_bias is None else layer_bias.to(device, torch.float64)
        mean = out_mean.to(device, torch.float64)
        self.mean = mean if layer_bias is None else mean - self.layer_bias  # mu - b: what the offset fills
        self.out_dtype, self.device = weight.dtype, device
        tail = eigvals.clamp_min(0).flip(0).cumsum(0).flip(0)  # tail[k] = sum_{i>=k} lambda_i
        self._tail = torch.cat([tail, tail.new_zeros(1)])[: r + 1].tolist()
        self.info = {"centred": True, "tokens": int(tokens)}

    @property
    def ranks(self) -> Sequence[int]:
        return range(0, len(self._tail))

    def params(self, rank: int) -> int:
        """k (m + n) factor values plus the m of the new bias."""
        (m, n) = self.shapes[0]
        return rank * (m + n) + m

    def error(self, rank: int) -> float:
        """sum_t ||y_t - y_hat_t||^2 on the calibration tokens: the discarded eigenvalues of the centred scatter."""
        return float(self._tail[rank])

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, bias) at ``rank`` in the model's dtype: U_k, U_k^T W and b + (I - U_k U_k^T)(mu - b)."""
        if not 0 <= rank <= self.U.shape[1]:
            raise ValueError(f"rank {rank} is outside 0..{self.U.shape[1]}")
        U = self.U[:, :rank].to(self.out_dtype).contiguous()
        bias = harness.off_subspace(U, self.mean)  # the same bits compacted or not (another U's address)
        if self.layer_bias is not None:
            bias = bias + self.layer_bias
        return U, self.UtW[:rank].to(self.out_dtype), bias.to(self.out_dtype)

    def materialize(self, rank: int) -> dict[str, harness.Replacement]:
        A, B, bias = self.factors(rank)
        return {self.names[0]: harness.LowRank(A.to(self.device), B.to(self.device), bias.to(self.device))}

    def compact(self, max_rank=None, *, dtype=None, device=None):
        """Keep U and U^T W up to ``max_rank`` (in ``dtype``, on ``device``); ranks, costs and errors unchanged."""
        top = self.U.shape[1] if max_rank is None else max(0, min(int(max_rank), self.U.shape[1]))
        keep_dtype = self.U.dtype if dtype is None else dtype
        where = self.U.device if device is None else torch.device(device)
        kept = copy.copy(self)  # a new factorization: the uncompacted one stays as it was
        kept.U = self.U[:, :top].to(where, keep_dtype).contiguous()
        kept.UtW = self.UtW[:top].to(where, keep_dtype).contiguous()
        kept.mean = self.mean.to(where)
        kept.layer_bias = None if self.layer_bias is None else self.layer_bias.to(where)
        return kept

    @property
    def stored_rank(self) -> int:
        return self.U.shape[1]
