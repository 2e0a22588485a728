"""The calibrated SVD family (svd-llm, fwsvd, asvd, sfsd, lord) on planted data with known answers."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from harness_asvd import ASVD
from harness_fwsvd import FWSVD
from harness_fwsvd.decompose import fisher_channel_weights
from harness_lord import LoRD
from harness_sfsd import SFSD
from harness_svd import SVD
from harness_svdllm import SVDLLM

import harness
from harness import linalg
from harness.options import parse_options

M, N, T = 24, 16, 200
NAME = "model.layers.0.mlp.up_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(seed: int = 0, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (M, N) (of ``rank`` if given) and inputs X (T, N) with correlated, unevenly scaled channels."""
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        W = torch.randn(M, N, generator=gen, dtype=torch.float64)
    else:
        W = torch.randn(M, rank, generator=gen, dtype=torch.float64) @ torch.randn(
            rank, N, generator=gen, dtype=torch.float64
        )
    mix = torch.randn(N, N, generator=gen, dtype=torch.float64)
    scale = torch.logspace(-1.5, 1.5, N, dtype=torch.float64)
    X = torch.randn(T, N, generator=gen, dtype=torch.float64) @ mix * scale
    return W, X


def stats_for(W: torch.Tensor, X: torch.Tensor, fisher_in: torch.Tensor | None = None) -> harness.LayerStats:
    Y = X @ W.T
    return harness.LayerStats(
        tokens=X.shape[0],
        gram=X.T @ X,
        abs_mean=X.abs().mean(0),
        sq_mean=X.square().mean(0),
        out_cov=Y.T @ Y,
        out_mean=Y.mean(0),
        fisher_in=fisher_in,
        fisher_out=None,
    )


def factorize(decomposer, W, stats, **options):
    opts = decomposer.Options(**options)
    return decomposer.factorize({NAME: W}, {NAME: stats}, opts, CTX)


def product(fact, rank) -> torch.Tensor:
    A, B, *_ = fact.factors(rank)  # a centred factorization adds its bias
    return A.double() @ B.double()


def output_error(W, AB, X) -> float:
    return float(((W - AB) @ X.T).square().sum())


def weighted_error(W, AB, d) -> float:
    return float(((W - AB) * d).square().sum())


