"""SVD against known answers; surgery and counting; the uniform allocator."""

from __future__ import annotations

import pytest
import torch
from harness_allocators.uniform import Uniform
from harness_svd import SVD, SVDOptions
from torch import nn

import harness
from harness.api import FactorizeContext
from harness.budget import saves
from harness.surgery import FactoredLinear, count_layers, count_model, find_linears, module_params, replaced
from harness.targets import Target

CTX = FactorizeContext(seed=0, device=torch.device("cpu"))


def planted(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, n, generator=gen, dtype=torch.float64
    )


def factorize(weight: torch.Tensor):
    return SVD().factorize({"w": weight}, {}, SVDOptions(), CTX)


def product(fact, rank: int) -> torch.Tensor:
    low = fact.materialize(rank)["w"]
    return low.A.double() @ low.B.double()


def test_planted_low_rank_weight_is_recovered_exactly():
    weight = planted(48, 32, rank=5)
    fact = factorize(weight)
    assert torch.allclose(product(fact, 5), weight, atol=1e-9)
    assert fact.error(5) == pytest.approx(0.0, abs=1e-12)
    assert fact.error(4) > 1.0


@pytest.mark.parametrize("rank", [1, 3, 10, 20])
def test_error_equals_discarded_singular_values(rank):
    weight = torch.randn(40, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fact = factorize(weight)
    s = torch.linalg.svdvals(weight)
    discarded = (s[rank:] ** 2).sum().item()
    measured = torch.linalg.matrix_norm(weight - product(fact, rank)).item() ** 2
    assert measured == pytest.approx(discarded, rel=1e-9)
    assert fact.error(rank) == pytest.approx(discarded, rel=1e-9)


def test_eckart_young_no_rank_k_matrix_does_better():
    weight = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fact = factorize(weight)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        other = torch.randn(30, 4, generator=gen, dtype=torch.float64) @ torch.randn(
            4, 20, generator=gen, dtype=torch.float64
        )
        assert torch.linalg.matrix_norm(weight - other) ** 2 >= fact.error(4)


def test_parameter_count_is_k_times_m_plus_n():
    fact = factorize(torch.randn(48, 32, dtype=torch.float64))
    low = fact.materialize(7)["w"]
    assert fact.params(7) == 7 * (48 + 32) == low.A.numel() + low.B.numel()


def test_factors_take_the_weight_dtype():
    weight = torch.randn(16, 8)
    low = SVD().factorize({"w": weight}, {}, SVDOptions(), CTX).materialize(3)["w"]
    assert low.A.dtype == low.B.dtype == torch.float32


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(16, 16, bias=False), "up_proj": nn.Linear(16, 24, bias=True)})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(16, 50, bias=False)


def test_find_linears_takes_block_layers_and_lm_head_only_when_asked():
    model = TwoBlocks()
    names = [layer.name for layer in find_linears(model)]
    assert names == ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]
    assert "lm_head" in [layer.name for layer in find_linears(model, include_lm_head=True)]
    assert [la.name for la in find_linears(model, kinds=["up_proj"])] == ["layers.0.up_proj", "layers.1.up_proj"]
    assert find_linears(model)[1].shape == (24, 16) and find_linears(model)[1].index == 0


def test_replaced_swaps_in_factored_layers_and_restores_originals():
    torch.manual_seed(0)
    model = TwoBlocks()
    original = model.layers[0].up_proj
    x = torch.randn(3, 16)
    A, B = torch.randn(24, 4), torch.randn(4, 16)
    before = count_layers(model, ["layers.0.up_proj"])
    with replaced(model, {"layers.0.up_proj": harness.LowRank(A, B)}):
        layer = model.layers[0].up_proj
        assert isinstance(layer, FactoredLinear)
        assert torch.allclose(layer(x), x @ (A @ B).T + original.bias, atol=1e-5)
        assert count_layers(model, ["layers.0.up_proj"]) == (4 * (24 + 16) + 24, (4 * 40 + 24) * 4)
    assert model.layers[0].up_proj is original
    assert count_layers(model, ["layers.0.up_proj"]) == before


