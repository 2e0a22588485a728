"""SFSD (harness_sfsd): centred feature-space decomposition with its mean compensation, and the surgical search.

Answers computed here independently: the best rank-k affine map of a layer's outputs
is PCA of the mean-removed outputs (SVD of Y - mu: error = the discarded squared
singular values); the surgical rule's choice on hand-made additive losses is worked
out by hand in the comments, and on random losses by a plain reading of the rule.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch
from harness_sfsd import SFSD
from harness_sfsd.feature import FeatureFactorization
from harness_sfsd.surgical import FRACTIONS, Surgical, SurgicalOptions, break_even, candidates

import harness
from harness.surgery import build_module

NAME = "model.layers.0.mlp.up_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(m: int, n: int, t: int = 300, seed: int = 0):
    """W (m, n), bias b (m,), inputs X (t, n) with a large common offset: outputs with a far non-zero mean."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    b = 3 * torch.randn(m, generator=gen, dtype=torch.float64)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    X = torch.randn(t, n, generator=gen, dtype=torch.float64) @ mix * torch.logspace(-1, 1, n, dtype=torch.float64)
    X = X + 4 * torch.randn(n, generator=gen, dtype=torch.float64)
    return W, b, X


def stats_of(Y: torch.Tensor) -> harness.LayerStats:
    """What the harness collects from a Linear's outputs Y (its bias included)."""
    return harness.LayerStats(tokens=Y.shape[0], out_cov=Y.T @ Y, out_mean=Y.mean(0))


def linear(W: torch.Tensor, b: torch.Tensor | None) -> torch.nn.Linear:
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=torch.float64)
    layer.weight.data.copy_(W)
    if b is not None:
        layer.bias.data.copy_(b)
    return layer


def through_harness(original: torch.nn.Linear, fact: harness.Factorization, rank: int, X: torch.Tensor):
    """The layer's outputs with the factorization at ``rank`` swapped in as the harness does (its bias added)."""
    module = build_module(original, fact.materialize(rank)[NAME], dense=False)
    with torch.no_grad():
        return module(X)


def affine_optimum(Y: torch.Tensor) -> list[float]:
    """Closed form: sum_t ||y_t - y_hat_t||^2 of the best rank-k affine map, k = 0..: SVD of the centred outputs."""
    sigma = torch.linalg.svdvals(Y - Y.mean(0))
    return [float(sigma[k:].square().sum()) for k in range(len(sigma) + 1)]


def sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().sum())


# ---------------------------------------------------------------- the decomposer
def test_centred_sfsd_is_the_affine_optimum_and_beats_uncentred():
    """A bias-free Linear (the paper's models), outputs with a non-zero mean, through the harness's own surgery."""
    m, n = 24, 16
    W, _, X = planted(m, n)
    Y = X @ W.T
    stats, original = stats_of(Y), linear(W, None)
    centred = SFSD().factorize({NAME: W}, {NAME: stats}, SFSD.Options(), CTX)
    uncentred = SFSD().factorize({NAME: W}, {NAME: stats}, SFSD.Options(centre=False), CTX)
    optimum = affine_optimum(Y)
    for k in range(1, n):
        err = sq(Y, through_harness(original, centred, k, X))
        assert err == pytest.approx(optimum[k], rel=1e-8)
        assert centred.error(k) == pytest.approx(err, rel=1e-8)
        plain = sq(Y, through_harness(original, uncentred, k, X))
        assert err < plain  # the mean no longer competes with the variance for the k directions
        assert uncentred.error(k) == pytest.approx(plain, rel=1e-8)
    torch.testing.assert_close(through_harness(original, centred, n, X), Y)
    # the parameters count the m values of the bias
    assert centred.params(5) == 5 * (m + n) + m and uncentred.params(5) == 5 * (m + n)


