"""CP and Tucker decompositions of a stack of matrices (tensorly, PyTorch backend).

Both are written in one form: slice s of the (S, m, n) tensor is

.. math:: \\hat T_s = L \\, M_s \\, R^\\top, \\qquad L \\in \\mathbb{R}^{m \\times r},\\;
          R \\in \\mathbb{R}^{n \\times r},\\; M_s \\in \\mathbb{R}^{r \\times r}

- CP (parafac) at rank r: :math:`M_s = \\operatorname{diag}(a_s)` with ``stack``
  = A (S, r), the CP weights folded into A. Stored values: r (S + m + n).
- Tucker at ranks (t, r, r): :math:`M_s = \\sum_j U_{sj} G_j` with ``stack`` =
  U (S, t) and ``core`` = G (t, r, r). Stored values: S t + t r^2 + r (m + n).

Both minimise :math:`\\|T - \\hat T\\|_F^2` by alternating least squares from a
seeded random initialisation (tensorly's ``init='random'``). ALS finds a local
optimum; the error is reported, not assumed.

Reference: Luo et al., "TRAWL: Tensor Reduced and Approximated Weights for
Large Language Models" (2024), whose code calls ``parafac(T, rank=R,
init='random')`` and ``tucker(T, rank=[2, R, R], init='random')``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class StackDecomposition:
    """Factors of a stacked tensor (S, m, n): slice s = left @ M_s @ right.T."""

    method: str
    left: torch.Tensor
    """(m, r)"""
    right: torch.Tensor
    """(n, r)"""
    stack: torch.Tensor
    """CP: (S, r), slice weights; Tucker: (S, t), mixing of the core's t slices."""
    core: torch.Tensor | None
    """Tucker: (t, r, r); CP: None."""
    sq_error: float
    """||T - T_hat||_F^2 in the decomposition's dtype."""
    rel_error: float
    """||T - T_hat||_F / ||T||_F."""
    iterations: int
    seconds: float

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def mixing(self, s: int) -> torch.Tensor:
        """M_s (r, r) of slice s; for CP the diagonal only, as a vector (r,)."""
        if self.core is None:
            return self.stack[s]
        return torch.einsum("t,tij->ij", self.stack[s], self.core)

    def slice(self, s: int) -> torch.Tensor:
        """The reconstruction of slice s, (m, n)."""
        mix = self.mixing(s)
        middle = self.left * mix if self.core is None else self.left @ mix
        return middle @ self.right.T

    def full(self) -> torch.Tensor:
        """The whole reconstruction (S, m, n)."""
        if self.core is None:
            return torch.einsum("sr,mr,nr->smn", self.stack, self.left, self.right)
        return torch.einsum("st,tij,mi,nj->smn", self.stack, self.core, self.left, self.right)

    def stored_values(self) -> int:
        extra = 0 if self.core is None else self.core.numel()
        return self.left.numel() + self.right.numel() + self.stack.numel() + extra

    def summary(self) -> dict:
        return {"iterations": self.iterations, "rel_error": self.rel_error, "seconds": round(self.seconds, 3)}


def cp_stack(tensor: torch.Tensor, rank: int, *, seed: int, n_iter_max: int = 100, tol: float = 1e-8):
    """CP (parafac) of ``tensor`` (S, m, n) at ``rank``, seeded random init.

    Returns a StackDecomposition with the CP weights folded into ``stack``.
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    started = time.perf_counter()
    with tl.backend_context("pytorch"):
        cp, errors = parafac(
            tensor, rank=rank, init="random", random_state=seed, n_iter_max=n_iter_max, tol=tol, return_errors=True
        )
    weights, (stack, left, right) = cp
    stack = stack * weights
    return _finish("cp", tensor, left, right, stack, None, len(errors), started)


def tucker_stack(
    tensor: torch.Tensor, ranks: tuple[int, int, int], *, seed: int, n_iter_max: int = 100, tol: float = 1e-4
):
    """Tucker (HOOI) of ``tensor`` (S, m, n) at ``ranks`` (t, r, r), seeded random init."""
    import tensorly as tl
    from tensorly.decomposition import tucker

    started = time.perf_counter()
    with tl.backend_context("pytorch"):
        tk, errors = tucker(
            tensor,
            rank=list(ranks),
            init="random",
            random_state=seed,
            n_iter_max=n_iter_max,
            tol=tol,
            return_errors=True,
        )
    core, (stack, left, right) = tk
    return _finish("tucker", tensor, left, right, stack, core, len(errors), started)


def _finish(method, tensor, left, right, stack, core, iterations, started) -> StackDecomposition:
    result = StackDecomposition(method, left, right, stack, core, 0.0, 0.0, iterations, 0.0)
    # the residual overwrites the reconstruction: one extra stack-sized tensor at a time, not two
    full = result.full()
    residual = torch.linalg.vector_norm(torch.sub(tensor, full, out=full), dtype=torch.float64).item()
    del full
    norm = torch.linalg.vector_norm(tensor, dtype=torch.float64).item()
    result.sq_error = residual**2
    result.rel_error = residual / norm if norm > 0 else 0.0
    result.seconds = time.perf_counter() - started
    return result
