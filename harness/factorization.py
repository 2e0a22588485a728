"""What a decomposer returns, and what the core knows how to put into a model.

A ``Factorization`` covers one *group* of weights (one matrix for the SVD
family; several decomposed jointly for TRAWL). It exposes its cost and error at
every rank it supports, so that an allocator can choose ranks without
materializing anything, and ``materialize(rank)`` returns replacements for
the group's Linear layers:

- ``LowRank(A, B)``: W ~ A @ B, A (m, k), B (k, n); the core swaps in a
  two-matmul ``FactoredLinear`` (or the dense product, in dense mode) with the
  Linear's own bias, or with ``LowRank(A, B, bias)``'s bias in its place (the
  layer's whole output offset, as LoRD's and SFSD's mean-compensated layers).
- ``Dense(weight)``: a same-shape weight written in place (denoising methods).
- any ``torch.nn.Module`` with ``harness_params()`` and ``harness_bytes()``
  methods (e.g. BitStack's packed layer) swapped in as it is.

After factorizing, the session keeps each factorization only as far as the
suite's cells can use it (``Factorization.compact``): the factor columns up to
the largest rank any target can choose, with every transform folded in, in the
storage dtype, in host memory; ``materialize`` brings the rank it is asked for
to the device the factorization was computed on.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.linalg import eigh_descending, tail_sums

FP16_BYTES = 2


@dataclass
class LowRank:
    """W ~ A @ B with A (m, k) and B (k, n); y = A (B x) + bias.

    ``bias`` (m,): the layer's whole output offset, in place of the replaced Linear's own bias (which a
    method that fits the outputs has folded in: ``LayerStats.bias``); None keeps the Linear's bias."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[1]


@dataclass
class Dense:
    """A dense replacement weight of the original shape (m, n)."""

    weight: torch.Tensor


Replacement = LowRank | Dense | torch.nn.Module


def lowrank_params(m: int, n: int, k: int) -> int:
    """Parameters of a rank-k factorization of an m x n matrix: k (m + n)."""
    return k * (m + n)


def break_even_rank(m: int, n: int) -> int:
    """Largest rank that still saves parameters: the largest k with k(m+n) < mn."""
    return (m * n - 1) // (m + n)


