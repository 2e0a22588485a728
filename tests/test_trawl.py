"""TRAWL (trawl-cp, trawl-tucker): planted tensors recovered, stacking, groupings, both modes, seeds."""

from __future__ import annotations

import pytest
import torch
from harness_trawl import TrawlCP, TrawlTucker
from harness_trawl.decompose import cp_stack, tucker_stack
from harness_trawl.factorization import StackSliceLinear, clear_cache
from harness_trawl.stacking import stack, trawl_groups, unstack
from torch import nn

import harness
from harness.options import parse_options
from harness.plugins import Plugins
from harness.surgery import count_layers, find_linears, replaced

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
D, KV, FF = 8, 4, 12  # hidden, GQA key/value width, MLP width


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for kind, (m, n) in {"q_proj": (D, D), "k_proj": (KV, D), "v_proj": (KV, D), "o_proj": (D, D)}.items():
            setattr(self.self_attn, kind, nn.Linear(n, m, bias=False))
        self.mlp = nn.Module()
        for kind, (m, n) in {"gate_proj": (FF, D), "up_proj": (FF, D), "down_proj": (D, FF)}.items():
            setattr(self.mlp, kind, nn.Linear(n, m, bias=False))


class TinyLlama(nn.Module):
    """Llama-shaped Linear layers (GQA attention, gated MLP), 3 layers."""

    def __init__(self, n_layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block() for _ in range(n_layers)])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread start-up dominates on a shared machine (seconds -> ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def options(decomposer, **raw):
    return parse_options(decomposer.Options, raw, "methods.trawl")


def mlp_weights(layer: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prefix = f"model.layers.{layer}.mlp"
    return {
        f"{prefix}.gate_proj": torch.randn(FF, D, generator=gen),
        f"{prefix}.up_proj": torch.randn(FF, D, generator=gen),
        f"{prefix}.down_proj": torch.randn(D, FF, generator=gen),
    }


def planted_cp(S=4, m=20, n=15, r=3, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    A, B, C = (torch.randn(k, r, generator=gen, dtype=torch.float64) for k in (S, m, n))
    return torch.einsum("sr,mr,nr->smn", A, B, C)


# ---------------------------------------------------------------- known answers
def test_planted_cp_tensor_is_recovered():
    T = planted_cp()
    result = cp_stack(T, 3, seed=0, n_iter_max=500, tol=1e-12)
    assert result.rel_error < 1e-6  # stated tolerance: exact CP rank 3 recovered to 1e-6 relative
    assert torch.allclose(result.full(), T, atol=1e-5 * T.abs().max())


def test_planted_tucker_tensor_is_recovered():
    gen = torch.Generator().manual_seed(1)
    core = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    U0, U1, U2 = (
        torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))[0] for k, r in ((4, 2), (20, 3), (15, 3))
    )
    T = torch.einsum("tij,st,mi,nj->smn", core, U0, U1, U2)
    result = tucker_stack(T, (2, 3, 3), seed=0, n_iter_max=200, tol=1e-14)
    assert result.rel_error < 1e-8  # exact multilinear rank (2, 3, 3): recovered to 1e-8 relative
    assert result.core.shape == (2, 3, 3) and result.stack.shape == (4, 2)


def test_cp_error_falls_with_rank_on_weights():
    fact = TrawlCP().factorize(mlp_weights(), {}, options(TrawlCP, ranks=[1, 4, 8]), CTX)
    errors = [fact.error(r) for r in fact.ranks]
    assert errors[0] > errors[1] > errors[2]
    assert set(fact.info["ranks"]) == {"1", "4", "8"}
    assert all(v["iterations"] >= 1 and 0 <= v["rel_error"] < 1 for v in fact.info["ranks"].values())


# ---------------------------------------------------------------- stacking
def test_stack_unstack_round_trip_is_exact():
    weights = mlp_weights()
    tensor = stack(weights, torch.float32)
    assert tensor.shape == (3, FF, D)  # [gate, up, down^T]
    assert torch.equal(tensor[2], weights["model.layers.0.mlp.down_proj"].T)
    back = unstack(tensor, list(weights))
    assert all(torch.equal(back[name], w) for name, w in weights.items())


def test_groupings_on_a_gqa_model():
    layers = find_linears(TinyLlama())
    attn = trawl_groups(layers, "layer-attn", "last:2")
    assert attn == [
        ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"),
        ("model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"),
        ("model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.o_proj"),
        ("model.layers.2.self_attn.k_proj", "model.layers.2.self_attn.v_proj"),
    ]
    mlp = trawl_groups(layers, "layer-mlp", [0, -1])
    assert mlp == [tuple(f"model.layers.{i}.mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj")) for i in (0, 2)]
    across = trawl_groups(layers, "across-layers", "all", kinds=["down_proj", "q_proj"])
    assert across == [
        tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(3)),
        tuple(f"model.layers.{i}.mlp.down_proj" for i in range(3)),
    ]


