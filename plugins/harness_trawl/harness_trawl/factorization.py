"""TRAWL's Factorization: one stacked group, one CP / Tucker decomposition per rank.

CP is not nested in the rank: each rank in ``ranks`` is its own decomposition,
computed when first asked for (``error``, ``materialize``) and cached in memory
by (weights fingerprint, method, group, rank, seed, solver settings), so that
every cell of a suite (and a rerun in the same process) reuses it.

Modes:

- ``denoise``: ``materialize`` writes each matrix's slice of the reconstruction
  back as a dense weight (the paper's use); ``params`` is the dense count.
- ``compress``: the factors are kept. Each layer becomes a ``StackSliceLinear``
  that computes with the shared factors; the shared factors are counted on the
  group's first layer, each layer adds its own slice weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

import harness
from harness_trawl.decompose import StackDecomposition, cp_stack, tucker_stack
from harness_trawl.stacking import is_transposed, stack, stack_shape, unstack

_CACHE: dict[tuple, StackDecomposition] = {}


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the group's names, shapes, dtypes and weight bytes."""
    digest = hashlib.sha256()
    for name, weight in weights.items():
        digest.update(f"{name}|{tuple(weight.shape)}|{weight.dtype}|".encode())
        digest.update(weight.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def clear_cache() -> None:
    _CACHE.clear()


class StackSliceLinear(nn.Module):
    """One matrix of a stacked group, kept as factors: W_s = L M_s R^T (or its transpose).

    ``left`` (m, r), ``right`` (n, r) and ``core`` (Tucker: (t, r, r)) are
    Parameters shared by every layer of the group; ``mix`` is this layer's own
    row of the stack factor ((r,) for CP, (t,) for Tucker). ``owner`` marks
    the layer that counts the shared factors in ``harness_params``.
    """

    def __init__(self, left, right, core, mix, *, transposed: bool, owner: bool) -> None:
        super().__init__()
        self.left, self.right, self.core = left, right, core
        self.mix = nn.Parameter(mix, requires_grad=False)
        self.transposed, self.owner = transposed, owner
        m, n = left.shape[0], right.shape[0]
        self.out_features, self.in_features = (n, m) if transposed else (m, n)

    def middle(self) -> torch.Tensor:
        if self.core is None:
            return torch.diag(self.mix)
        return torch.einsum("t,tij->ij", self.mix, self.core)

    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with."""
        w = self.left @ self.middle() @ self.right.T
        return w.T if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W = L M R^T: y = x W^T = ((x R) M^T) L^T; transposed W^T = ((x L) M) R^T.
        first, last = (self.left, self.right) if self.transposed else (self.right, self.left)
        h = x.to(first.dtype) @ first
        if self.core is None:
            h = h * self.mix
        else:
            middle = self.middle()
            h = h @ (middle if self.transposed else middle.T)
        return (h @ last.T).to(x.dtype)

    def _stored(self) -> list[torch.Tensor]:
        shared = [self.left, self.right] + ([] if self.core is None else [self.core])
        return [self.mix, *(shared if self.owner else [])]

    def harness_params(self) -> int:
        return sum(t.numel() for t in self._stored())

    def harness_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stored())

    def extra_repr(self) -> str:
        rank = self.left.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={rank}, owner={self.owner}"


class TrawlFactorization(harness.Factorization):
    """A stacked group (S matrices of one oriented shape (m, n)) at each listed rank."""

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        *,
        method: str,
        ranks: Sequence[int],
        mode: str,
        seed: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        stack_rank: int | None = None,
        n_iter_max: int = 100,
        tol: float | None = None,
        grouping: str = "",
    ) -> None:
        self.names = tuple(weights)
        self.shapes = tuple(tuple(w.shape) for w in weights.values())
        self._weights = weights
        self.stack_shape = stack_shape(weights)  # refuses different shapes
        self.method, self.mode, self.seed = method, mode, seed
        self.device, self.dtype = torch.device(device), dtype
        self.out_dtype = next(iter(weights.values())).dtype
        self.stack_rank = stack_rank or self.stack_shape[0]
        self.n_iter_max = n_iter_max
        self.tol = tol if tol is not None else (1e-8 if method == "cp" else 1e-4)
        self._ranks = sorted(set(ranks))
        self._check_ranks()
        self.fingerprint = fingerprint(weights)
        self.grouping = grouping
        self.info = {
            "method": method,
            "mode": mode,
            "grouping": grouping,
            "stack_shape": list(self.stack_shape),
            "transposed": [name for name in self.names if is_transposed(name)],
            "fingerprint": self.fingerprint[:16],
            "ranks": {},
        }

    def _check_ranks(self) -> None:
        S, m, n = self.stack_shape
        if not self._ranks or self._ranks[0] < 1:
            raise harness.HarnessError(f"ranks: expected positive ranks, got {self._ranks}")
        if self.method == "tucker":
            if max(self._ranks) > min(m, n):
                raise harness.HarnessError(f"ranks: Tucker rank {max(self._ranks)} exceeds min(m, n) = {min(m, n)}")
            if not 1 <= self.stack_rank <= S:
                raise harness.HarnessError(f"stack_rank: expected 1..{S} (the stack size), got {self.stack_rank}")

    # ------------------------------------------------------------ decomposition
    def key(self, rank: int) -> tuple:
        return (
            self.fingerprint,
            self.method,
            self.names,
            rank,
            self.seed,
            self.stack_rank if self.method == "tucker" else None,
            self.n_iter_max,
            self.tol,
            str(self.dtype),
        )

    def decomposition(self, rank: int) -> StackDecomposition:
        """The decomposition at ``rank``: from the cache, or computed now."""
        if rank not in self._ranks:
            raise ValueError(f"rank {rank} is not one of {self._ranks}")
        key = self.key(rank)
        if key not in _CACHE:
            tensor = stack({n: w.to(self.device) for n, w in self._weights.items()}, self.dtype)
            if self.method == "cp":
                result = cp_stack(tensor, rank, seed=self.seed, n_iter_max=self.n_iter_max, tol=self.tol)
            else:
                ranks = (self.stack_rank, rank, rank)
                result = tucker_stack(tensor, ranks, seed=self.seed, n_iter_max=self.n_iter_max, tol=self.tol)
            _CACHE[key] = result
        result = _CACHE[key]
        self.info["ranks"][str(rank)] = result.summary()
        return result

    # ------------------------------------------------------------ Factorization
    @property
    def ranks(self) -> Sequence[int]:
        return self._ranks

    @property
    def nested(self) -> bool:
        return False

    def factor_params(self, rank: int) -> int:
        """Stored values of the kept factors: CP r(S+m+n); Tucker S t + t r^2 + r(m+n)."""
        S, m, n = self.stack_shape
        if self.method == "cp":
            return rank * (S + m + n)
        t = self.stack_rank
        return S * t + t * rank * rank + rank * (m + n)

    def params(self, rank: int) -> int:
        return self.dense_params if self.mode == "denoise" else self.factor_params(rank)

    def error(self, rank: int) -> float:
        """||T - T_hat||_F^2 of the stacked group (the sum over its matrices)."""
        return self.decomposition(rank).sq_error

    def materialize(self, rank: int) -> dict[str, harness.Replacement]:
        result = self.decomposition(rank)
        if self.mode == "denoise":
            slices = unstack(result.full().to(self.out_dtype), self.names)
            return {name: harness.Dense(weight) for name, weight in slices.items()}
        return self._modules(result)

    def _modules(self, result: StackDecomposition) -> dict[str, nn.Module]:
        def shared(t: torch.Tensor | None) -> nn.Parameter | None:
            return None if t is None else nn.Parameter(t.to(self.out_dtype).contiguous(), requires_grad=False)

        left, right, core = shared(result.left), shared(result.right), shared(result.core)
        stack_factor = result.stack.to(self.out_dtype)
        return {
            name: StackSliceLinear(
                left, right, core, stack_factor[s].clone(), transposed=is_transposed(name), owner=s == 0
            )
            for s, name in enumerate(self.names)
        }