def test_dense_mode_writes_the_product_back():
    model = TwoBlocks()
    A, B = torch.randn(16, 2), torch.randn(2, 16)
    with replaced(model, {"layers.1.q_proj": harness.LowRank(A, B)}, dense=True):
        layer = model.layers[1].q_proj
        assert isinstance(layer, nn.Linear) and torch.allclose(layer.weight, A @ B)


def test_count_model_counts_tied_weights_once():
    model = TwoBlocks()
    model.lm_head.weight = nn.Parameter(torch.randn(50, 16))
    total, _ = count_model(model)
    model.layers[0].q_proj.weight = model.layers[1].q_proj.weight
    tied, _ = count_model(model)
    assert total - tied == 16 * 16


def _facts(shapes):
    return [SVD().factorize({f"w{i}": torch.randn(*s)}, {}, SVDOptions(), CTX) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8, 0.95, 1.0])
def test_uniform_meets_the_target_and_never_picks_a_rank_that_saves_nothing(keep):
    facts = _facts([(64, 64), (64, 160), (160, 64), (32, 64)])
    ranks = Uniform().allocate(facts, Target("params", keep), None, None)
    for fact, rank in zip(facts, ranks):
        ((m, n),) = fact.shapes
        if rank is None:
            assert keep * m * n >= fact.params(max(1, (m * n) // (m + n)))  # dense only where a factor would not save
            continue
        assert saves(fact, rank)
        assert fact.params(rank) <= keep * m * n
        assert fact.params(rank + 1) > keep * m * n or not saves(fact, rank + 1)


def test_uniform_keeps_everything_dense_at_keep_one():
    facts = _facts([(64, 64), (64, 160)])
    assert Uniform().allocate(facts, Target("params", 1.0), None, None) == [None, None]


def test_uniform_bytes_budget_is_never_exceeded():
    from harness.api import AllocationContext
    from harness.budget import assignment_bytes

    facts = _facts([(64, 64), (64, 160), (160, 64)])
    ctx = AllocationContext(seed=0, layers={}, dtype_bytes=2)
    budget = 30_000
    ranks = Uniform().allocate(facts, Target("bytes", budget), None, ctx)
    assert assignment_bytes(facts, ranks, 2) <= budget


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_gram_svd_agrees_with_lapack(shape):
    from harness.linalg import thin_svd

    weight = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    U, s, Vt = thin_svd(weight, method="gram")
    _, s2, _ = thin_svd(weight, method="lapack")
    assert torch.allclose(s, s2, rtol=1e-10, atol=1e-12)
    assert torch.allclose((U * s) @ Vt, weight, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(min(shape), dtype=torch.float64), atol=1e-9)


def test_gram_svd_of_a_rank_deficient_weight_has_no_nans():
    from harness.linalg import thin_svd

    weight = planted(40, 30, rank=3)
    U, s, Vt = thin_svd(weight, method="gram")
    assert torch.isfinite(U).all() and torch.isfinite(Vt).all()
    assert (s[3:] == 0).all()
    assert torch.allclose((U[:, :3] * s[:3]) @ Vt[:3], weight, atol=1e-8)


def test_a_replacement_module_gets_the_replaced_linears_bias_unless_it_owns_one():
    from harness.surgery import replaced

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=True))
    bias = model[0].bias.detach().clone()
    x = torch.randn(3, 6)

    class Half(torch.nn.Module):  # stands for W x only
        def forward(self, inputs):
            return 0.5 * inputs[:, :4]

    class Owned(Half):
        own_bias = True

    with replaced(model, {"0": Half()}):
        torch.testing.assert_close(model(x), 0.5 * x[:, :4] + bias)
        assert module_params(model[0]) == 4  # the bias; Half stores nothing
    with replaced(model, {"0": Owned()}):
        torch.testing.assert_close(model(x), 0.5 * x[:, :4])
