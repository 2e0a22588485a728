"""Shared numerics for decomposition methods: float64 where precision matters.

Every function here is device-agnostic: it works on the device its tensors
are on (CPU or CUDA) and returns tensors there.
"""

from __future__ import annotations

from typing import Literal

import torch

SVDMethod = Literal["gram", "lapack"]

CHOLESKY_EPS = 1e-6
"""Added to the diagonal on top of -lambda_min when a Cholesky fails (SVD-LLM's constant)."""

FloatName = Literal["float32", "float64"]


def float_dtype(name: FloatName) -> torch.dtype:
    """``torch.float32`` or ``torch.float64`` by name (what a decomposer's ``dtype`` option holds)."""
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {name!r}")
    return dtypes[name]


def symmetrize(matrix: torch.Tensor) -> torch.Tensor:
    """(M + M^T) / 2: removes the asymmetry that accumulated round-off leaves in a Gram."""
    return (matrix + matrix.transpose(-1, -2)) / 2


def cholesky_with_jitter(
    gram: torch.Tensor, eps: float = CHOLESKY_EPS, max_tries: int = 8
) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of a (possibly singular) Gram, in float64.

    Follows SVD-LLM's official code (``profle_svdllm`` in AIoT-MLSys-Lab/SVD-LLM,
    SVDLLM.py): when the factorization fails, add ``(-lambda_min + 1e-6) I``,
    lambda_min the smallest eigenvalue, and factor again. Two guards of our
    own: the shift is ``max(-lambda_min, 0) + eps`` (the repo's formula
    subtracts when lambda_min > 0, which can make a matrix that failed only
    through round-off indefinite), and it grows tenfold while the factorization
    still fails, at most ``max_tries`` times.

    Returns ``(L, jitter)``: ``L L^T = G + jitter I``, ``jitter`` 0.0 where
    the plain factorization succeeded.
    """
    gram = symmetrize(gram.to(torch.float64))
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return L, 0.0
    lambda_min = float(torch.linalg.eigvalsh(gram)[0])
    jitter = max(-lambda_min, 0.0) + eps
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        if int(info) == 0:
            return L, jitter
        jitter *= 10
    raise torch.linalg.LinAlgError(f"Cholesky failed even with jitter {jitter / 10:.3g} on the diagonal")


def lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """L^-1 of a lower-triangular L by a triangular solve (stabler than ``inv``)."""
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def off_subspace(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) v in float64 for orthonormal columns U: v's part outside their span (LoRD's and SFSD's
    mean offset). From elementwise products and torch's sums over one (row-major) layout, not a BLAS
    dot, whose rounding can follow the data's memory alignment: the same U and v in other places or
    layouts give the same bits."""
    U64, v64 = U.to(torch.float64).contiguous(), v.to(torch.float64).contiguous()
    coefficients = (U64 * v64[:, None]).sum(dim=0)
    return v64 - (U64 * coefficients[None, :]).sum(dim=1)


def eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix in float64, largest first.

    Returns ``(values, vectors)`` with ``vectors[:, i]`` the i-th eigenvector;
    negative eigenvalues (round-off on a PSD matrix) are clamped to 0.
    """
    values, vectors = torch.linalg.eigh(symmetrize(matrix.to(torch.float64)))
    return values.flip(0).clamp_min(0), vectors.flip(1)


def thin_svd(
    matrix: torch.Tensor, dtype: torch.dtype = torch.float64, method: SVDMethod = "lapack"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in ``dtype``: U (m, r), s (r,) descending, Vt (r, n), r = min(m, n).

    ``method="lapack"`` is ``torch.linalg.svd``. ``method="gram"`` takes ``eigh``
    of the r x r Gram (W^T W or W W^T) and recovers the other side's vectors by
    one matmul: on CPU 3-5x faster for LLM projection shapes; in float64 its
    singular values agree with LAPACK's to ~1e-12 relative, except directions
    with s_i below ~1e-7 s_max, which are zeroed (they carry no weight at any
    rank a method keeps). It squares the condition number: keep "lapack" for
    whitened matrices with a wide spectrum.
    """
    W = matrix.to(dtype)
    if method == "lapack":
        return torch.linalg.svd(W, full_matrices=False)
    m, n = W.shape
    tall = m >= n
    gram = W.T @ W if tall else W @ W.T
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
    s = eigenvalues.sqrt()
    keep = s > s[0] * 1e-7 if len(s) else s.bool()
    inverse = torch.where(keep, 1 / s.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(s))
    if tall:
        V = vectors
        U = (W @ V) * inverse
        return U, s * keep, V.T
    U = vectors
    Vt = (U.T @ W) * inverse[:, None]
    return U, s * keep, Vt


def tail_sums(values: torch.Tensor) -> list[float]:
    """``t[k] = sum(values[k:])`` for k = 0 .. len(values), in float64 (t[-1] = 0)."""
    tail = torch.flip(torch.cumsum(torch.flip(values.to(torch.float64), [0]), 0), [0])
    return [*tail.tolist(), 0.0]
