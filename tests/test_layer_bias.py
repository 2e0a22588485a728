"""A Linear's own bias reaches the decomposers (``LayerStats.bias``), and ``LowRank(A, B, bias)``.

Planted: a biased Linear with more outputs than inputs (m > n), inputs with a far non-zero mean. The
best rank-k affine map of its outputs y = W x + b, y_hat = U_k U_k^T y + c with U the eigenvectors of
the centred output scatter, has error sum_{i>k} sigma_i^2(Y - mean) (Eckart-Young on the centred
outputs; computed here by an SVD, independently of the plugins' eigendecompositions). ``sfsd`` and
centred ``lord``, run through the core's ``factorize_group`` and swapped in by its surgery, must reach
it at every rank; without the bias they cannot (checked: the gap the bias closes).
"""

from __future__ import annotations

import pytest
import torch
from harness_lord import LoRD
from harness_sfsd import SFSD

import harness
from harness.run.factors import factorize_group
from harness.surgery import FactoredLinear, build_module, replaced

M, N, T = 20, 8, 400  # out > in
NAME = "layer.0.proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential()
    layer = torch.nn.Linear(N, M, bias=True, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(M, N, generator=gen, dtype=torch.float64))
        layer.bias.copy_(5 * torch.randn(M, generator=gen, dtype=torch.float64))
    model.add_module("layer", torch.nn.ModuleList([torch.nn.Sequential()]))
    model.layer[0].add_module("proj", layer)
    X = torch.randn(T, N, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, N, dtype=torch.float64)
    X = X + 3 * torch.randn(N, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        Y = layer(X)
    stats = harness.LayerStats(tokens=T, out_cov=Y.T @ Y, out_mean=Y.mean(0))  # what calibration collects
    return model, X, Y, stats


def optimum(Y: torch.Tensor) -> list[float]:
    sigma = torch.linalg.svdvals(Y - Y.mean(0))
    return [float(sigma[k:].square().sum()) for k in range(len(sigma) + 1)]


def outputs(model, fact, rank, X) -> torch.Tensor:
    with replaced(model, fact.materialize(rank)), torch.no_grad():
        module = model.get_submodule(NAME)
        assert isinstance(module, FactoredLinear) and module.bias is not None
        return module(X)


@pytest.mark.parametrize(("decomposer", "options"), [(SFSD(), SFSD.Options()), (LoRD(), LoRD.Options(centre=True))])
def test_the_core_hands_the_bias_and_the_result_is_the_affine_optimum(decomposer, options):
    model, X, Y, stats = planted()
    collected = {NAME: stats}
    fact = factorize_group(decomposer, model, (NAME,), collected, options, CTX)
    assert collected[NAME].bias is None  # the collected statistics are not changed in place
    best = optimum(Y)
    tol = 1e-9 * best[0]
    for k in range(N + 1):
        err = float((outputs(model, fact, k, X) - Y).square().sum())
        assert err == pytest.approx(best[k], rel=1e-8, abs=tol), k
        assert fact.error(k) == pytest.approx(err, rel=1e-8, abs=tol), k
    torch.testing.assert_close(outputs(model, fact, N, X), Y)  # full rank min(m, n) = n: exact
    # without the bias (what decomposers were handed before) the same method misses the optimum
    blind = decomposer.factorize({NAME: model.get_submodule(NAME).weight.detach()}, {NAME: stats}, options, CTX)
    err = float((outputs(model, blind, N, X) - Y).square().sum())
    assert err > 1e-3 * best[0]


def test_lowrank_bias_replaces_the_linears_own_in_both_modes():
    gen = torch.Generator().manual_seed(3)
    original = torch.nn.Linear(N, M, bias=False, dtype=torch.float64)
    A, B = torch.randn(M, 3, generator=gen, dtype=torch.float64), torch.randn(3, N, generator=gen, dtype=torch.float64)
    c = torch.randn(M, generator=gen, dtype=torch.float64)
    x = torch.randn(5, N, generator=gen, dtype=torch.float64)
    want = x @ (A @ B).T + c
    with torch.no_grad():
        factored = build_module(original, harness.LowRank(A, B, c), dense=False)
        dense = build_module(original, harness.LowRank(A, B, c), dense=True)
        torch.testing.assert_close(factored(x), want)
        torch.testing.assert_close(dense(x), want)
        biased = torch.nn.Linear(N, M, dtype=torch.float64)
        kept = build_module(biased, harness.LowRank(A, B), dense=False)  # no bias given: the Linear's own
        torch.testing.assert_close(kept(x), x @ (A @ B).T + biased.bias)
        torch.testing.assert_close(build_module(biased, harness.LowRank(A, B, c), dense=False)(x), want)
    with pytest.raises(ValueError, match="bias"):
        build_module(original, harness.LowRank(A, B, c[:-1]), dense=False)