def fisher_like(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(N, generator=gen, dtype=torch.float64) ** 4 * 10


ALL = [SVDLLM(), FWSVD(), ASVD(), SFSD(), LoRD()]


# ---------------------------------------------------------------- svd-llm
def test_svdllm_output_error_is_discarded_energy_and_beats_svd():
    """X has full column rank, so the rank-k optimum of ||(W - AB) X^T||_F^2 is Eckart-Young on the
    outputs W X^T: the sum of its discarded squared singular values (computed here, no whitening)."""
    W, X = planted()
    fact = factorize(SVDLLM(), W, stats_for(W, X))
    svd = factorize(SVD(), W, stats_for(W, X))
    sigma = torch.linalg.svdvals(W @ X.T)
    for k in fact.ranks:
        err = output_error(W, product(fact, k), X)
        assert err == pytest.approx(float(sigma[k:].square().sum()), rel=1e-8, abs=1e-8)
        assert err == pytest.approx(fact.error(k), rel=1e-8, abs=1e-8)
        assert err <= output_error(W, product(svd, k), X) * (1 + 1e-9) + 1e-9
    assert fact.info["jitter"] == 0.0
    assert fact.info["tokens"] == T


def test_svdllm_strictly_better_than_svd_at_a_middle_rank():
    W, X = planted()
    k = N // 2
    whitened = output_error(W, product(factorize(SVDLLM(), W, stats_for(W, X)), k), X)
    plain = output_error(W, product(factorize(SVD(), W, stats_for(W, X)), k), X)
    assert whitened < 0.9 * plain


def test_cholesky_of_rank_deficient_gram_gets_jitter_recorded():
    W, X = planted()
    X[:, 3] = 0  # a dead input channel: G is singular
    G = X.T @ X
    assert int(torch.linalg.cholesky_ex(G).info) != 0
    L, jitter = linalg.cholesky_with_jitter(G)
    assert jitter > 0
    torch.testing.assert_close(L @ L.T, G + jitter * torch.eye(N, dtype=G.dtype))
    logged = []
    ctx = dataclasses.replace(CTX, log=logged.append)
    fact = SVDLLM().factorize({NAME: W}, {NAME: stats_for(W, X)}, SVDLLM.Options(), ctx)
    assert fact.info["jitter"] == pytest.approx(jitter)
    assert any("jitter" in m or "diagonal" in m for m in logged)
    assert all(torch.isfinite(t).all() for t in fact.factors(N // 2))


def test_cholesky_with_jitter_of_positive_definite_gram_adds_nothing():
    _, X = planted()
    L, jitter = linalg.cholesky_with_jitter(X.T @ X)
    assert jitter == 0.0
    torch.testing.assert_close(L @ L.T, X.T @ X)


# ---------------------------------------------------------------- fwsvd
def test_fwsvd_weighted_error_is_exact_and_beats_svd():
    W, X = planted()
    f = fisher_like()
    fact = factorize(FWSVD(), W, stats_for(W, X, f))
    svd = factorize(SVD(), W, stats_for(W, X))
    d = f.sqrt()
    for k in fact.ranks:
        err = weighted_error(W, product(fact, k), d)
        assert err == pytest.approx(fact.error(k), rel=1e-8, abs=1e-8)
        assert err <= weighted_error(W, product(svd, k), d) * (1 + 1e-9) + 1e-9


def test_fwsvd_zero_fisher_channels_are_guarded():
    W, X = planted()
    f = fisher_like()
    f[[2, 5]] = 0
    fact = factorize(FWSVD(), W, stats_for(W, X, f))
    for k in (1, N // 2, N):
        assert all(torch.isfinite(t).all() for t in fact.factors(k))
    torch.testing.assert_close(product(fact, N), W)
    assert torch.equal(fisher_channel_weights(torch.zeros(N)), torch.ones(N, dtype=torch.float64))


# ---------------------------------------------------------------- asvd
def asvd_scales(X: torch.Tensor, magnitude: str = "abs_mean", alpha: float = 0.5) -> torch.Tensor:
    """ASVD's S = diag(m_j^alpha) written out from the inputs: m_j = mean_t |x_tj| (the paper's) or
    sqrt(mean_t x_tj^2) (``scaling = "rms"``), plus the repo's 1e-6 guard before the power."""
    m = X.abs().mean(0) if magnitude == "abs_mean" else X.square().mean(0).sqrt()
    return (m + 1e-6) ** alpha


@pytest.mark.parametrize(("scaling", "alpha"), [("abs_mean", 0.5), ("abs_mean", 1.0), ("rms", 0.5)])
def test_asvd_minimises_the_activation_scaled_error(scaling, alpha):
    """At every rank, ||(W - AB) S||_F^2 equals the discarded energy of W S (Eckart-Young, computed here),
    the factors reach it and plain SVD does no better; full rank gives W back."""
    W, X = planted()
    stats = stats_for(W, X)
    fact = factorize(ASVD(), W, stats, scaling=scaling, alpha=alpha)
    torch.testing.assert_close(product(fact, fact.full_rank), W)
    assert fact.error(fact.full_rank) == pytest.approx(0, abs=1e-9)
    scales = asvd_scales(X, scaling, alpha)
    sigma = torch.linalg.svdvals(W * scales)
    svd = factorize(SVD(), W, stats)
    for k in fact.ranks:
        err = weighted_error(W, product(fact, k), scales)
        assert err == pytest.approx(float(sigma[k:].square().sum()), rel=1e-8, abs=1e-8)
        assert err == pytest.approx(fact.error(k), rel=1e-8, abs=1e-8)
        assert err <= weighted_error(W, product(svd, k), scales) * (1 + 1e-9) + 1e-9


def test_asvd_alpha_zero_is_plain_svd_and_the_scaling_modes_differ():
    W, X = planted()
    stats = stats_for(W, X)
    flat = factorize(ASVD(), W, stats, alpha=0.0)
    svd = factorize(SVD(), W, stats)
    torch.testing.assert_close(product(flat, 5), product(svd, 5))
    rms, mean = factorize(ASVD(), W, stats, scaling="rms"), factorize(ASVD(), W, stats)
    assert not torch.allclose(product(rms, 5), product(mean, 5))


# ---------------------------------------------------------------- sfsd / lord
@pytest.mark.parametrize(
    "decomposer, options",
    [(SFSD(), {"centre": False}), (LoRD(), {"centre": False})],
    ids=["sfsd-uncentred", "lord-uncentred"],
)
def test_output_projection_is_optimal_for_outputs(decomposer, options):
    W, X = planted()
    fact = factorize(decomposer, W, stats_for(W, X), **options)
    sigma = torch.linalg.svdvals(W @ X.T)  # brute force: Eckart-Young on the outputs W X^T
    for k in fact.ranks:
        A, _ = fact.factors(k)
        torch.testing.assert_close(A.T.double() @ A.double(), torch.eye(k, dtype=torch.float64))
        err = output_error(W, product(fact, k), X)
        assert err == pytest.approx(float(sigma[k:].square().sum()), rel=1e-7, abs=1e-7)
        assert err == pytest.approx(fact.error(k), rel=1e-7, abs=1e-7)


def test_output_projection_beats_random_projections_and_matches_svdllm():
    W, X = planted()
    stats = stats_for(W, X)
    k = 6
    fact = factorize(SFSD(), W, stats, centre=False)  # the uncentred projection: centred sfsd adds a mean bias
    best = output_error(W, product(fact, k), X)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        Q, _ = torch.linalg.qr(torch.randn(M, k, generator=gen, dtype=torch.float64))
        assert best <= output_error(W, Q @ Q.T @ W, X) + 1e-9
    # with a full-rank Gram the whitened SVD reaches the same optimum
    torch.testing.assert_close(product(fact, k), product(factorize(SVDLLM(), W, stats), k))


# ---------------------------------------------------------------- all methods
@pytest.mark.parametrize("decomposer", ALL, ids=lambda d: d.name)
def test_planted_low_rank_weight_is_recovered_exactly(decomposer):
    W, X = planted(rank=3)
    fact = factorize(decomposer, W, stats_for(W, X, fisher_like()))
    torch.testing.assert_close(product(fact, 3), W, rtol=1e-9, atol=1e-9)
    assert fact.error(3) <= 1e-12 * fact.error(0)


@pytest.mark.parametrize("decomposer", ALL, ids=lambda d: d.name)
def test_factorization_contract(decomposer):
    W, X = planted()
    fact = factorize(decomposer, W.float(), stats_for(W, X, fisher_like()))
    assert fact.names == (NAME,) and fact.shapes == ((M, N),)
    assert list(fact.ranks) == list(range(min(M, N) + 1))
    errors = [fact.error(k) for k in fact.ranks]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errors))
    A, B, *bias = fact.factors(4)
    assert A.shape == (M, 4) and B.shape == (4, N) and A.dtype == torch.float32
    assert [b.shape for b in bias] in ([], [(M,)])  # a centred factorization carries its own bias
    (replacement,) = fact.materialize(4).values()
    x = X[:5].float()
    expected = x @ B.T @ A.T + (bias[0] if bias else 0)
    if isinstance(replacement, harness.LowRank):  # a centred method's carries its bias: the layer's whole offset
        assert replacement.rank == 4 and (replacement.bias is not None) == bool(bias)
        offset = 0 if replacement.bias is None else replacement.bias
        torch.testing.assert_close(x @ replacement.B.T @ replacement.A.T + offset, expected)
    else:  # a module of its own
        torch.testing.assert_close(replacement(x), expected)
    assert fact.params(4) == 4 * (M + N) + M * len(bias)
    assert decomposer.needs <= set(harness.STAT_KINDS) and decomposer.needs


@pytest.mark.parametrize("decomposer", ALL, ids=lambda d: d.name)
def test_options_are_declared_and_typos_rejected(decomposer):
    assert dataclasses.is_dataclass(decomposer.Options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decomposer.Options().dtype = "float32"
    with pytest.raises(harness.HarnessError, match="unknown option"):
        parse_options(decomposer.Options, {"dtyp": "float32"}, f"methods.{decomposer.name}")


def test_invalid_option_values_fail():
    with pytest.raises(harness.HarnessError):
        parse_options(ASVD.Options, {"alpha": -1.0}, "methods.asvd")
    with pytest.raises(harness.HarnessError):
        parse_options(ASVD.Options, {"scaling": "abs_max"}, "methods.asvd")
