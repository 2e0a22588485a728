"""ASVD's ``svd`` / ``ratio`` options and FWSVD's zero-Fisher ``guard``: known answers and unchanged cell ids."""

from __future__ import annotations

import pytest
import torch
from harness_asvd import ASVD
from harness_fwsvd import FWSVD
from harness_fwsvd.decompose import fisher_channel_weights

import harness
from harness.options import options_dict, parse_options

M, N = 24, 16
NAME = "model.layers.0.mlp.up_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(rank: int, seed: int = 0):
    """W (M, N) of exact rank ``rank`` and channel statistics with a 100x spread."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(M, rank, generator=gen) @ torch.randn(rank, N, generator=gen)
    X = torch.randn(100, N, generator=gen) * torch.logspace(-1, 1, N)
    stats = harness.LayerStats(tokens=100, abs_mean=X.abs().mean(0), sq_mean=X.square().mean(0))
    stats.inputs = X  # for scales written out from the inputs
    return W, stats


def asvd_scales(X: torch.Tensor) -> torch.Tensor:
    """ASVD's S = diag((mean_t |x_tj| + 1e-6)^0.5), from the inputs."""
    return (X.double().abs().mean(0) + 1e-6) ** 0.5


def asvd(W, stats, **raw):
    opts = parse_options(ASVD.Options, raw, "methods.asvd")
    return ASVD().factorize({NAME: W}, {NAME: stats}, opts, CTX)


def product(fact, k):
    layer = fact.materialize(k)[NAME]
    return (layer.A.double() @ layer.B.double()) if k else torch.zeros(M, N, dtype=torch.float64)


# ---------------------------------------------------------------- asvd: svd = "lowrank"
def test_lowrank_recovers_a_planted_low_rank_weight_exactly():
    W, stats = planted(rank=5)
    fact = asvd(W, stats, svd="lowrank")
    assert not fact.nested
    # the randomized range finder captures an exactly rank-5 matrix with q = 5: W is reproduced
    torch.testing.assert_close(product(fact, 5), W.double(), rtol=1e-4, atol=1e-4)
    assert fact.error(5) == pytest.approx(0, abs=1e-6 * fact.error(0))
    assert fact.params(5) == 5 * (M + N)


def test_lowrank_error_is_its_own_objective_and_never_beats_the_exact_svd():
    W, stats = planted(rank=N)
    low, full = asvd(W, stats, svd="lowrank"), asvd(W, stats)
    s = asvd_scales(stats.inputs)
    for k in (1, 4, 8, N):
        direct = float((((W.double() - product(low, k)) * s) ** 2).sum())
        assert low.error(k) == pytest.approx(direct, rel=1e-4, abs=1e-6)
        assert low.error(k) >= full.error(k) * (1 - 1e-5)  # Eckart-Young: the exact SVD is optimal
    assert low.error(0) == pytest.approx(float(((W.double() * s) ** 2).sum()), rel=1e-6)


def test_lowrank_is_independent_of_the_order_ranks_are_asked_and_of_the_global_rng():
    W, stats = planted(rank=N)
    torch.manual_seed(1)
    a = asvd(W, stats, svd="lowrank")
    torch.manual_seed(2)
    b = asvd(W, stats, svd="lowrank")
    first = [a.error(k) for k in (3, 7, 3)]
    second = [b.error(k) for k in (7, 3)]
    assert first[0] == first[2] == second[1] and first[1] == second[0]
    torch.testing.assert_close(product(a, 3), product(b, 3), rtol=0, atol=0)
    other = ASVD().factorize({NAME: W}, {NAME: stats}, parse_options(ASVD.Options, {"svd": "lowrank"}, "m"),
                             harness.FactorizeContext(seed=1, device=torch.device("cpu")))  # fmt: skip
    assert not torch.equal(product(other, 3), product(a, 3))  # the seed, and only it, picks the projection


def test_more_power_iterations_do_not_hurt_on_a_flat_spectrum():
    W, stats = planted(rank=N)
    few, many = asvd(W, stats, svd="lowrank", niter=0), asvd(W, stats, svd="lowrank", niter=6)
    assert sum(many.error(k) for k in (2, 4, 6)) <= sum(few.error(k) for k in (2, 4, 6))


