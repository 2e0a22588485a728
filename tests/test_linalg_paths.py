"""harness.linalg's fallback paths, forced on purpose-built matrices: Cholesky jitter (first shift,
tenfold growth, LinAlgError), the clamped eigenvalues, the zeroed directions of the Gram SVD.

The matrices are built so that each path really runs (checked in the test, not assumed): a singular
Gram (a dead channel), an indefinite matrix, and positive definite matrices so ill-conditioned that
LAPACK's Cholesky fails on them while ``eigvalsh`` still reports a positive smallest eigenvalue.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness_svdllm import SVDLLM

import harness
from harness import linalg

NAME = "model.layers.0.mlp.up_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


def fails(matrix: torch.Tensor) -> bool:
    """LAPACK's verdict, independently of the code under test."""
    return int(torch.linalg.cholesky_ex(matrix).info) != 0


def ill_conditioned_pd(seeds: range = range(300), n: int = 12) -> list[tuple[int, torch.Tensor, float]]:
    """(seed, G, lambda_min) for symmetric G = Q diag(1 .. 1e-17) Q^T whose Cholesky fails although
    eigvalsh says lambda_min > 0: positive definite, failing only through round-off (the case the
    repo's shift -lambda_min + eps gets wrong: it would subtract)."""
    found = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
        G = Q @ torch.diag(torch.logspace(0, -17, n, dtype=torch.float64)) @ Q.T
        G = (G + G.T) / 2
        lam = float(torch.linalg.eigvalsh(G)[0])
        if fails(G) and lam > 0:
            found.append((seed, G, lam))
    assert found, "no positive definite matrix whose Cholesky fails by round-off among the seeds"
    return found


def powers_of_ten(ratio: float) -> int:
    """j where ratio == 10**j (j an integer >= 0), else a failed assertion."""
    j = round(math.log10(ratio))
    assert j >= 0 and ratio == pytest.approx(10.0**j, rel=1e-9), ratio
    return j


# ---------------------------------------------------------------- the first shift
def test_singular_gram_gets_minus_lambda_min_plus_eps():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    X[:, 2] = 0  # a dead input channel: G singular, lambda_min = 0 up to round-off
    G = X.T @ X
    assert fails(G)
    L, jitter = linalg.cholesky_with_jitter(G)
    lam = float(torch.linalg.eigvalsh(G)[0])
    assert jitter == pytest.approx(max(-lam, 0.0) + linalg.CHOLESKY_EPS, rel=1e-12)
    torch.testing.assert_close(L @ L.T, G + jitter * torch.eye(6, dtype=torch.float64))
    assert torch.equal(L, torch.tril(L))


def test_indefinite_matrix_is_shifted_by_minus_lambda_min_plus_eps():
    G = torch.tensor([[1.0, 1.0], [1.0, 1e-3]], dtype=torch.float64)  # det < 0: indefinite
    lam = float(torch.linalg.eigvalsh(G)[0])
    assert lam < -0.5 and fails(G)
    L, jitter = linalg.cholesky_with_jitter(G)
    assert jitter == pytest.approx(-lam + linalg.CHOLESKY_EPS, rel=1e-12)
    torch.testing.assert_close(L @ L.T, G + jitter * torch.eye(2, dtype=torch.float64))


def test_positive_definite_gram_is_factored_without_jitter():
    G = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)  # L = [[2, 0], [1, sqrt 2]] by hand
    L, jitter = linalg.cholesky_with_jitter(G)
    assert jitter == 0.0
    torch.testing.assert_close(L, torch.tensor([[2.0, 0.0], [1.0, math.sqrt(2)]], dtype=torch.float64))