def test_compensation_with_a_layer_bias_is_the_affine_optimum_and_exact_at_full_rank():
    """y = U_k U_k^T (W x + b) + (I - U_k U_k^T) mu: the factorization told the layer's bias (m > n)."""
    m, n = 24, 16
    W, b, X = planted(m, n, seed=1)
    Y = X @ W.T + b
    original = linear(W, b)
    fact = FeatureFactorization(NAME, W, Y.T @ Y, Y.mean(0), Y.shape[0], layer_bias=b)
    optimum = affine_optimum(Y)
    for k in range(n + 1):
        out = through_harness(original, fact, k, X)
        assert sq(Y, out) == pytest.approx(optimum[k], rel=1e-8, abs=1e-8 * optimum[0])
        assert fact.error(k) == pytest.approx(optimum[k], rel=1e-8, abs=1e-8 * optimum[0])
    torch.testing.assert_close(through_harness(original, fact, n, X), Y)
    # the same map by its formula
    A, B, bias = fact.factors(6)
    P = A @ A.T
    torch.testing.assert_close(
        A @ B @ X.T + bias[:, None],  # the whole output offset, in place of the Linear's b
        P @ (W @ X.T + b[:, None]) + ((torch.eye(m) - P).double() @ Y.mean(0))[:, None],
    )


@pytest.mark.parametrize(("m", "n"), [(16, 24), (24, 16)])
def test_biased_layer_through_the_decomposer_is_the_affine_optimum(m, n):
    """The decomposer is told b (``LayerStats.bias``): the affine optimum at every rank, exact at full rank."""
    W, b, X = planted(m, n, seed=2)
    Y = X @ W.T + b
    stats = stats_of(Y)
    stats.bias = b
    fact = SFSD().factorize({NAME: W}, {NAME: stats}, SFSD.Options(), CTX)
    optimum = affine_optimum(Y)
    for k in range(min(m, n) + 1):
        assert sq(Y, through_harness(linear(W, b), fact, k, X)) == pytest.approx(
            optimum[k], rel=1e-8, abs=1e-8 * optimum[0]
        )
    torch.testing.assert_close(through_harness(linear(W, b), fact, min(m, n), X), Y)


def test_compensate_false_is_the_centred_projection_without_bias():
    """The code as it runs (its compensation term evaluates to zero): centred eigenvectors, y_hat = P W x."""
    m, n = 24, 16
    W, _, X = planted(m, n, seed=3)
    Y = X @ W.T
    fact = SFSD().factorize({NAME: W}, {NAME: stats_of(Y)}, SFSD.Options(compensate=False), CTX)
    _, _, Vt = torch.linalg.svd(Y - Y.mean(0), full_matrices=False)  # right vectors of Yc: the centred eigenvectors
    for k in (3, 8):
        P = Vt[:k].T @ Vt[:k]
        out = through_harness(linear(W, None), fact, k, X)
        torch.testing.assert_close(out, X @ (P @ W).T)
        assert fact.error(k) == pytest.approx(sq(Y, out), rel=1e-8)
        assert fact.params(k) == k * (m + n)


def test_uncentred_option_keeps_the_previous_factors():
    m, n = 24, 16
    W, _, X = planted(m, n, seed=4)
    Y = X @ W.T
    fact = SFSD().factorize({NAME: W}, {NAME: stats_of(Y)}, SFSD.Options(centre=False), CTX)
    old = harness.ProjectionFactorization.from_output_covariance(NAME, W, Y.T @ Y)
    a, b = fact.materialize(7)[NAME], old.materialize(7)[NAME]
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert SFSD.Options(centre=False).compensate is False and SFSD.Options().compensate is True


