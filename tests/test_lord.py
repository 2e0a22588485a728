"""LoRD (harness_lord): centred output PCA with a bias term, against closed forms on planted data."""

from __future__ import annotations

from types import SimpleNamespace

import harness_lord
import pytest
import torch
from harness_lord import LoRD
from harness_lord.centred import CentredProjectionFactorization

import harness
from harness.options import parse_options
from harness.surgery import FactoredLinear, build_module, module_bytes, module_params

M, N, T = 12, 8, 300
NAME = "model.layers.0.mlp.down_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(offset: float = 3.0, seed: int = 0):
    """W (M, N) and inputs X (T, N) whose mean is far from zero, so the outputs Y = X W^T have a large mean."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=gen, dtype=torch.float64)
    scale = torch.logspace(-1, 1, N, dtype=torch.float64)
    X = torch.randn(T, N, generator=gen, dtype=torch.float64) * scale + offset * torch.randn(N, generator=gen)
    return W, X


def centred_fact(W, X) -> CentredProjectionFactorization:
    Y = X @ W.T
    return CentredProjectionFactorization(NAME, W, Y.T @ Y, Y.mean(0), T)


def built(fact, k: int) -> FactoredLinear:
    """The module the harness swaps in for the factorization at rank ``k`` (a bias-free Linear replaced)."""
    (replacement,) = fact.materialize(k).values()
    (m, n) = fact.shapes[0]
    original = torch.nn.Linear(n, m, bias=False, dtype=torch.float64)
    return build_module(original, replacement, dense=False)


def closed_form(W, X, k):
    """Independently: PCA of the centred outputs by an SVD of Y - mean; y_hat = mu + P_k P_k^T (y - mu)."""
    Y = X @ W.T
    mu = Y.mean(0)
    P, sigma, _ = torch.linalg.svd((Y - mu).T, full_matrices=False)
    Pk = P[:, :k]
    return mu + (Y - mu) @ Pk @ Pk.T, float(sigma[k:].square().sum())


def sq_error(Y, Y_hat) -> float:
    return float((Y - Y_hat).square().sum())


def test_centred_pca_with_bias_matches_the_closed_form():
    W, X = planted()
    fact = centred_fact(W, X)
    Y = X @ W.T
    assert list(fact.ranks) == list(range(min(M, N) + 1))
    for k in fact.ranks:
        expected, tail = closed_form(W, X, k)
        (replacement,) = fact.materialize(k).values()
        assert isinstance(replacement, harness.LowRank) and replacement.bias.shape == (M,)
        module = built(fact, k)
        assert isinstance(module, FactoredLinear) and module.A.shape == (M, k) and module.B.shape == (k, N)
        with torch.no_grad():
            got = module(X)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(Y.abs().max()))
        assert fact.error(k) == pytest.approx(tail, rel=1e-8, abs=1e-8 * float(Y.square().sum()))
        assert sq_error(Y, got) == pytest.approx(fact.error(k), rel=1e-7, abs=1e-7 * float(Y.square().sum()))
    assert fact.error(min(M, N)) == pytest.approx(0.0, abs=1e-9 * float(Y.square().sum()))


def test_centred_with_bias_beats_uncentred_at_equal_rank_on_outputs_with_a_mean():
    W, X = planted()
    Y = X @ W.T
    centred = centred_fact(W, X)
    uncentred = harness.ProjectionFactorization.from_output_covariance(NAME, W, Y.T @ Y)
    for k in range(1, min(M, N)):
        module = built(centred, k)
        (low,) = uncentred.materialize(k).values()
        with torch.no_grad():
            err_centred = sq_error(Y, module(X))
        err_uncentred = sq_error(Y, X @ (low.A @ low.B).T)
        assert err_uncentred == pytest.approx(uncentred.error(k), rel=1e-7)  # its own objective, brute force
        assert err_centred < err_uncentred, k  # a rank-k projection plus a constant beats the projection alone
    # and the sandwich: the centred rank-k map plus its constant is a rank-(k+1) approximation of Y, so
    # Eckart-Young puts the uncentred rank k+1 below it, while it is never worse than uncentred rank k
    tol = 1e-9 * uncentred.error(0)
    for k in range(0, min(M, N)):
        assert uncentred.error(k + 1) - tol <= centred.error(k) <= uncentred.error(k) + tol


def test_without_a_mean_centred_and_uncentred_coincide():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(M, N, generator=gen, dtype=torch.float64)
    X = torch.randn(T, N, generator=gen, dtype=torch.float64)
    X = X - X.mean(0)  # zero-mean inputs: zero-mean outputs
    Y = X @ W.T
    centred = centred_fact(W, X)
    uncentred = harness.ProjectionFactorization.from_output_covariance(NAME, W, Y.T @ Y)
    for k in range(min(M, N) + 1):
        assert centred.error(k) == pytest.approx(uncentred.error(k), rel=1e-9, abs=1e-9 * uncentred.error(0))
        _, _, bias = centred.factors(k)
        assert float(bias.abs().max()) < 1e-9 * float(Y.abs().max())


def test_costs_count_the_new_bias_and_compact_keeps_ranks_costs_errors():
    W, X = planted(seed=1)
    fact = centred_fact(W, X)
    k = 3
    module = built(fact, k)
    assert fact.params(k) == k * (M + N) + M == module_params(module)
    assert module_bytes(module) == 8 * fact.params(k)  # float64 weights here
    before = {r: (fact.params(r), fact.error(r)) for r in fact.ranks}
    want = {r: fact.materialize(r)[NAME] for r in range(5)}
    compacted = fact.compact(4, dtype=torch.float64, device="cpu")
    assert {r: (compacted.params(r), compacted.error(r)) for r in compacted.ranks} == before
    assert compacted.stored_rank == 4 and compacted.full_rank == min(M, N)
    for r, module in want.items():
        again = compacted.materialize(r)[NAME]
        assert all(torch.equal(getattr(module, t), getattr(again, t)) for t in ("A", "B", "bias"))
    with pytest.raises(ValueError):
        compacted.materialize(5)


def test_options_resolve_to_what_this_harness_collects(monkeypatch):
    assert "out_mean" in harness.STAT_KINDS  # the core collects the output mean
    # a harness without the statistic: unset means uncentred, and centre = true is refused
    with monkeypatch.context() as patched:
        patched.setattr(harness_lord, "mean_collected", lambda: False)
        opts = parse_options(LoRD.Options, {}, "methods.lord")
        assert opts.centre is False and LoRD().needs == frozenset({"out_cov"})
        with pytest.raises(harness.HarnessError, match="out_mean"):
            parse_options(LoRD.Options, {"centre": True}, "methods.lord")
    # with the statistic collected, unset means centred, and the factorization is the centred one
    opts = parse_options(LoRD.Options, {}, "methods.lord")
    assert opts.centre is True and LoRD().needs == frozenset({"out_cov", "out_mean"})
    W, X = planted()
    Y = X @ W.T
    stats = SimpleNamespace(tokens=T, out_cov=Y.T @ Y, out_mean=Y.mean(0))
    fact = LoRD().factorize({NAME: W}, {NAME: stats}, opts, CTX)
    assert isinstance(fact, CentredProjectionFactorization)
    assert fact.error(2) == pytest.approx(closed_form(W, X, 2)[1], rel=1e-8)
    uncentred = LoRD().factorize({NAME: W}, {NAME: stats}, LoRD.Options(centre=False), CTX)
    assert isinstance(uncentred, harness.ProjectionFactorization) and uncentred.error(2) > fact.error(2)
