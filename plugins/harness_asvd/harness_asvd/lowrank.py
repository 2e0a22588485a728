"""ASVD with the reference code's randomized SVD: one ``torch.svd_lowrank`` per rank.

The reference (hahnyuan/ASVD4LLM, ``modules/svd_linear.py``,
``SVDLinear.from_linear`` lines 47-70) computes, for the one rank a layer is
given, ``U, S, V = torch.svd_lowrank(w * scales, q=rank)`` (torch's default
``niter=2`` power iterations, no oversampling) in float32 and folds the scales
back into V. Such a decomposition is not nested: each rank is its own random
projection. ``svd_lowrank`` returns U diag(S) V^T = Q Q^T A exactly, with Q the
orthonormal basis it found for A = W S, so the objective at rank k is the
projection's residual

.. math:: \\|(W - A_k B_k) S\\|_F^2 = \\|W S - U \\operatorname{diag}(S) V^T\\|_F^2
          = \\|W S\\|_F^2 - \\sum_{i \\le k} S_i^2,

computed as the left side in float64 (the difference on the right cancels
badly in float32 near full rank).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

import harness


class LowrankASVDFactorization(harness.Factorization):
    """W ~ A_k B_k with A_k = U diag(S)^1/2, B_k = diag(S)^1/2 V^T S^-1 from ``svd_lowrank(W S, q=k)``.

    Each rank is computed when first asked (``error`` or ``materialize``),
    from a random state that depends only on (seed, layer name, rank), so
    results do not depend on the order ranks are asked in. Errors are
    remembered for every rank asked; factors for the two most recent.
    """

    def __init__(
        self,
        name: str,
        scaled: torch.Tensor,
        scales: torch.Tensor,
        *,
        niter: int,
        seed: int,
        out_dtype: torch.dtype,
        info: dict | None = None,
    ) -> None:
        self.names = (name,)
        self.shapes = (tuple(scaled.shape),)
        self.scaled, self.scales = scaled, scales
        self.niter, self.seed = niter, seed
        self.out_dtype = out_dtype
        self.info = dict(info or {})
        self._norm2 = torch.linalg.vector_norm(scaled, dtype=torch.float64).item() ** 2
        self._errors: dict[int, float] = {0: self._norm2}
        self._factors: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def ranks(self) -> Sequence[int]:
        return range(0, min(self.shapes[0]) + 1)

    @property
    def nested(self) -> bool:
        return False

    def params(self, rank: int) -> int:
        m, n = self.shapes[0]
        return harness.lowrank_params(m, n, rank)

    def error(self, rank: int) -> float:
        if rank not in self._errors:
            self._decompose(rank)
        return self._errors[rank]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (m, rank), B (rank, n) in ``out_dtype``."""
        if rank not in self._factors:
            self._decompose(rank)
        self._factors.move_to_end(rank)
        A, B = self._factors[rank]
        return A.to(self.out_dtype).contiguous(), B.to(self.out_dtype).contiguous()

    def materialize(self, rank: int) -> dict[str, harness.Replacement]:
        return {self.names[0]: harness.LowRank(*self.factors(rank))}

    def _decompose(self, rank: int) -> None:
        m, n = self.shapes[0]
        if rank == 0:
            A, B = self.scaled.new_zeros(m, 0), self.scaled.new_zeros(0, n)
        else:
            U, S, V = randomized_svd(self.scaled, rank, self.niter, self._seed(rank))
            root = S.sqrt()
            A = U * root
            B = (root[:, None] * V.T) / self.scales.to(V.dtype)
            approx = (U.double() * S.double()) @ V.double().T
            self._errors[rank] = torch.linalg.vector_norm(self.scaled.double() - approx).item() ** 2
        self._factors[rank] = (A, B)
        while len(self._factors) > 2:
            self._factors.popitem(last=False)

    def _seed(self, rank: int) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(self.names[0].encode()) * 4099 + rank) % 2**63


def randomized_svd(matrix: torch.Tensor, q: int, niter: int, seed: int):
    """``torch.svd_lowrank(matrix, q=q, niter=niter)`` under a private random state seeded with ``seed``."""
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=q, niter=niter)