def test_compact_keeps_factors_and_costs():
    m, n = 24, 16
    W, _, X = planted(m, n, seed=5)
    Y = X @ W.T
    fact = SFSD().factorize({NAME: W}, {NAME: stats_of(Y)}, SFSD.Options(), CTX)
    before = [t.clone() for t in fact.factors(4)]
    errors = [fact.error(k) for k in fact.ranks]
    kept = fact.compact(6, dtype=torch.float32)
    assert kept.stored_rank == 6 and [kept.error(k) for k in kept.ranks] == errors
    assert fact.stored_rank == n  # the original is left whole
    for x, y in zip(kept.factors(4), before, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        kept.factors(7)


# ---------------------------------------------------------------- the surgical allocator
class Fake(harness.Factorization):
    """A (d, d) group: ranks 0..d, k (2d) parameters; only its costs matter to the allocator."""

    def __init__(self, name: str, d: int = 40) -> None:
        self.names, self.shapes, self.info = (name,), ((d, d),), {}

    @property
    def ranks(self):
        return range(0, self.shapes[0][0] + 1)

    def params(self, rank):
        return rank * 2 * self.shapes[0][0]

    def error(self, rank):
        return float(self.shapes[0][0] - rank)

    def materialize(self, rank):
        raise AssertionError("the allocator only scores through the calibration loss")


def additive_loss(weights: list[float], kappa: int = 20):
    """loss = sum_i weights[i] (kappa - r_i) / kappa (0 where dense): each group's damage on its own."""
    return lambda ranks: sum(w * (kappa - r) / kappa for w, r in zip(weights, ranks, strict=True) if r is not None)


def allocate(facts, loss, target, layers=(), **options):
    ctx = harness.AllocationContext(
        seed=0, layers={n: None for n in layers}, calibration_loss=loss, dtype_bytes=2, log=lambda msg: None
    )
    return Surgical().allocate(facts, target, SurgicalOptions(**options), ctx)


def test_candidates_are_the_codes_search_space():
    fact = Fake("x")  # 40 x 40: the code's max_rank int(1600 / 80) = 20
    assert break_even(fact) == 20
    assert candidates(fact) == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18]  # [1] + int(0.1..0.9 * 20); 20 stays dense
    assert len(FRACTIONS) == 10 and FRACTIONS[-1] == pytest.approx(1.0)


def test_surgical_picks_the_hand_worked_ranks():
    s = math.log1p(0.005)  # one group's step of the permitted loss
    loss = additive_loss([2 * s, 5 * s, s / 0.55])
    facts = [Fake(f"g{i}") for i in range(3)]
    # group 2 (allowed s): (20 - r)/20 <= 0.55 -> r = 10 (damage 0.909 s)
    # group 1 (allowed 2 s, slack 1.091 s): 5 (20 - r)/20 <= 1.091 -> r = 16 (damage s)
    # then params 1600 + 1280 + 800 = 3680 of 4800 (0.767) meet keep 0.77: the sweep stops, group 0 stays dense
    assert allocate(facts, loss, harness.Target("params", 0.77), start=0) == [None, 16, 10]
    # keep 0.7: group 0 (allowed 3 s, slack 1.091 s): 2 (20 - r)/20 <= 1.091 -> r = 10; 2880 / 4800 = 0.6
    assert allocate(facts, loss, harness.Target("params", 0.7), start=0) == [10, 16, 10]
    # keep 0.5: the first sweep ends at 0.6; growth doubled, s' = ln 1.01 = 1.995 s: group 2 takes r = 1
    # (1.727 s), group 1 (slack 2.263 s) r = 12 (2 s), group 0 (slack 2.258 s) r = 1 (1.9 s): 1120 / 4800
    assert allocate(facts, loss, harness.Target("params", 0.5), start=0) == [1, 12, 1]
    # start = 0.34 of 3 groups: group 0 is never compressed; keep 0.7: the first sweep ends at 0.767, the
    # second (s') gives group 2 r = 1, and 1600 + 1600 + 80 = 3280 / 4800 = 0.683 meets it at once
    assert allocate(facts, loss, harness.Target("params", 0.7), start=0.34) == [None, None, 1]
    with pytest.raises(harness.HarnessError, match="even the smallest candidate ranks"):
        allocate(facts, loss, harness.Target("params", 0.3), start=0.34)  # 1760 / 4800 at best
    with pytest.raises(harness.HarnessError, match="6 sweeps"):  # a loss no compression passes
        allocate(facts, lambda ranks: 0.0 if ranks == [None] * 3 else 1e9, harness.Target("params", 0.7), start=0)