def test_bad_layer_specs_and_kinds_are_refused():
    layers = find_linears(TinyLlama())
    with pytest.raises(harness.HarnessError, match="layers"):
        options(TrawlCP, layers="middle")
    with pytest.raises(harness.HarnessError, match="outside"):
        trawl_groups(layers, "layer-mlp", [5])
    with pytest.raises(harness.HarnessError, match="not stacked"):
        trawl_groups(layers, "layer-mlp", "all", kinds=["q_proj"])
    with pytest.raises(harness.HarnessError, match="unknown option"):
        options(TrawlCP, rank=[4])


def test_different_shapes_are_refused_not_padded():
    q = torch.randn(D, D)
    k = torch.randn(KV, D)
    weights = {"model.layers.0.self_attn.q_proj": q, "model.layers.0.self_attn.k_proj": k}
    with pytest.raises(harness.HarnessError, match="different shapes"):
        TrawlCP().factorize(weights, {}, options(TrawlCP), CTX)
    odd = [
        harness.LayerInfo("model.layers.0.mlp.gate_proj", "gate_proj", 0, (FF, D)),
        harness.LayerInfo("model.layers.0.mlp.down_proj", "down_proj", 0, (D, FF + 1)),
    ]
    with pytest.raises(harness.HarnessError, match="never padded"):
        trawl_groups(odd, "layer-mlp", "all")


# ---------------------------------------------------------------- modes
@pytest.mark.parametrize("decomposer", [TrawlCP(), TrawlTucker()])
def test_denoise_gives_dense_slices_of_the_reconstruction(decomposer):
    weights = mlp_weights()
    fact = decomposer.factorize(weights, {}, options(decomposer, ranks=[4], mode="denoise"), CTX)
    replacements = fact.materialize(4)
    assert all(isinstance(r, harness.Dense) for r in replacements.values())
    assert {n: tuple(r.weight.shape) for n, r in replacements.items()} == {
        n: tuple(w.shape) for n, w in weights.items()
    }
    assert fact.params(4) == fact.dense_params == 3 * FF * D
    full = fact.decomposition(4).full()
    assert torch.allclose(replacements["model.layers.0.mlp.down_proj"].weight, full[2].T)
    error = sum(((w - replacements[n].weight) ** 2).sum() for n, w in weights.items())
    assert error.item() == pytest.approx(fact.error(4), rel=1e-4)


@pytest.mark.parametrize(("decomposer", "extra"), [(TrawlCP(), {}), (TrawlTucker(), {"stack_rank": 2})])
def test_compress_modules_match_the_reconstruction_and_count_honestly(decomposer, extra):
    model = TinyLlama()
    names = [f"model.layers.1.mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj")]
    weights = {n: model.get_submodule(n).weight.detach() for n in names}
    fact = decomposer.factorize(weights, {}, options(decomposer, ranks=[2, 4], mode="compress", **extra), CTX)
    rank, S, m, n = 4, 3, FF, D
    formula = rank * (S + m + n) if decomposer.method == "cp" else S * 2 + 2 * rank**2 + rank * (m + n)
    assert fact.params(rank) == formula
    replacements = fact.materialize(rank)
    assert all(isinstance(r, StackSliceLinear) for r in replacements.values())
    full = fact.decomposition(rank).full().float()
    x = torch.randn(5, D)
    for s, name in enumerate(names):
        module = replacements[name]
        dense = full[s].T if name.endswith("down_proj") else full[s]
        inp = torch.randn(5, module.in_features)
        assert torch.allclose(module(inp), inp @ dense.T, atol=1e-5)
    assert sum(r.harness_params() for r in replacements.values()) == formula
    with replaced(model, replacements):
        assert model.get_submodule(names[0])(x).shape == (5, FF)
        params, nbytes = count_layers(model, names)
    assert (params, nbytes) == (formula, 4 * formula)


# ---------------------------------------------------------------- seeds and cache
def test_seeded_runs_are_identical_and_cached():
    weights = mlp_weights(seed=3)
    opts = options(TrawlCP, ranks=[3])
    clear_cache()
    first = TrawlCP().factorize(weights, {}, opts, CTX).decomposition(3)
    clear_cache()
    second_fact = TrawlCP().factorize(weights, {}, opts, CTX)
    second = second_fact.decomposition(3)
    assert torch.equal(first.left, second.left) and torch.equal(first.stack, second.stack)
    assert second_fact.decomposition(3) is second  # cached, not recomputed
    other_ctx = harness.FactorizeContext(seed=1, device=torch.device("cpu"))
    other = TrawlCP().factorize(weights, {}, opts, other_ctx).decomposition(3)
    assert not torch.equal(other.left, first.left)


def test_registered_through_the_hook():
    import harness_trawl

    plugins = Plugins(load_entry_points=False)
    plugins.register(harness_trawl, name="trawl")
    assert {"trawl-cp", "trawl-tucker"} <= set(plugins.names("decomposer"))
