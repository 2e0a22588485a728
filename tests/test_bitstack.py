"""BitStack: packing, residual blocks, exact byte counts, the packed layer, the global block order."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from harness_bitstack import BitStack, BitStackLinear, BitStackOrder, bitstack_bytes, pack_signs, unpack_signs
from harness_bitstack.decompose import activation_scales
from harness_bitstack.order import level_order

import harness
from harness.options import parse_options

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
SHAPES = [(13, 7), (24, 16), (16, 24)]  # 13*7 = 91 signs: not a multiple of 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def stats(n: int, seed: int = 0) -> harness.LayerStats:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, n, generator=gen) * torch.logspace(-1, 1, n)
    return harness.LayerStats(tokens=64, abs_mean=X.abs().mean(0), sq_mean=X.square().mean(0))


def factorize(m: int, n: int, seed: int = 0, **raw):
    gen = torch.Generator().manual_seed(seed)
    name = f"model.layers.{seed}.mlp.up_proj"
    W = torch.randn(m, n, generator=gen)
    raw = {"niter": 6, "k": 2, "seqlen": 16, "statistic": "l2", **raw}  # the pooled l2, written out below
    opts = parse_options(BitStack.Options, raw, "methods.bitstack")
    return W, BitStack().factorize({name: W}, {name: stats(n, seed)}, opts, CTX)


def allocation_ctx(loss=None) -> harness.AllocationContext:
    return harness.AllocationContext(seed=0, layers={}, calibration_loss=loss, log=lambda msg: None)


def rebuild(fact, rank: int) -> torch.Tensor:
    """W_rank from the stored blocks, without the plugin's unpacking or reconstruction: bits unpacked by
    numpy (most significant first), sign = 2 bit - 1, W_rank = diag(r) (sum_i sign_i * u_i v_i) diag(s)^-1."""
    b = fact.blocks
    m, n = fact.shapes[0]
    total = torch.zeros(m, n, dtype=torch.float64)
    for i in range(rank):
        bits = np.unpackbits(b.packed[i].numpy())[: m * n].reshape(m, n)
        total += torch.from_numpy(2.0 * bits - 1) * (b.u[i].double() @ b.v[i].double())
    total /= b.scales.double()
    if b.row_scales is not None:
        total *= b.row_scales.double()[:, None]
    return total


def pooled_l2(stats: harness.LayerStats, seqlen: int) -> torch.Tensor:
    """The scale written out: sqrt(seqlen * mean_t x_tj^2) + 1e-3, rounded to fp16 as stored."""
    return ((seqlen * stats.sq_mean.double()).sqrt() + 1e-3).half().double()


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
        direct = ((W.double() - rebuild(fact, rank)) ** 2).sum().item()
        assert fact.error(rank) == pytest.approx(direct, rel=1e-4)


def test_each_block_is_the_sign_times_the_best_rank_k_magnitude_of_the_residual():
    """The algorithm, checked block by block from W and the scales alone: R_0 = W diag(s); block i is
    sign(R_{i-1}) * (best rank-k approximation of |R_{i-1}|, computed here by SVD), up to fp16 rounding;
    the recorded scaled error is ||R_i||_F^2."""
    m, n = 24, 16
    W, fact = factorize(m, n)
    s = pooled_l2(stats(n), 16)
    assert torch.equal(fact.blocks.scales.double(), s)
    R = W.double() * s
    for i in range(fact.niter):
        bits = np.unpackbits(fact.blocks.packed[i].numpy())[: m * n].reshape(m, n)
        signs = torch.from_numpy(2.0 * bits - 1)
        clear = R.abs() > 1e-6 * R.abs().max()  # signs of values at round-off level may go either way
        assert torch.equal(signs[clear], torch.where(R >= 0, 1.0, -1.0)[clear]), i
        U, sigma, Vt = torch.linalg.svd(R.abs(), full_matrices=False)
        best = (U[:, :2] * sigma[:2]) @ Vt[:2]
        magnitude = fact.blocks.u[i].double() @ fact.blocks.v[i].double()
        assert (magnitude - best).norm() / best.norm() < 5e-3, i  # fp16 u, v: ~1e-3
        R = R - signs * magnitude
        assert fact.blocks.scaled_errors[i + 1] == pytest.approx(float(R.square().sum()), rel=1e-4)


def test_scales_are_the_pooled_l2_statistic_an_upper_bound_of_the_repos():
    """The repo's scale is the per-sequence L2 norm averaged over sequences, mean_b ||x_b,:,j|| (not built:
    the core keeps only the pooled mean square). The plugin's is the pooled sqrt(seqlen * mean x^2) =
    sqrt(mean_b ||x_b,:,j||^2): equal to the repo's where every sequence carries the same energy in a
    channel, above it otherwise (Jensen). Both checked on raw inputs (sequences x seqlen x channels)."""
    gen = torch.Generator().manual_seed(0)
    seqlen = 16
    x = torch.randn(3, seqlen, 7, generator=gen, dtype=torch.float64)
    even = x / x.norm(dim=1, keepdim=True) * torch.linspace(0.5, 2.0, 7, dtype=torch.float64)  # equal per sequence
    uneven = x * torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)[:, None, None]
    for inputs, equal in ((even, True), (uneven, False)):
        st = harness.LayerStats(sq_mean=inputs.square().mean((0, 1)), abs_mean=inputs.abs().mean((0, 1)))
        scales, label = activation_scales(st, "l2", seqlen=seqlen)
        pooled = (seqlen * inputs.square().mean((0, 1))).sqrt() + 1e-3
        repos = inputs.norm(dim=1).mean(0) + 1e-3  # get_act_scale: torch.norm(x, dim=1).mean(dim=0)
        torch.testing.assert_close(scales, pooled)
        if equal:
            torch.testing.assert_close(scales, repos)
        else:
            assert (scales > repos * 1.05).all()
        assert "sq_mean" in label
    st = stats(7)
    fallback, label = activation_scales(harness.LayerStats(abs_mean=st.abs_mean), "l2", seqlen=16)
    assert torch.allclose(fallback, st.abs_mean.double() + 1e-3) and "missing" in label
    with pytest.raises(harness.HarnessError, match="calibration"):
        activation_scales(None, "l2", 16)


@pytest.mark.parametrize("shape", [*SHAPES, (13, 5)])  # 65 signs: 9 bytes, an odd total (params round up)
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
        expected = (x.double() @ rebuild(fact, rank).T).float()
        assert torch.allclose(layer(x), expected, atol=1e-5)
        assert torch.allclose(layer(x), expected, atol=1e-5)  # second call (cached path)
    assert torch.equal(fact.materialize(0)[fact.names[0]](x), torch.zeros(3, 5, 24))


# ---------------------------------------------------------------- order and budgets
def three_facts():
    return [factorize(m, n, seed=i)[1] for i, (m, n) in enumerate(SHAPES)]


def test_order_is_level_by_level_by_the_loss_of_each_added_block():
    """At level L every matrix has L blocks and each candidate its (L + 1)-th: the fake loss of that model is
    sum_g w_g e_g(L) - w_c (e_c(L) - e_c(L + 1)), so the level is sorted by the weighted drop, largest first."""
    facts = three_facts()
    order = BitStackOrder().order(facts, BitStackOrder.Options(), allocation_ctx(fake_loss(facts)))
    assert len(order) == 3 * 5  # blocks 2..6 of three matrices
    weights = [1.0, 3.0, 0.5]
    for level in range(1, 6):
        drops = [w * (f.error(level) - f.error(level + 1)) for w, f in zip(weights, facts, strict=True)]
        assert order[3 * (level - 1) : 3 * level] == sorted(range(3), key=lambda g: -drops[g]), level


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
    # a budget equal to a prefix's total loads exactly that prefix (the budget is "at most", not "below")
    ranks, total = [1, 1, 1], minimum
    for g in order:
        total += facts[g].bytes(ranks[g] + 1) - facts[g].bytes(ranks[g])
        ranks[g] += 1
        target = harness.Target("bytes", total)
        assert allocator.allocate(facts, target, BitStackOrder.Options(), ctx) == ranks
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
    # proxy: each level by the error drop per byte of the added block, largest first (ties: earlier group)
    order = BitStackOrder().order(facts, opts, allocation_ctx())
    for level in range(1, 6):
        per_byte = [(f.error(level) - f.error(level + 1)) / (f.bytes(level + 1) - f.bytes(level)) for f in facts]
        assert order[3 * (level - 1) : 3 * level] == sorted(range(3), key=lambda g: -per_byte[g]), level


def test_level_order_puts_failed_scores_last():
    order = level_order([2, 2, 2], 1, lambda g, level, base: [float("nan"), 2.0, 1.0][g])
    assert order == [2, 1, 0]


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


# ---------------------------------------------------------------- scale fusion (fuse_scale, the repo's default)
D, H = 12, 20  # hidden, intermediate
UP, DOWN = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
V, O = "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"


def block_stats(n: int, seed: int, spread: float) -> harness.LayerStats:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, n, generator=gen) * torch.logspace(-spread, spread, n)
    return harness.LayerStats(tokens=64, abs_mean=X.abs().mean(0), sq_mean=X.square().mean(0))


def mlp_pair(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights = {UP: torch.randn(H, D, generator=gen), DOWN: torch.randn(D, H, generator=gen)}
    stats = {UP: block_stats(D, seed + 1, 1.0), DOWN: block_stats(H, seed + 2, 1.5)}
    return weights, stats


def fused(weights, stats, names, **raw):
    opts = parse_options(BitStack.Options, {"seqlen": 16, "statistic": "l2", **raw}, "methods.bitstack")
    return BitStack().factorize({n: weights[n] for n in names}, {n: stats[n] for n in names}, opts, CTX)


def test_fusion_groups_name_the_partner_the_repo_folds_into():
    layers = [
        harness.LayerInfo(f"model.layers.0.{kind}", kind.split(".")[1], 0, (8, 8))
        for kind in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    opts = BitStack.Options()
    assert BitStack().groups(layers, opts) == [
        ("model.layers.0.self_attn.q_proj",),
        (V, O),
        (O, V),
        (UP, DOWN),
        (DOWN,),
    ]
    assert BitStack().groups(layers, BitStack.Options(fuse_scale=False)) == [(x.name,) for x in layers]
    assert BitStack().groups(layers[3:4], opts) == [(UP,)]  # down_proj not decomposed: nothing to fold


def test_scale_fusion_reconstructs_w_and_the_pair_exactly_at_full_rank():
    weights, stats = mlp_pair()
    k = min(H, D)  # full rank per block; each block's error is the fp16 rounding of the last
    up = fused(weights, stats, (UP, DOWN), niter=8, k=k)
    down = fused(weights, stats, (DOWN,), niter=8, k=k)
    assert up.blocks.row_scales is not None and down.blocks.row_scales is None
    Wu, Wd = weights[UP].double(), weights[DOWN].double()
    for fact, W in ((up, Wu), (down, Wd)):
        rel = (rebuild(fact, 8) - W).norm() / W.norm()
        assert rel < 1e-6
    a = torch.rand(H, dtype=torch.float64) + 0.5  # act(gate x) for one token
    pair = rebuild(down, 8) @ torch.diag(a) @ rebuild(up, 8)
    exact = Wd @ torch.diag(a) @ Wu
    assert (pair - exact).norm() / exact.norm() < 1e-6


def test_fused_up_proj_computes_what_the_repos_folded_model_computes():
    """The repo divides up_proj's rows by down_proj's scales s_d and multiplies down_proj's columns by them
    (and up_proj's columns by the norm-side scales s_u), then decomposes those weights as they stand."""
    from harness_bitstack.decompose import bitstack_decompose

    weights, stats = mlp_pair(seed=3)
    up = fused(weights, stats, (UP, DOWN), niter=3, k=2)
    down = fused(weights, stats, (DOWN,), niter=3, k=2)
    s_u, s_d = pooled_l2(stats[UP], 16), pooled_l2(stats[DOWN], 16)
    folded_up = (weights[UP].double() / s_d[:, None] * s_u).float()
    folded_down = (weights[DOWN].double() * s_d).float()
    ref_up = bitstack_decompose(folded_up, None, 3, 2)
    ref_down = bitstack_decompose(folded_down, None, 3, 2)
    assert up.blocks.scaled_errors == pytest.approx(ref_up.scaled_errors, rel=1e-4)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, D, generator=gen, dtype=torch.float64)
    a = torch.rand(5, H, generator=gen, dtype=torch.float64)
    unfused = fused(weights, stats, (UP, DOWN), niter=3, k=2, fuse_scale=False)

    def pair(up_fact, blocks):
        return (a * (x @ rebuild(up_fact, blocks).T)) @ rebuild(down, blocks).T

    for blocks in (1, 3):
        rebuilt_up = sum(
            unpack_signs(ref_up.packed[i], (H, D), torch.float64) * (ref_up.u[i].double() @ ref_up.v[i].double())
            for i in range(blocks)
        )
        rebuilt_down = sum(
            unpack_signs(ref_down.packed[i], (D, H), torch.float64) * (ref_down.u[i].double() @ ref_down.v[i].double())
            for i in range(blocks)
        )
        theirs = (a * ((x / s_u) @ rebuilt_up.T)) @ rebuilt_down.T
        # the two paths round different fp16 u, v (measured 4e-6 here); an unfused up_proj is off by 0.4-0.6
        assert (pair(up, blocks) - theirs).norm() / theirs.norm() < 1e-4
        assert (pair(unfused, blocks) - theirs).norm() / theirs.norm() > 0.1


