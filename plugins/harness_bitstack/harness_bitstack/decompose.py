"""BitStack's decomposition: residual blocks of packed signs times a rank-k magnitude.

With activation scales s (n,), optional row scales r (m,) (scale fusion, see
``fusion``) and W (m, n), the residual starts as R_0 = diag(r)^-1 W diag(s)
and each of ``niter`` iterations stores one block:

.. math:: B_i = \\operatorname{sign}(R_{i-1}) \\odot (u_i v_i), \\qquad
          u_i v_i = \\text{best rank-}k \\text{ approximation of } |R_{i-1}|, \\qquad
          R_i = R_{i-1} - B_i

(sign(0) = +1; u_i = U_k diag(sigma_k)^1/2, v_i = diag(sigma_k)^1/2 V_k^T).
Since sign(R) has entries +-1, ||R_i||_F^2 = ||(|R_{i-1}| - u_i v_i)||_F^2
= sum of the discarded sigma^2 of |R_{i-1}|: the scaled residual strictly
decreases while R_{i-1} != 0. The weight kept with j blocks is
W_j = diag(r) (sum_{i<=j} B_i) diag(s)^-1.

Signs are stored packed (``packing``), u, v, s and r in fp16; the residual is
updated with the fp16-rounded u, v, so that the errors recorded are those of
what is stored.

Reference: Wang et al., "BitStack: Any-Size Compression of Large Language
Models in Variable Memory Environments" (2024), code xinghaow99/BitStack
(``BitStackLinear.decompose_weight``, ``scale_utils.get_act_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import HarnessError, LayerStats
from harness_bitstack.packing import pack_signs, unpack_signs

EPS = 1e-3
"""Added to the activation statistic, as ``get_act_scale`` does."""


def activation_scales(stats: LayerStats | None, statistic: str, seqlen: int, eps: float = EPS):
    """Per-input-channel scales (n,) from calibration statistics, and how they were made.

    ``statistic = "l2_seq"`` (the repo's ``get_act_scale``,
    ``torch.norm(x, dim=1).mean(dim=0)``): each calibration sequence's L2 norm
    of the channel over its tokens, averaged over the sequences,
    ``LayerStats.l2_seq``. ``statistic = "l2"`` (the default before
    ``l2_seq`` existed): the pooled sqrt(seqlen * mean x^2) from
    ``LayerStats.sq_mean``, equal to the repo's when every sequence carries
    the same per-channel energy and above it otherwise (Jensen).
    ``statistic = "abs_mean"``: mean |x| per channel (AWQ's statistic).
    Returns (scales + eps, a label for Factorization.info).
    """
    if stats is None:
        raise HarnessError("bitstack: no calibration statistics for this layer (needs l2_seq / abs_mean / sq_mean)")
    if statistic == "l2_seq" and stats.l2_seq is not None:
        return stats.l2_seq.double() + eps, f"l2_seq ({stats.sequences} sequences) + {eps:g}"
    if statistic == "l2":
        if stats.sq_mean is not None:
            return (seqlen * stats.sq_mean.double()).sqrt() + eps, f"sqrt({seqlen} * sq_mean) + {eps:g}"
        if stats.abs_mean is not None:
            return stats.abs_mean.double() + eps, f"abs_mean + {eps:g} (sq_mean missing; not the repo's l2)"
    if statistic == "abs_mean" and stats.abs_mean is not None:
        return stats.abs_mean.double() + eps, f"abs_mean + {eps:g}"
    raise HarnessError(f"bitstack: calibration statistics lack {statistic!r} (the fields it needs are None)")


@dataclass
class BitStackBlocks:
    """``niter`` residual blocks of one (m, n) weight."""

    packed: torch.Tensor
    """(niter, ceil(m n / 8)) uint8: the packed signs of each block."""
    u: torch.Tensor
    """(niter, m, k) fp16"""
    v: torch.Tensor
    """(niter, k, n) fp16"""
    scales: torch.Tensor
    """(n,) fp16: input-channel scales (ones where unscaled)."""
    errors: list[float]
    """||W - W_r||_F^2 for r = 0..niter blocks (original weight space)."""
    scaled_errors: list[float]
    """||diag(r)^-1 (W - W_j) diag(s)||_F^2 for j = 0..niter: the quantity each block reduces."""
    row_scales: torch.Tensor | None = None
    """(m,) fp16: output-row scales r folded in by scale fusion (None: none)."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[1], self.v.shape[2]


def block(packed: torch.Tensor, u: torch.Tensor, v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """One block sign ⊙ (u v) in float32, (m, n)."""
    return unpack_signs(packed, shape, torch.float32) * (u.float() @ v.float())


def reconstruct(packed, u, v, scales, shape: tuple[int, int], row_scales=None) -> torch.Tensor:
    """W_j = diag(row_scales) (sum of the given blocks) diag(scales)^-1 in float32; zeros for no block."""
    total = torch.zeros(shape, dtype=torch.float32, device=u.device)
    for i in range(len(u)):
        total += block(packed[i], u[i], v[i], shape)
    total /= scales.float()
    if row_scales is not None:
        total *= row_scales.float()[:, None]
    return total


@torch.no_grad()
def bitstack_decompose(
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    niter: int,
    k: int,
    svd: str = "full",
    row_scales: torch.Tensor | None = None,
) -> BitStackBlocks:
    """Decompose ``weight`` (m, n) into ``niter`` blocks of rank ``k`` (see module docstring).

    ``scales`` (n,) or None (no scaling) multiply the input columns;
    ``row_scales`` (m,) or None divide the output rows (scale fusion: the
    next layer's input scales, ``fusion``). Both are rounded to fp16 first,
    as stored. Runs on ``weight``'s device in float32.
    """
    W = weight.float()
    m, n = W.shape
    k = min(k, m, n)
    s16 = (torch.ones(n) if scales is None else scales).to(W.device, torch.float16)
    s = s16.float()
    r16 = None if row_scales is None else row_scales.to(W.device, torch.float16)
    r = torch.ones(m, 1, device=W.device) if r16 is None else r16.float()[:, None]
    R = W * s / r
    kept = torch.zeros_like(W)
    packed, us, vs = [], [], []
    errors, scaled = [_sq(W)], [_sq(R)]
    for _ in range(niter):
        signs = pack_signs(R)
        U, sigma, Vt = top_svd(R.abs(), k, svd)
        root = sigma[:k].sqrt()
        u = (U[:, :k] * root).half()
        v = (root[:, None] * Vt[:k]).half()
        b = block(signs, u, v, (m, n))
        R -= b
        kept += b
        packed.append(signs), us.append(u), vs.append(v)
        errors.append(_sq(W - kept * r / s))
        scaled.append(_sq(R))
    return BitStackBlocks(
        packed=torch.stack(packed) if packed else torch.zeros(0, (m * n + 7) // 8, dtype=torch.uint8),
        u=torch.stack(us) if us else torch.zeros(0, m, k, dtype=torch.float16),
        v=torch.stack(vs) if vs else torch.zeros(0, k, n, dtype=torch.float16),
        scales=s16,
        errors=errors,
        scaled_errors=scaled,
        row_scales=r16,
    )


def top_svd(matrix: torch.Tensor, k: int, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, s, Vt of ``matrix`` with at least its top ``k`` triplets: exact, or randomized (global RNG)."""
    if method == "lowrank" and k + 8 < min(matrix.shape):
        U, sigma, V = torch.svd_lowrank(matrix, q=k + 8, niter=4)
        return U, sigma, V.T
    return torch.linalg.svd(matrix, full_matrices=False)


def _sq(x: torch.Tensor) -> float:
    return torch.linalg.vector_norm(x, dtype=torch.float64).item() ** 2