class Factorization(ABC):
    """A group's decomposition, truncatable to any rank in ``ranks``.

    Subclasses set ``names`` (the Linear layers covered, in order) and
    ``shapes`` ((m, n) per layer). Rank 0 means "the group removed entirely"
    only where a method supports it; allocators pick from ``ranks``.
    ``info`` holds diagnostics worth recording (iterations, jitter used, ...).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    info: dict

    @property
    @abstractmethod
    def ranks(self) -> Sequence[int]:
        """The ranks this factorization supports, ascending."""

    @property
    def full_rank(self) -> int:
        """The rank at which the reconstruction is exact (or best possible)."""
        return self.ranks[-1]

    @abstractmethod
    def params(self, rank: int) -> int:
        """Parameters the group keeps at ``rank`` (stored values, all layers)."""

    def bytes(self, rank: int, dtype_bytes: int = FP16_BYTES) -> int:
        """Bytes the group keeps at ``rank`` when values are stored in ``dtype_bytes``."""
        return self.params(rank) * dtype_bytes

    @abstractmethod
    def error(self, rank: int) -> float:
        """The method's own objective (squared) at ``rank``; non-increasing in rank."""

    @abstractmethod
    def materialize(self, rank: int) -> dict[str, Replacement]:
        """Replacements for every layer of the group at ``rank``."""

    @property
    def dense_params(self) -> int:
        """Parameters of the group's original dense weights."""
        return sum(m * n for m, n in self.shapes)

    @property
    def nested(self) -> bool:
        """True where truncation is cheap (one decomposition serves every rank)."""
        return True

    @property
    def stored_rank(self) -> int:
        """The largest rank ``materialize`` accepts (``full_rank`` unless ``compact`` dropped the rest)."""
        return self.full_rank

    @property
    def saving_rank(self) -> int:
        """The largest rank in ``ranks`` that holds fewer parameters than dense (break-even), else the smallest."""
        ranks = self.ranks
        i = bisect.bisect_left(ranks, self.dense_params, key=self.params) - 1
        return ranks[max(i, 0)]

    def compact(
        self,
        max_rank: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Factorization:
        """This factorization kept only as far as ranks <= ``max_rank`` need (None: every rank).

        Everything an allocator reads stays what it was, at every rank in
        ``ranks`` (``ranks``, ``full_rank``, ``error``, ``params``, ``bytes``);
        ``materialize`` gives the same replacements at every rank <= ``max_rank``
        and refuses (ValueError) the ranks beyond. ``dtype`` is the storage dtype
        of what is kept (None: as computed), ``device`` where it is kept (None:
        where it is); ``materialize`` still returns tensors on the device the
        factorization was computed on. The result may be ``self`` (changed or
        not) or a new object; the caller drops its reference to the old one.

        The default keeps everything (a method whose factors cannot be cut
        short, or that does not say how): it returns ``self`` unchanged.
        """
        return self


class _SingleLowRank(Factorization):
    """One (m, n) weight as W ~ A_k B_k at every rank k (nested): subclasses set
    ``_tail`` (the error at each rank) and ``out_dtype``, and implement ``ranks``
    and ``folded`` (the first k columns of A and rows of B, every transform
    applied, before the cast to ``out_dtype``).

    ``compact`` keeps ``folded(max_rank)`` (a ``StoredLowRank``): since column
    i of A and row i of B do not depend on k, slicing the kept factors gives
    the factors of every smaller rank.
    """

    _tail: list[float]
    out_dtype: torch.dtype

    def params(self, rank: int) -> int:
        m, n = self.shapes[0]
        return lowrank_params(m, n, rank)

    def error(self, rank: int) -> float:
        return self._tail[rank]

    @abstractmethod
    def folded(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (m, rank) and B (rank, n), every transform applied, in the dtype of the math."""

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (m, rank) and B (rank, n), contiguous, in ``out_dtype``."""
        A, B = self.folded(rank)
        return A.to(self.out_dtype).contiguous(), B.to(self.out_dtype).contiguous()

    def materialize(self, rank: int) -> dict[str, Replacement]:
        check_stored(self, rank)
        A, B = self.factors(rank)
        return {self.names[0]: LowRank(A, B)}

    def compact(
        self,
        max_rank: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Factorization:
        top = self.stored_rank if max_rank is None else max(0, min(int(max_rank), self.stored_rank))
        A, B = self.folded(top)
        return StoredLowRank.keep(self, A, B, dtype=dtype, device=device)


def check_stored(fact: Factorization, rank: int) -> None:
    """ValueError naming the group where ``rank`` is beyond what ``fact`` keeps (``stored_rank``)."""
    if rank > fact.stored_rank:
        raise ValueError(
            f"{'+'.join(fact.names)}: rank {rank} is beyond the {fact.stored_rank} ranks this factorization "
            f"keeps (compacted for the suite's targets; full rank {fact.full_rank})"
        )


def storage_dtype(stored: torch.dtype, out: torch.dtype) -> torch.dtype:
    """What factors are kept in: ``stored``, or ``out`` (the dtype ``materialize`` casts to) where that is no
    wider. Keeping ``out`` loses nothing: every value is cast to it anyway, once, as it would be from ``stored``."""
    return out if out.itemsize <= stored.itemsize else stored


class StoredLowRank(_SingleLowRank):
    """A single-matrix factorization kept as its folded factors up to ``stored_rank`` (``compact``'s result).

    ``A`` (m, K) and ``B`` (K, n) are the first K columns and rows of the
    original's factors, every transform already applied; ``ranks``, ``error``
    and ``params`` are the original's at every rank, so allocators choose
    exactly as before. ``factors(k)`` slices, then casts to ``out_dtype`` on
    ``device`` (where the original was computed); ranks above K are refused.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        shapes: tuple[tuple[int, int], ...],
        ranks: Sequence[int],
        tail: list[float],
        A: torch.Tensor,
        B: torch.Tensor,
        *,
        out_dtype: torch.dtype,
        device: torch.device,
        info: dict,
    ) -> None:
        self.names, self.shapes = names, shapes
        self._ranks, self._tail = ranks, tail
        self.A, self.B = A, B
        self.out_dtype, self.device = out_dtype, device
        self.info = info

    @classmethod
    def keep(
        cls,
        fact: _SingleLowRank,
        A: torch.Tensor,
        B: torch.Tensor,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StoredLowRank:
        """``fact`` kept as ``A``, ``B`` (its folded factors) in ``dtype`` on ``device`` (copies, nothing shared)."""
        home = getattr(fact, "device", A.device)
        keep_dtype = A.dtype if dtype is None else storage_dtype(dtype, fact.out_dtype)
        where = A.device if device is None else torch.device(device)

        def kept(t: torch.Tensor) -> torch.Tensor:
            out = t.to(where, keep_dtype)
            if out.data_ptr() == t.data_ptr():  # not copied: a slice would keep the original's storage alive
                out = out.clone()
            return out.contiguous()

        return cls(
            fact.names,
            fact.shapes,
            fact.ranks,
            fact._tail,
            kept(A),
            kept(B),
            out_dtype=fact.out_dtype,
            device=torch.device(home),
            info=fact.info,
        )

    @property
    def ranks(self) -> Sequence[int]:
        return self._ranks

    @property
    def stored_rank(self) -> int:
        return self.A.shape[1]

    def folded(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_stored(self, rank)
        return self.A[:, :rank], self.B[:rank]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.folded(rank)
        return (
            A.to(self.device, self.out_dtype).contiguous(),
            B.to(self.device, self.out_dtype).contiguous(),
        )


class SVDLikeFactorization(_SingleLowRank):
    """W ~ (U_k diag(s_k)^1/2)(diag(s_k)^1/2 Vt_k) Q, the shape of the SVD family.

    ``U`` (m, r), ``s`` (r,), ``Vt`` (r, n) come from the SVD of a transformed
    weight W T; ``right`` (n, n) or None is T^-1, folded into the right factor
    so that B = diag(s_k)^1/2 Vt_k T^-1; a 1-D ``right`` (n,) is the diagonal
    of a diagonal T^-1 (channel scales: ASVD, FWSVD), applied as a column
    scaling without forming the n x n matrix (the same numbers as the dense
    diagonal: each entry of B is one product). ``left`` (m, m) or None likewise
    folds a left transform: A = left @ U_k diag(s_k)^1/2. The error at rank k is
    the sum of the discarded s_i^2 (exact for the transformed objective).
    """

    def __init__(
        self,
        name: str,
        U: torch.Tensor,
        s: torch.Tensor,
        Vt: torch.Tensor,
        *,
        right: torch.Tensor | None = None,
        left: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float32,
        info: dict | None = None,
    ) -> None:
        self.names = (name,)
        m, n = U.shape[0], Vt.shape[1]
        self.shapes = ((m, n),)
        self.U, self.s, self.Vt = U, s, Vt
        if right is not None and right.ndim == 1 and right.shape[0] != n:
            raise ValueError(f"{name}: a diagonal right transform needs {n} entries, got {right.shape[0]}")
        self.right, self.left = right, left
        self.out_dtype = out_dtype
        self.device = U.device
        self.info = dict(info or {})
        self._tail = tail_sums(s.double() ** 2)

    @property
    def ranks(self) -> Sequence[int]:
        return range(0, len(self.s) + 1)

    def folded(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.s[:rank].sqrt()
        A = self.U[:, :rank] * root
        B = root[:, None] * self.Vt[:rank]
        if self.left is not None:
            A = self.left @ A
        if self.right is not None:
            B = B * self.right if self.right.ndim == 1 else B @ self.right
        return A, B


class ProjectionFactorization(_SingleLowRank):
    """W ~ U_k (U_k^T W): the outputs projected onto the top-k eigenvectors of their covariance.

    ``U`` (m, r) holds eigenvectors of an output covariance C = Y^T Y, largest
    eigenvalue first; ``eigvals`` all m eigenvalues, descending. At rank k,
    A = U_k and B = U_k^T W; the error is the sum of the discarded eigenvalues,
    ||(I - U_k U_k^T) Y^T||_F^2 (exact for the output objective). Ranks stop at
    r = min(m, n): W has rank at most n, so further directions add nothing.
    ``from_output_covariance`` builds one from W and C.
    """

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        U: torch.Tensor,
        eigvals: torch.Tensor,
        *,
        out_dtype: torch.dtype = torch.float32,
        info: dict | None = None,
    ) -> None:
        m, n = weight.shape
        r = min(m, n, U.shape[1])
        self.names = (name,)
        self.shapes = ((m, n),)
        self.U = U[:, :r]
        self.UtW = self.U.T @ weight.to(U.dtype)
        self.out_dtype = out_dtype
        self.device = U.device
        self.info = dict(info or {})
        self._tail = tail_sums(eigvals.double().clamp_min(0))[: r + 1]

    @classmethod
    def from_output_covariance(
        cls, name: str, weight: torch.Tensor, out_cov: torch.Tensor, *, dtype: torch.dtype = torch.float64
    ) -> ProjectionFactorization:
        """Project ``weight`` (m, n) onto the eigenvectors of its output covariance ``out_cov`` = Y^T Y (m, m).

        The eigendecomposition is float64 on ``weight``'s device
        (``eigh_descending``); U and W are kept in ``dtype`` until truncation,
        and factors come back in ``weight``'s dtype. At rank k, A = U_k and
        B = U_k^T W minimize the output error among projections of the output
        space, ||(W - U_k U_k^T W) X^T||_F^2 = sum_{i>k} lambda_i(Y^T Y).
        """
        eigvals, U = eigh_descending(out_cov.to(weight.device))
        W = weight.to(dtype)
        return cls(name, W, U.to(dtype), eigvals, out_dtype=weight.dtype)

    @property
    def ranks(self) -> Sequence[int]:
        return range(0, self.U.shape[1] + 1)

    def folded(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.U[:, :rank], self.UtW[:rank]