def test_jitter_never_subtracts_when_lambda_min_is_positive():
    """On a positive definite G whose Cholesky fails by round-off (lambda_min > 0 as eigvalsh sees it),
    the shift is eps times a power of ten, never eps - lambda_min (SVD-LLM's formula, which here is
    negative: with eps = 1e-20 below lambda_min it would take G further from definite)."""
    eps = 1e-20
    for _, G, lam in ill_conditioned_pd():
        assert lam > eps  # the repo's shift -lambda_min + eps would be negative
        L, jitter = linalg.cholesky_with_jitter(G, eps=eps, max_tries=30)
        assert jitter > 0
        powers_of_ten(jitter / eps)
        torch.testing.assert_close(L @ L.T, G + jitter * torch.eye(len(G), dtype=G.dtype), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- tenfold growth and giving up
def test_jitter_grows_tenfold_until_the_factorization_succeeds():
    grew = 0
    for _, G, _ in ill_conditioned_pd():
        eye = torch.eye(len(G), dtype=G.dtype)
        _, jitter = linalg.cholesky_with_jitter(G, eps=1e-20, max_tries=30)
        j = powers_of_ten(jitter / 1e-20)
        assert not fails(G + jitter * eye)
        if j >= 1:  # it grew: the previous, tenfold smaller shift must have failed
            grew += 1
            assert fails(G + jitter / 10 * eye)
    assert grew >= 1, "no matrix needed the tenfold growth: the path was not exercised"


def test_linalg_error_once_the_tries_are_spent():
    _, G, _ = ill_conditioned_pd()[0]
    with pytest.raises(torch.linalg.LinAlgError, match="Cholesky failed even with jitter"):
        linalg.cholesky_with_jitter(G, eps=1e-300, max_tries=3)  # 1e-300 .. 1e-298 change nothing
    with pytest.raises(torch.linalg.LinAlgError):
        linalg.cholesky_with_jitter(G, max_tries=0)  # the first failure is final


def test_svdllm_cell_fails_loudly_on_a_nan_gram():
    """A Gram with NaN (an overflowed calibration pass) must not give NaN factors silently."""
    W = torch.randn(5, 4, dtype=torch.float64)
    G = torch.eye(4, dtype=torch.float64)
    G[1, 1] = float("nan")
    stats = harness.LayerStats(tokens=10, gram=G)
    with pytest.raises(torch.linalg.LinAlgError):
        SVDLLM().factorize({NAME: W}, {NAME: stats}, SVDLLM.Options(), CTX)


def test_svdllm_whitening_with_jitter_optimises_the_shifted_objective():
    """Where jitter was added, the factors are optimal for G + jitter I: the error at rank k equals the
    discarded energy of W (G + jitter I)^(1/2), computed here by an eigendecomposition (no Cholesky)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    X[:, 5] = 0
    W = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    stats = harness.LayerStats(tokens=30, gram=X.T @ X)
    fact = SVDLLM().factorize({NAME: W}, {NAME: stats}, SVDLLM.Options(), CTX)
    jitter = fact.info["jitter"]
    assert jitter > 0
    values, vectors = torch.linalg.eigh(X.T @ X + jitter * torch.eye(8, dtype=torch.float64))
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    sigma = torch.linalg.svdvals(W @ root)
    for k in range(7):
        A, B = fact.factors(k)
        shifted = float(((W - A.double() @ B.double()) @ root).square().sum())
        assert shifted == pytest.approx(float(sigma[k:].square().sum()), rel=1e-7, abs=1e-9)
        assert fact.error(k) == pytest.approx(shifted, rel=1e-7, abs=1e-9)


# ---------------------------------------------------------------- eigh and the Gram SVD
def test_eigh_descending_clamps_the_negative_eigenvalues_of_an_indefinite_matrix():
    Q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    M = Q @ torch.diag(torch.tensor([3.0, -2.0, 1.0, -0.5], dtype=torch.float64)) @ Q.T
    values, vectors = linalg.eigh_descending(M)
    assert values.tolist() == pytest.approx([3.0, 1.0, 0.0, 0.0], abs=1e-12)
    # the vectors keep their eigenvalues' order: the first two are those of 3 and 1
    torch.testing.assert_close((M @ vectors[:, :2]), vectors[:, :2] * torch.tensor([3.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(9, 5), (5, 9)])
def test_gram_svd_zeroes_directions_below_its_cut_and_keeps_the_rest(shape):
    m, n = shape
    gen = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64))[0]
    s = torch.tensor([4.0, 2.0, 1.0, 1e-3, 1e-9], dtype=torch.float64)  # 1e-9 < 4e-7: zeroed
    W = U @ torch.diag(s) @ V.T
    Ug, sg, Vtg = linalg.thin_svd(W, method="gram")
    assert sg[:4].tolist() == pytest.approx([4.0, 2.0, 1.0, 1e-3], rel=1e-6)
    assert sg[4] == 0
    assert torch.isfinite(Ug).all() and torch.isfinite(Vtg).all()
    torch.testing.assert_close((Ug[:, :4] * sg[:4]) @ Vtg[:4], U[:, :4] @ torch.diag(s[:4]) @ V[:, :4].T)


def test_lower_triangular_inverse_by_hand():
    L = torch.tensor([[2.0, 0.0], [1.0, 4.0]], dtype=torch.float64)
    expected = torch.tensor([[0.5, 0.0], [-0.125, 0.25]], dtype=torch.float64)  # [[1/a, 0], [-b/(a c), 1/c]]
    torch.testing.assert_close(linalg.lower_triangular_inverse(L), expected)


def test_off_subspace_is_the_complement_projection_with_the_same_bits_wherever_u_lives():
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 5, generator=gen, dtype=torch.float64))
    v = torch.randn(40, generator=gen, dtype=torch.float64)
    r = harness.off_subspace(U, v)
    torch.testing.assert_close(r, v - U @ (U.T @ v), rtol=0, atol=1e-13)
    assert (U.T @ r).abs().max() < 1e-13  # nothing left in the span
    for k in range(6):  # the first k columns, as sliced, and copied to buffers at other offsets (alignments)
        sliced = U[:, :k]
        for offset in (1, 3):
            elsewhere = torch.empty(40 * k + offset, dtype=torch.float64)[offset:].view(40, k)
            elsewhere.copy_(sliced)
            assert torch.equal(harness.off_subspace(elsewhere, v), harness.off_subspace(sliced, v)), k
            column = torch.empty(40 * k + offset, dtype=torch.float64)[offset:].view(k, 40).T
            column.copy_(sliced)
            assert torch.equal(harness.off_subspace(column, v), harness.off_subspace(sliced, v)), k
    assert torch.equal(harness.off_subspace(U[:, :0], v), v)
