"""A Basis Sharing group as a ``harness.Factorization`` and the layers it materializes.

A group of L layers (m, n) at rank k keeps one basis B (k, n) and L
coefficient matrices C_i (m, k):

    params(k) = k n + L k m

Each layer becomes a ``SharedBasisLinear`` y = C_i (B x); B is one
``nn.Parameter`` shared by the group's modules and counted once, on the
first layer (``owner``), so that the modules' ``harness_params`` sum to
``params(k)`` and ``harness.count_model`` agrees.

Nested in k: column j of the coefficients and row j of the basis do not
depend on k, so ``compact`` keeps the first K of each and every smaller rank
is a slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import harness


class SharedBasisLinear(nn.Module):
    """One layer of a basis-sharing group: y = coeff @ (basis @ x), no bias (see the README)."""

    def __init__(self, basis: nn.Parameter, coeff: torch.Tensor, *, owner: bool) -> None:
        super().__init__()
        self.basis = basis
        self.coeff = nn.Parameter(coeff, requires_grad=False)
        self.owner = owner
        self.in_features, self.out_features, self.rank = basis.shape[1], coeff.shape[0], coeff.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.basis), self.coeff)

    def _stored(self) -> list[torch.Tensor]:
        return [self.coeff, self.basis] if self.owner else [self.coeff]

    def harness_params(self) -> int:
        return sum(t.numel() for t in self._stored())

    def harness_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stored())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, owner={self.owner}"


class _Kept:
    """The factors a factorization holds, where it keeps them (``compact``: the host).

    A slotted holder on purpose: the layer-sequential pass moves a finished
    factorization's tensors back to the run device unless it is the core's own
    ``StoredLowRank`` (harness/run/blockwise.py, ``on_device``), which would
    undo ``compact``'s host placement; ``materialize`` moves what a cell needs.
    """

    __slots__ = ("basis", "coeffs")

    def __init__(self, coeffs: torch.Tensor, basis: torch.Tensor) -> None:
        self.coeffs, self.basis = coeffs, basis


class BasisSharingFactorization(harness.Factorization):
    """L weights of one shape (m, n) as C_i B with a shared basis B, truncatable to any rank."""

    def __init__(
        self,
        names: Sequence[str],
        shape: tuple[int, int],
        coeffs: torch.Tensor,
        basis: torch.Tensor,
        tail: list[float],
        *,
        out_dtype: torch.dtype,
        device: torch.device,
        info: dict | None = None,
    ) -> None:
        self.names = tuple(names)
        self.shapes = tuple((shape[0], shape[1]) for _ in self.names)
        if coeffs.shape[0] != len(self.names) * shape[0] or basis.shape[1] != shape[1]:
            raise ValueError(f"{'+'.join(self.names)}: factors {tuple(coeffs.shape)}, {tuple(basis.shape)} do not fit")
        self._kept = _Kept(coeffs, basis)
        self._tail = tail
        self.out_dtype, self.device = out_dtype, torch.device(device)
        self.info = dict(info or {})

    # ------------------------------------------------------------ what allocators read
    @property
    def ranks(self) -> Sequence[int]:
        return range(0, len(self._tail))

    @property
    def stored_rank(self) -> int:
        return self._kept.basis.shape[0]

    def params(self, rank: int) -> int:
        """The shared basis (rank x n) once, plus each layer's coefficients (m x rank)."""
        m, n = self.shapes[0]
        return rank * n + len(self.names) * rank * m

    def error(self, rank: int) -> float:
        """sum_i ||(W_i - C_i B) S||_F^2 under the pooled Gram: the discarded sigma^2."""
        return self._tail[rank]

    # ------------------------------------------------------------ replacements
    def factors(self, rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each layer's coefficients (m, rank) and the basis (rank, n), on ``device`` in ``out_dtype``."""
        if rank > self.stored_rank:
            raise ValueError(
                f"{'+'.join(self.names)}: rank {rank} is beyond the {self.stored_rank} ranks this factorization "
                f"keeps (compacted for the suite's targets; full rank {self.full_rank})"
            )
        m = self.shapes[0][0]
        kept = self._kept

        def out(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, self.out_dtype).contiguous()

        coeffs = [out(kept.coeffs[i * m : (i + 1) * m, :rank]) for i in range(len(self.names))]
        return coeffs, out(kept.basis[:rank])

    def materialize(self, rank: int) -> dict[str, harness.Replacement]:
        coeffs, basis = self.factors(rank)
        shared = nn.Parameter(basis, requires_grad=False)
        return {
            name: SharedBasisLinear(shared, coeff, owner=i == 0)
            for i, (name, coeff) in enumerate(zip(self.names, coeffs, strict=True))
        }

    def compact(self, max_rank=None, *, dtype=None, device=None) -> BasisSharingFactorization:
        """The first ``max_rank`` basis rows and coefficient columns, copied in ``dtype`` to ``device``."""
        top = self.stored_rank if max_rank is None else max(0, min(int(max_rank), self.stored_rank))
        kept = self._kept
        keep_dtype = kept.basis.dtype if dtype is None else _storage_dtype(dtype, self.out_dtype)
        where = kept.basis.device if device is None else torch.device(device)

        def copy(t: torch.Tensor) -> torch.Tensor:
            moved = t.to(where, keep_dtype)
            if moved.data_ptr() == t.data_ptr():  # not copied: a slice would keep the whole original alive
                moved = moved.clone()
            return moved.contiguous()

        return BasisSharingFactorization(
            self.names,
            self.shapes[0],
            copy(kept.coeffs[:, :top]),
            copy(kept.basis[:top]),
            self._tail,
            out_dtype=self.out_dtype,
            device=self.device,
            info=self.info,
        )


def _storage_dtype(stored: torch.dtype, out: torch.dtype) -> torch.dtype:
    """``out`` where it is no wider than ``stored`` (every value is cast to it anyway), else ``stored``."""
    return out if out.itemsize <= stored.itemsize else stored


def tail_sums(values: torch.Tensor) -> list[float]:
    """t[k] = sum(values[k:]) for k = 0 .. len(values), float64; t[len] = 0."""
    tail = torch.flip(torch.cumsum(torch.flip(values.to(torch.float64), [0]), 0), [0])
    return [*tail.tolist(), 0.0]


def factorize_group(weights: dict[str, torch.Tensor], stats: dict, options, ctx) -> BasisSharingFactorization:
    """A group's factorization from its weights and its members' Grams (``BasisSharing.factorize``)."""
    from harness_basis_sharing.decompose import pooled_gram, shared_basis_svd

    names = tuple(weights)
    missing = [n for n in names if stats.get(n) is None or stats[n].gram is None]
    if missing:
        raise ValueError(f"basis-sharing: no input Gram for {', '.join(missing)}")
    shapes = {tuple(w.shape) for w in weights.values()}
    if len(shapes) != 1:
        raise ValueError(f"basis-sharing: {'+'.join(names)}: a shared basis needs one shape, got {sorted(shapes)}")
    device = torch.device(ctx.device)
    members = [weights[n].to(device) for n in names]
    gram = pooled_gram([stats[n].gram for n in names], device)
    coeffs, basis, s, jitter = shared_basis_svd(
        members, gram, eps=options.jitter_eps, dtype=harness.float_dtype(options.dtype)
    )
    del gram
    if jitter:
        ctx.log(f"basis-sharing: {'+'.join(names)}: pooled Gram not positive definite, added {jitter:.3g}")
    info = {"layers": len(names), "jitter": jitter, "tokens": sum(int(stats[n].tokens) for n in names)}
    shape = next(iter(shapes))
    return BasisSharingFactorization(
        names, shape, coeffs, basis, tail_sums(s.double() ** 2), out_dtype=members[0].dtype, device=device, info=info
    )
