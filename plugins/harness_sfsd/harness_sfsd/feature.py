"""SFSD's factored layer: feature-space projection of a Linear's outputs plus a mean compensation.

Outputs y = W x + b on calibration data (T tokens, mean mu, uncentred second moment
S = sum_t y_t y_t^T, centred scatter C = S - T mu mu^T). SFSD (nyunAI/SFSD-LLM
``layers.py``, ``DecomposeLinearEigen.init_lowrank``) projects the outputs onto the top-k
eigenvectors U_k of the *centred* covariance and fills the discarded directions with
the mean, P = U_k U_k^T:

.. math:: \\hat y = P\\,y + (I - P)\\,\\mu
          = U_k (U_k^\\top W) x + \\underbrace{P b + (I - P)\\mu}_{\\text{bias}},
          \\qquad \\sum_t \\|y_t - \\hat y_t\\|^2 = \\sum_{i>k} \\lambda_i(C),

the best rank-k affine map of the outputs (PCA with its mean). As a layer it is
``harness.LowRank(U_k, U_k^T W, bias)`` with the whole output offset
bias = P b + (I - P) mu = b + (I - P)(mu - b), in place of the Linear's own b: the
decomposer is handed b (``LayerStats.bias``, passed as ``layer_bias``), so the map is the
optimum above for biased Linears too (tests/test_layer_bias.py). Without b (before the
core handed it over) the layer kept b and added (I - P) mu: off by (I - P) b below full
rank, and at full rank where m > n.

Options (``SFSDOptions``): ``centre`` chooses the eigenvectors (of C, or of S: the
uncentred projection of the previous ``sfsd``); ``compensate`` the bias. The error at
each rank is the method's own objective, sum_t ||y_t - y_hat_t||^2 = tr((I - P) M)
with M = C where the mean is compensated and M = S where it is not (then y_hat = P y).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

import harness


def output_moments(
    out_cov: torch.Tensor, out_mean: torch.Tensor, tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, C, mu) in float64: the uncentred sum Y^T Y, the centred scatter sum_t (y_t - mu)(y_t - mu)^T, the mean."""
    mu = out_mean.double()
    S = out_cov.double()
    S = (S + S.T) / 2
    return S, S - tokens * torch.outer(mu, mu), mu


class FeatureFactorization(harness.Factorization):
    """One Linear as U_k (U_k^T W) x + (I - U_k U_k^T)(mu - b); U the eigenvectors of the centred (or
    uncentred) output covariance; the bias only where ``compensate``."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        out_cov: torch.Tensor,
        out_mean: torch.Tensor,
        tokens: int,
        *,
        centre: bool = True,
        compensate: bool = True,
        layer_bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        m, n = weight.shape
        device = weight.device
        S, C, mu = output_moments(out_cov.to(device), out_mean.to(device), tokens)
        _, U = torch.linalg.eigh(C if centre else S)
        U = U.flip(1)  # descending eigenvalues
        r = min(m, n)  # W x has rank <= n: directions past n carry nothing of W
        self.names, self.shapes = (name,), ((m, n),)
        self.U = U[:, :r].to(dtype)
        self.UtW = self.U.T @ weight.to(dtype)
        self.compensate = compensate
        self.layer_bias = None if layer_bias is None else layer_bias.to(device, torch.float64)
        self.shift = mu if layer_bias is None else mu - self.layer_bias  # mu - b: what the compensation fills
        self.out_dtype, self.device = weight.dtype, device
        self._tail = residuals(U, C if compensate else S, r)
        self.info = {"centred": centre, "compensated": compensate, "tokens": int(tokens)}

    @property
    def ranks(self) -> Sequence[int]:
        return range(0, len(self._tail))

    def params(self, rank: int) -> int:
        """k (m + n) factor values, plus the m of the bias where the mean is compensated."""
        m, n = self.shapes[0]
        return rank * (m + n) + (m if self.compensate else 0)

    def error(self, rank: int) -> float:
        """sum_t ||y_t - y_hat_t||^2 on the calibration tokens (module docstring)."""
        return float(self._tail[rank])

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A, B, bias) at ``rank`` in the model's dtype: U_k, U_k^T W and the layer's whole output offset
        b + (I - U_k U_k^T)(mu - b) (None without compensation: the Linear keeps its own b)."""
        if not 0 <= rank <= self.U.shape[1]:
            raise ValueError(f"rank {rank} is outside 0..{self.U.shape[1]}")
        U = self.U[:, :rank]
        B = self.UtW[:rank]
        if not self.compensate:
            return U.to(self.out_dtype).contiguous(), B.to(self.out_dtype).contiguous(), None
        bias = harness.off_subspace(U, self.shift)  # the same bits compacted or not (another U's address)
        if self.layer_bias is not None:
            bias = bias + self.layer_bias
        return U.to(self.out_dtype).contiguous(), B.to(self.out_dtype).contiguous(), bias.to(self.out_dtype)

    def materialize(self, rank: int) -> dict[str, harness.Replacement]:
        A, B, bias = self.factors(rank)
        A, B = A.to(self.device), B.to(self.device)
        return {self.names[0]: harness.LowRank(A, B, None if bias is None else bias.to(self.device))}

    def compact(self, max_rank=None, *, dtype=None, device=None):
        """A copy keeping U and U^T W up to ``max_rank`` (in ``dtype``, on ``device``); ranks, costs and errors
        unchanged. ``self`` is left as it was (a caller may compact one factorization for several uses)."""
        top = self.U.shape[1] if max_rank is None else max(0, min(int(max_rank), self.U.shape[1]))
        keep_dtype = self.U.dtype if dtype is None else dtype
        where = self.U.device if device is None else torch.device(device)
        kept = copy.copy(self)
        kept.U = self.U[:, :top].to(where, keep_dtype).contiguous()
        kept.UtW = self.UtW[:top].to(where, keep_dtype).contiguous()
        kept.shift = self.shift.to(where)
        kept.layer_bias = None if self.layer_bias is None else self.layer_bias.to(where)
        return kept

    @property
    def stored_rank(self) -> int:
        return self.U.shape[1]


def residuals(U: torch.Tensor, M: torch.Tensor, ranks: int) -> list[float]:
    """tr((I - U_k U_k^T) M) for k = 0..ranks, U (m, m) orthogonal: sum_{i >= k} u_i^T M u_i, a sum of the
    discarded terms (no cancellation against the trace; the eigenvalues themselves where U diagonalizes M)."""
    kept = torch.einsum("ik,ij,jk->k", U, M, U).clamp_min(0)  # u_i^T M u_i
    tail = kept.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{i >= k}
    return torch.cat([tail, tail.new_zeros(1)])[: ranks + 1].tolist()