def test_grouped_query_attention_leaves_o_proj_unscaled_and_v_proj_unfused():
    gen = torch.Generator().manual_seed(0)
    weights = {V: torch.randn(4, D, generator=gen), O: torch.randn(D, 8, generator=gen)}  # 4 kv vs 8 q channels
    stats = {V: block_stats(D, 1, 1.0), O: block_stats(8, 2, 1.0)}
    v, o = fused(weights, stats, (V, O), niter=2, k=2), fused(weights, stats, (O, V), niter=2, k=2)
    assert v.blocks.row_scales is None and "GQA" in v.info["row_scales"]
    assert torch.equal(o.blocks.scales, torch.ones(8, dtype=torch.float16)) and "grouped-query" in o.info["scales"]
    mha = {V: torch.randn(D, D, generator=gen), O: torch.randn(D, D, generator=gen)}
    mha_stats = {V: block_stats(D, 3, 1.0), O: block_stats(D, 4, 1.0)}
    v = fused(mha, mha_stats, (V, O), niter=2, k=2)
    assert torch.equal(v.blocks.row_scales.double(), pooled_l2(mha_stats[O], 16)) and "o_proj" in v.info["row_scales"]
    unfused = fused(mha, mha_stats, (V, O), niter=2, k=2, fuse_scale=False)
    assert unfused.blocks.row_scales is None


def test_fused_bytes_count_the_row_scales_and_equal_the_layer_storage():
    weights, stats = mlp_pair()
    up = fused(weights, stats, (UP, DOWN), niter=3, k=2)
    for rank in up.ranks:
        formula = 0 if rank == 0 else rank * (math.ceil(H * D / 8) + 2 * 2 * (H + D)) + 2 * D + 2 * H
        assert up.bytes(rank) == bitstack_bytes(H, D, 2, rank, row_scales=True) == formula
        assert up.materialize(rank)[UP].harness_bytes() == formula
        x = torch.randn(3, D)
        torch.testing.assert_close(up.materialize(rank)[UP](x), (x.double() @ rebuild(up, rank).T).float())
