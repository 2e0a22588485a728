"""BitStack: packing, residual blocks, exact byte counts, the packed layer, the global block order."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from harness_bitstack import BitStack, BitStackLinear, BitStackOrder, bitstack_bytes, pack_signs, unpack_signs
from harness_bitstack.decompose import activation_scales
from harness_bitstack.order import level_order

import harness
from harness.options import parse_options
from harness.plugins import Plugins

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
SHAPES = [(13, 7), (24, 16), (16, 24)]  # 13*7 = 91 signs: not a multiple of 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stats(n: int, seed: int = 0) -> harness.LayerStats:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, n, generator=gen) * torch.logspace(-1, 1, n)
    return harness.LayerStats(tokens=64, abs_mean=X.abs().mean(0), sq_mean=X.square().mean(0))


def factorize(m: int, n: int, seed: int = 0, **raw):
    gen = torch.Generator().manual_seed(seed)
    name = f"model.layers.{seed}.mlp.up_proj"
    W = torch.randn(m, n, generator=gen)
    opts = parse_options(BitStack.Options, {"niter": 6, "k": 2, "seqlen": 16, **raw}, "methods.bitstack")
    return W, BitStack().factorize({name: W}, {name: stats(n, seed)}, opts, CTX)


def allocation_ctx(loss=None) -> harness.AllocationContext:
    return harness.AllocationContext(seed=0, layers={}, calibration_loss=loss, log=lambda msg: None)


def fake_loss(facts, calls=None):
    """A calibration loss stand-in: weighted reconstruction error of the assignment."""
    weights = [1.0, 3.0, 0.5]

    def loss(assignment):
        if calls is not None:
            calls.append(list(assignment))
        return sum(w * f.error(r) for w, f, r in zip(weights, facts, assignment, strict=True))

    return loss


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("shape", [(13, 7), (8, 8), (1, 3)])
def test_pack_unpack_round_trip(shape):
    x = torch.randn(shape)
    x.view(-1)[0] = 0.0  # zero counts as +1
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(x.numel() / 8)
    expected = torch.where(x >= 0, 1, -1).to(torch.int8)
    assert torch.equal(unpack_signs(packed, x.shape), expected)
    assert unpack_signs(packed, x.shape)[0, 0] == 1


def test_pack_layout_is_msb_first():
    x = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1, 1])
    assert pack_signs(x).tolist() == [0b10000001, 0b10000000]


# ---------------------------------------------------------------- decomposition
@pytest.mark.parametrize("shape", SHAPES)
def test_error_strictly_decreases_with_every_block(shape):
    W, fact = factorize(*shape)
    errors = [fact.error(r) for r in fact.ranks]
    assert errors[0] == pytest.approx((W.double() ** 2).sum().item())
    assert all(a > b for a, b in itertools.pairwise(errors))
    scaled = fact.blocks.scaled_errors  # the quantity each block provably reduces
    assert all(a > b for a, b in itertools.pairwise(scaled))
    for rank in (0, 3, 6):
        direct = ((W.double() - fact.reconstruct(rank).double()) ** 2).sum().item()
        assert fact.error(rank) == pytest.approx(direct, rel=1e-4)


def test_scales_are_the_repos_l2_statistic():
    st = stats(7)
    scales, label = activation_scales(st, "l2", seqlen=16)
    assert torch.allclose(scales, (16 * st.sq_mean.double()).sqrt() + 1e-3)
    assert "sq_mean" in label
    fallback, label = activation_scales(harness.LayerStats(abs_mean=st.abs_mean), "l2", seqlen=16)
    assert torch.allclose(fallback, st.abs_mean.double() + 1e-3) and "missing" in label
    with pytest.raises(harness.HarnessError, match="calibration"):
        activation_scales(None, "l2", 16)


@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_equal_the_formula_and_the_layer_storage(shape):
    m, n = shape
    _, fact = factorize(m, n)
    k = 2
    for rank in fact.ranks:
        formula = 0 if rank == 0 else rank * (math.ceil(m * n / 8) + 2 * k * (m + n)) + 2 * n
        assert fact.bytes(rank) == bitstack_bytes(m, n, k, rank) == formula
        assert fact.params(rank) == math.ceil(formula / 2)
        layer = fact.materialize(rank)[fact.names[0]]
        assert layer.harness_bytes() == formula and layer.harness_params() == fact.params(rank)
        assert layer.packed.dtype == torch.uint8 and layer.u.dtype == layer.v.dtype == torch.float16


@pytest.mark.parametrize("cache_dense", [False, True])
def test_bitstack_linear_computes_x_w_hat_t(cache_dense):
    _, fact = factorize(24, 16, cache_dense=cache_dense)
    x = torch.randn(3, 5, 16)
    for rank in (0, 1, 4, 6):
        layer = fact.materialize(rank)[fact.names[0]]
        assert isinstance(layer, BitStackLinear)
        expected = x @ fact.reconstruct(rank).T
        assert torch.allclose(layer(x), expected, atol=1e-5)
        assert torch.allclose(layer(x), expected, atol=1e-5)  # second call (cached path)
    assert torch.equal(fact.materialize(0)[fact.names[0]](x), torch.zeros(3, 5, 24))


def test_decomposition_is_deterministic():
    _, a = factorize(24, 16)
    _, b = factorize(24, 16)
    assert torch.equal(a.blocks.packed, b.blocks.packed) and torch.equal(a.blocks.u, b.blocks.u)


# ---------------------------------------------------------------- order and budgets
def three_facts():
    return [factorize(m, n, seed=i)[1] for i, (m, n) in enumerate(SHAPES)]


def test_order_is_level_by_level_and_deterministic():
    facts = three_facts()
    orders = []
    for _ in range(2):
        allocator = BitStackOrder()
        orders.append(allocator.order(facts, BitStackOrder.Options(), allocation_ctx(fake_loss(facts))))
    assert orders[0] == orders[1]
    assert len(orders[0]) == 3 * 5  # blocks 2..6 of three matrices
    levels = [orders[0][i : i + 3] for i in range(0, 15, 3)]
    assert all(sorted(level) == [0, 1, 2] for level in levels)
    # the fake loss is lowest where the weighted error drop is largest: check level 2
    weights = [1.0, 3.0, 0.5]
    drops = [w * (f.error(1) - f.error(2)) for w, f in zip(weights, facts)]
    assert levels[0] == sorted(range(3), key=lambda g: -drops[g])


def test_budget_is_never_exceeded_and_the_prefix_is_longest():
    facts = three_facts()
    calls: list = []
    allocator = BitStackOrder()
    ctx = allocation_ctx(fake_loss(facts, calls))
    order = allocator.order(facts, BitStackOrder.Options(), ctx)
    n_calls = len(calls)
    minimum = sum(f.bytes(1) for f in facts)
    maximum = sum(f.bytes(6) for f in facts)
    for budget in torch.linspace(minimum, maximum + 100, 23).tolist():
        ranks = allocator.allocate(facts, harness.Target("bytes", budget), BitStackOrder.Options(), ctx)
        used = sum(f.bytes(r) for f, r in zip(facts, ranks))
        assert used <= budget
        loaded = sum(r - 1 for r in ranks)
        assert sorted(order[:loaded]) == sorted(g for g, r in enumerate(ranks) for _ in range(r - 1))
        if loaded < len(order):
            g = order[loaded]
            assert used + facts[g].bytes(ranks[g] + 1) - facts[g].bytes(ranks[g]) > budget
    assert len(calls) == n_calls  # one order served every budget
    bits = allocator.allocate(facts, harness.Target("bits", 12.0), BitStackOrder.Options(), ctx)
    dense = sum(f.dense_params for f in facts)
    assert sum(f.bytes(r) for f, r in zip(facts, bits)) <= 12.0 * dense / 8
    with pytest.raises(harness.HarnessError, match="below the minimum"):
        allocator.allocate(facts, harness.Target("bytes", minimum - 1), BitStackOrder.Options(), ctx)


def test_loss_score_needs_calibration_and_proxy_does_not():
    facts = three_facts()
    with pytest.raises(harness.HarnessError, match="proxy"):
        BitStackOrder().allocate(facts, harness.Target("bits", 12.0), BitStackOrder.Options(), allocation_ctx())
    opts = parse_options(BitStackOrder.Options, {"score": "proxy"}, "allocators.bitstack-order")
    ranks = BitStackOrder().allocate(facts, harness.Target("bits", 12.0), opts, allocation_ctx())
    assert all(1 <= r <= 6 for r in ranks)


def test_level_order_puts_failed_scores_last():
    order = level_order([2, 2, 2], 1, lambda g, level, base: [float("nan"), 2.0, 1.0][g])
    assert order == [2, 1, 0]


def test_registered_through_the_hook():
    import harness_bitstack

    plugins = Plugins(load_entry_points=False)
    plugins.register(harness_bitstack, name="bitstack")
    assert plugins.names("decomposer") == ["bitstack"]
    assert plugins.names("allocator") == ["bitstack-order"]


def test_lowrank_svd_option_tracks_the_exact_decomposition():
    from harness_bitstack.decompose import bitstack_decompose

    torch.manual_seed(0)
    weight = torch.randn(96, 160)
    exact = bitstack_decompose(weight, None, niter=4, k=8, svd="full")
    torch.manual_seed(0)
    fast = bitstack_decompose(weight, None, niter=4, k=8, svd="lowrank")
    assert all(b < a for a, b in zip(fast.errors, fast.errors[1:]))  # still decreasing block by block
    # a Gaussian matrix has a flat spectrum, the hard case for a randomized SVD
    assert fast.errors[-1] <= exact.errors[-1] * 1.10