def rule_by_hand(facts, loss, limit_params, growth, start, relax=2.0, sweeps=6):
    """A plain reading of README.md's rule: sweeps from the last group, stop once the budget is met."""
    for _ in range(sweeps):
        ranks = [None] * len(facts)
        n, base = len(facts), loss(ranks)
        for i in range(n - 1, start - 1, -1):
            kappa = facts[i].shapes[0][0] // 2
            space = sorted({1} | {int((0.1 + j * 0.1) * kappa) for j in range(9)})
            for r in space:
                if r >= 1 and loss([*ranks[:i], r, *ranks[i + 1 :]]) <= base + (n - i) * math.log(1 + growth):
                    ranks[i] = r
                    break
            if sum(f.dense_params if r is None else f.params(r) for f, r in zip(facts, ranks)) <= limit_params:
                return ranks
        growth *= relax
    return "unreachable"


@pytest.mark.parametrize("seed", range(6))
def test_surgical_matches_a_plain_reading_of_its_rule(seed):
    rng = random.Random(seed)
    facts = [Fake(f"g{i}", d=rng.choice([30, 40, 64])) for i in range(7)]
    weights = [rng.uniform(0.0, 0.05) for _ in facts]
    pair = rng.uniform(0, 0.02)

    def loss(ranks):  # additive damage plus an interaction between neighbours
        damage = [0.0 if r is None else w * (1 - r / (f.shapes[0][0] / 2)) for f, w, r in zip(facts, weights, ranks)]
        return 2.0 + sum(damage) + pair * sum(a * b for a, b in itertools.pairwise(damage)) * 100

    keep = rng.choice([0.5, 0.7, 0.9])
    dense = sum(f.dense_params for f in facts)
    expected = rule_by_hand(facts, loss, keep * dense + 1e-9, 0.005, start=0)
    try:
        got = allocate(facts, loss, harness.Target("params", keep), start=0)
    except harness.HarnessError:
        got = "unreachable"
    assert got == expected


def test_reference_calls_get_break_even_ranks():
    """Given a block's groups only (fewer than the model's layers): the code's max_rank, no loss measured."""
    facts = [Fake("model.layers.0.q", d=40), Fake("model.layers.0.k", d=30)]

    def loss(ranks):
        raise AssertionError("no loss is measured for reference ranks")

    layers = [f.names[0] for f in facts] + ["model.layers.1.q"]
    assert allocate(facts, loss, harness.Target("params", 0.5), layers=layers) == [20, 15]
    with pytest.raises(AssertionError, match="no loss"):
        allocate(facts, loss, harness.Target("params", 0.5), layers=layers, reference="search")


def test_options_are_checked():
    for bad in ({"growth": 0}, {"start": 1.0}, {"relax": 1.0}, {"sweeps": 0}):
        with pytest.raises(ValueError):
            SurgicalOptions(**bad)


# ---------------------------------------------------------------- end to end
def test_propagated_sfsd_with_the_surgical_allocator_runs(tmp_path, capsys):
    from harness.run.runner import RunOptions, run_suite
    from harness.suite import load_suite
    from tests.conftest import write_suite

    text = """
        name = "sfsd-tiny"
        device = "cpu"
        models = ["random:tiny-llama"]
        targets = [0.9]
        allocators = ["surgical"]
        [[methods]]
        name = "sfsd"
        [[profilers]]
        name = "params"
        [calibration]
        samples = 4
        seqlen = 16
        batch_size = 2
        loss_samples = 2
        inputs = "propagated"
        """
    suite = load_suite(write_suite(tmp_path / "s.toml", text))
    summary = run_suite(suite, RunOptions(tmp_path / "results", progress=False))
    assert not summary.failed and summary.computed == 2
    (cell,) = [r for r in summary.results if r.method]
    assert cell.ok and cell.calibration["inputs"] == "propagated"
    assert any(rank is not None for rank in cell.ranks.values())
    err = capsys.readouterr().err
    # the reference ranks at break-even (the code's max_rank), stage by stage (q/k/v, o, gate/up, down:
    # 3, 1, 2, 1 groups per block), then the cell's own sweep
    calls = [int(n) for n in re.findall(r"surgical: reference ranks for (\d+) groups at break-even", err)]
    assert calls == [3, 1, 2, 1] * 2 and "surgical: sweep 1" in err