# ---------------------------------------------------------------- asvd: ratio = "asvd"
def test_asvd_ratio_needs_the_lm_head():
    blocks = [harness.LayerInfo(NAME, "up_proj", 0, (M, N))]
    opts = parse_options(ASVD.Options, {"ratio": "asvd"}, "methods.asvd")
    with pytest.raises(harness.HarnessError, match=r"lm_head = true"):
        ASVD().groups(blocks, opts)
    head = [*blocks, harness.LayerInfo("lm_head", "lm_head", None, (50, M))]
    assert ASVD().groups(head, opts) == [(NAME,), ("lm_head",)]
    assert ASVD().groups(blocks, ASVD.Options()) == [(NAME,)]


def test_kept_fraction_with_the_head_counts_it_as_asvd_does():
    """ASVD's param ratio (binary_search.py): sum(numel * ratio) / sum(numel) over every Linear, head included."""
    from harness_allocators import Uniform

    W, stats = planted(rank=N)
    head_w = torch.randn(40, N)
    facts = [asvd(W, stats), ASVD().factorize({"lm_head": head_w}, {"lm_head": stats}, ASVD.Options(), CTX)]
    ranks = Uniform().allocate(facts, harness.Target("params", 0.5), Uniform.Options(), None)
    # each matrix: floor(0.5 m n / (m + n)), the reference code's int(numel * ratio) // (m + n)
    assert ranks == [int(M * N * 0.5) // (M + N), int(40 * N * 0.5) // (40 + N)]


# ---------------------------------------------------------------- cell ids
@pytest.mark.parametrize(
    ("cls", "old", "new"),
    [
        (ASVD, {"alpha": 0.5, "scaling": "abs_mean", "eps": 1e-6, "dtype": "float64"}, {"svd": "lowrank"}),
        (FWSVD, {"dtype": "float64", "eps": 1e-6}, {"guard": "add"}),
    ],
)
def test_new_options_leave_default_cell_ids_unchanged(cls, old, new):
    assert options_dict(cls.Options()) == old  # what every existing cell hashed
    changed = options_dict(parse_options(cls.Options, new, "m"))
    assert changed == {**old, **new}


def test_asvd_ratio_and_niter_enter_the_id_only_when_set():
    opts = parse_options(ASVD.Options, {"ratio": "asvd", "niter": 4}, "m")
    assert options_dict(opts)["ratio"] == "asvd" and options_dict(opts)["niter"] == 4
    assert "svd" not in options_dict(opts)


# ---------------------------------------------------------------- fwsvd: guard
def test_fwsvd_guards_by_hand():
    f = torch.tensor([0.0, 1.0, 3.0, 4.0])  # mean 2, max 4
    floor = fisher_channel_weights(f, eps=0.1)
    torch.testing.assert_close(floor, torch.tensor([0.2, 1.0, 3.0, 4.0], dtype=torch.float64).sqrt())
    add = fisher_channel_weights(f, eps=0.1, guard="add")
    torch.testing.assert_close(add, torch.tensor([0.4, 1.4, 3.4, 4.4], dtype=torch.float64).sqrt())
    # the BERT re-implementation: f / max(f) + 1e-5 is the same weighting up to one global factor
    reference = (f / f.max() + 1e-5).double().sqrt()
    ratio = fisher_channel_weights(f, eps=1e-5, guard="add") / reference
    torch.testing.assert_close(ratio, torch.full((4,), 2.0, dtype=torch.float64))


def test_fwsvd_add_guard_minimizes_its_weighted_error():
    W, stats = planted(rank=N)
    f = torch.logspace(-3, 1, N)
    f[3] = 0
    stats.fisher_in = f
    opts = parse_options(FWSVD.Options, {"guard": "add", "eps": 1e-3}, "methods.fwsvd")
    fact = FWSVD().factorize({NAME: W}, {NAME: stats}, opts, CTX)
    d = (f.double() + 1e-3 * f.max()).sqrt()
    for k in (2, 8, N):
        direct = float((((W.double() - product(fact, k)) * d) ** 2).sum())
        assert fact.error(k) == pytest.approx(direct, rel=1e-6, abs=1e-9)
    # the guard changes the decomposition where Fisher is zero: the floor weighs channel 3 far less
    floor = FWSVD().factorize({NAME: W}, {NAME: stats}, FWSVD.Options(eps=1e-3), CTX)
    assert not torch.allclose(product(fact, 4), product(floor, 4))
