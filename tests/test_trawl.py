"""TRAWL (trawl-cp, trawl-tucker, trawl-validation): planted tensors recovered, stacking, groupings (per
layer, across the model, per third), both modes, seeds, the rank chosen on held-out data, a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
from harness_trawl import TrawlCP, TrawlTucker
from harness_trawl.decompose import cp_stack, tucker_stack
from harness_trawl.factorization import StackSliceLinear, clear_cache
from harness_trawl.stacking import stack, thirds, trawl_groups, unstack
from harness_trawl.validation import TrawlValidation
from torch import nn

import harness
from harness.options import parse_options
from harness.surgery import count_layers, find_linears, replaced

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
D, KV, FF = 8, 4, 12  # hidden, GQA key/value width, MLP width


class Block(nn.Module):
    def __init__(self, kv: int = KV) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for kind, (m, n) in {"q_proj": (D, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, D)}.items():
            setattr(self.self_attn, kind, nn.Linear(n, m, bias=False))
        self.mlp = nn.Module()
        for kind, (m, n) in {"gate_proj": (FF, D), "up_proj": (FF, D), "down_proj": (D, FF)}.items():
            setattr(self.mlp, kind, nn.Linear(n, m, bias=False))


class TinyLlama(nn.Module):
    """Llama-shaped Linear layers (GQA attention, gated MLP), 3 layers."""

    def __init__(self, n_layers: int = 3, kv: int = KV) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block(kv) for _ in range(n_layers)])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


def reconstruct(d) -> torch.Tensor:
    """The model written out from the factors: CP T_s = L diag(a_s) R^T; Tucker T_s = L (sum_t U_st G_t) R^T."""
    if d.core is None:
        return torch.einsum("sr,mr,nr->smn", d.stack, d.left, d.right)
    return torch.einsum("st,tij,mi,nj->smn", d.stack, d.core, d.left, d.right)


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


def test_cp_factors_solve_their_least_squares_subproblems():
    """ALS's fixed point, checked without tensorly: with the other two factors fixed, each CP factor is the
    least-squares solution of its unfolding, T_(1) = L (A kr R)^T etc. (kr: Khatri-Rao), solved here."""
    weights = mlp_weights(seed=2)
    opts = options(TrawlCP, ranks=[3], dtype="float64", n_iter_max=3000, tol=1e-16)
    clear_cache()
    d = TrawlCP().factorize(weights, {}, opts, CTX).decomposition(3)
    T = stack(weights, torch.float64)
    S, m, n = T.shape
    A, L, R = d.stack, d.left, d.right

    def solve(unfolded, left, right):  # argmin_F || unfolded - F (left kr right)^T ||
        kr = torch.einsum("ar,br->abr", left, right).reshape(-1, left.shape[1])
        return torch.linalg.lstsq(kr, unfolded.T).solution.T

    for factor, unfolded, (p, q) in (
        (L, T.permute(1, 0, 2).reshape(m, S * n), (A, R)),
        (R, T.permute(2, 0, 1).reshape(n, S * m), (A, L)),
        (A, T.reshape(S, m * n), (L, R)),
    ):
        torch.testing.assert_close(factor, solve(unfolded, p, q), rtol=1e-4, atol=1e-6 * float(factor.abs().max()))
    residual = float((T - reconstruct(d)).square().sum())
    assert d.sq_error == pytest.approx(residual, rel=1e-9)
    assert d.rel_error == pytest.approx(math.sqrt(residual) / float(T.norm()), rel=1e-9)
    for s in range(S):
        torch.testing.assert_close(d.slice(s), reconstruct(d)[s])


def test_tucker_core_is_the_projection_on_orthonormal_factors():
    """HOOI keeps orthonormal factors, and the least-squares core given them is T x_1 U^T x_2 L^T x_3 R^T."""
    weights = mlp_weights(seed=4)
    opts = options(TrawlTucker, ranks=[3], stack_rank=2, dtype="float64", n_iter_max=50, tol=1e-12)
    d = TrawlTucker().factorize(weights, {}, opts, CTX).decomposition(3)
    T = stack(weights, torch.float64)
    for factor in (d.stack, d.left, d.right):
        torch.testing.assert_close(factor.T @ factor, torch.eye(factor.shape[1], dtype=torch.float64))
    core = torch.einsum("smn,st,mi,nj->tij", T, d.stack, d.left, d.right)
    torch.testing.assert_close(d.core, core, rtol=1e-6, atol=1e-9)
    residual = float((T - reconstruct(d)).square().sum())
    assert d.sq_error == pytest.approx(residual, rel=1e-9)
    assert d.rel_error == pytest.approx(math.sqrt(residual) / float(T.norm()), rel=1e-9)
    for s in range(T.shape[0]):
        torch.testing.assert_close(d.slice(s), reconstruct(d)[s])


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
    full = reconstruct(fact.decomposition(4))
    for s, name in enumerate(weights):  # slices [gate, up, down^T]
        expected = full[s].T if name.endswith("down_proj") else full[s]
        assert torch.allclose(replacements[name].weight, expected, atol=1e-6)
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
    full = reconstruct(fact.decomposition(rank)).float()
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


# ---------------------------------------------------------------- across the model, per third
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def names(layer_range, kinds, part):
    return tuple(f"model.layers.{i}.{part}.{k}" for i in layer_range for k in kinds)


def test_qkvo_across_the_model_is_one_4L_stack_without_gqa():
    layers = find_linears(TinyLlama(n_layers=3, kv=D))
    (group,) = trawl_groups(layers, "model-attn", "all")
    assert group == names(range(3), ATTN, "self_attn")  # 4L = 12 matrices, layer by layer
    model = TinyLlama(n_layers=3, kv=D)
    weights = {n: model.get_submodule(n).weight.detach() for n in group}
    assert stack(weights).shape == (12, D, D)


def test_qkvo_across_the_model_with_gqa_stacks_same_shapes_only():
    layers = find_linears(TinyLlama(n_layers=3))
    assert trawl_groups(layers, "model-attn", "all") == [
        names(range(3), ("q_proj", "o_proj"), "self_attn"),  # [2L, d, d]
        names(range(3), ("k_proj", "v_proj"), "self_attn"),  # [2L, d_kv, d]
    ]


def test_fc_across_the_model_is_one_stack_of_gate_up_down_transposed():
    model = TinyLlama(n_layers=3)
    (group,) = trawl_groups(find_linears(model), "model-mlp", "all")
    assert group == names(range(3), MLP, "mlp")
    weights = {n: model.get_submodule(n).weight.detach() for n in group}
    tensor = stack(weights)
    assert tensor.shape == (9, FF, D)
    assert torch.equal(tensor[5], model.get_submodule("model.layers.1.mlp.down_proj").weight.T)


@pytest.mark.parametrize(
    ("n_layers", "sizes"), [(28, [10, 9, 9]), (12, [4, 4, 4]), (7, [3, 2, 2]), (3, [1, 1, 1]), (2, [1, 1, 0])]
)
def test_thirds_are_contiguous_and_cover_the_model(n_layers, sizes):
    segments = thirds(n_layers)
    assert [len(s) for s in segments] == sizes
    assert [i for s in segments for i in s] == list(range(n_layers))
    if n_layers == 28:  # the authors' GPT-J split: range(10), range(10, 19), range(19, 28)
        assert segments == [range(0, 10), range(10, 19), range(19, 28)]


def test_thirds_groupings_stack_each_third():
    layers = find_linears(TinyLlama(n_layers=7))
    assert trawl_groups(layers, "thirds-mlp", "all") == [
        names(range(0, 3), MLP, "mlp"),
        names(range(3, 5), MLP, "mlp"),
        names(range(5, 7), MLP, "mlp"),
    ]
    attn = trawl_groups(layers, "thirds-attn", "all")
    assert attn[:2] == [
        names(range(0, 3), ("q_proj", "o_proj"), "self_attn"),
        names(range(0, 3), ("k_proj", "v_proj"), "self_attn"),
    ]
    assert len(attn) == 6
    # the paper's "last third" alone: thirds are of the model; ``layers`` keeps only the last one's members
    assert trawl_groups(layers, "thirds-mlp", "last:2") == [names(range(5, 7), MLP, "mlp")]
    # a selection that cuts a third keeps the selected members of it
    assert trawl_groups(layers, "thirds-mlp", [1, 2, 3]) == [names(range(1, 3), MLP, "mlp"), names([3], MLP, "mlp")]


def test_planted_cp_structure_across_the_model_is_recovered_by_the_4L_stack():
    """Slice s of the [4L, d, d] stack = B diag(a_s) C^T (CP rank 3): the decomposition of the QKVO stack
    recovers every q, k, v, o weight (dense slices of the reconstruction, the paper's use)."""
    L, R = 3, 3
    layers = find_linears(TinyLlama(n_layers=L, kv=D))
    (group,) = trawl_groups(layers, "model-attn", "all")
    gen = torch.Generator().manual_seed(4)
    A, B, C = (torch.randn(k, R, generator=gen, dtype=torch.float64) for k in (4 * L, D, D))
    planted = {name: B @ torch.diag(A[s]) @ C.T for s, name in enumerate(group)}
    opts = options(TrawlCP, by="model-attn", ranks=[R], dtype="float64", n_iter_max=1000, tol=1e-14)
    clear_cache()
    fact = TrawlCP().factorize(planted, {}, opts, CTX)
    assert fact.stack_shape == (4 * L, D, D)
    assert fact.decomposition(R).rel_error < 1e-6  # exact CP rank 3: recovered to 1e-6 relative
    replacements = fact.materialize(R)
    scale = max(w.abs().max() for w in planted.values())
    for name, weight in planted.items():
        assert torch.allclose(replacements[name].weight, weight, atol=1e-5 * scale), name
    assert fact.error(R) <= 1e-10 * sum(float(w.square().sum()) for w in planted.values())


# ---------------------------------------------------------------- rank chosen on held-out data
def allocation_ctx(losses, calls):
    def loss(assignment):
        calls.append(tuple(assignment))
        return losses[assignment[0]]

    return harness.AllocationContext(seed=0, layers={}, calibration_loss=loss, log=lambda msg: None)


def trawl_facts(n=2, ranks=(2, 4, 8)):
    return [
        TrawlCP().factorize(mlp_weights(layer=i, seed=i), {}, options(TrawlCP, ranks=list(ranks)), CTX)
        for i in range(n)
    ]


def test_validation_allocator_picks_the_rank_with_the_lowest_held_out_loss():
    facts = trawl_facts()
    calls = []
    ctx = allocation_ctx({2: 3.0, 4: 2.5, 8: 2.7}, calls)
    opts = parse_options(TrawlValidation.Options, {}, "allocator")
    assert TrawlValidation().allocate(facts, harness.Target("params", 1.0), opts, ctx) == [4, 4]
    assert calls == [(2, 2), (4, 4), (8, 8)]  # one loss pass per candidate, every group at that rank
    tie = allocation_ctx({2: 1.0, 4: 1.0, 8: 1.0}, [])
    assert TrawlValidation().allocate(facts, harness.Target("params", 1.0), opts, tie) == [2, 2]  # ties: smaller
    only = parse_options(TrawlValidation.Options, {"ranks": [8]}, "allocator")
    keep_all = harness.Target("params", 1.0)
    assert TrawlValidation().allocate(facts, keep_all, only, allocation_ctx({8: 9.0}, [])) == [8, 8]


def test_validation_allocator_keeps_to_the_target_and_refuses_what_it_cannot_do():
    opts = parse_options(TrawlValidation.Options, {}, "allocator")
    compress = [TrawlCP().factorize(mlp_weights(seed=1), {}, options(TrawlCP, ranks=[1, 2, 8], mode="compress"), CTX)]
    budget = harness.Target("params", compress[0].factor_params(2) / compress[0].dense_params)
    calls = []
    ctx = allocation_ctx({1: 5.0, 2: 4.0, 8: 1.0}, calls)
    assert TrawlValidation().allocate(compress, budget, opts, ctx) == [2]  # rank 8 is over the budget: not measured
    assert calls == [(1,), (2,)]
    with pytest.raises(harness.HarnessError, match="no calibration data"):
        no_data = harness.AllocationContext(seed=0, layers={})
        TrawlValidation().allocate(trawl_facts(), harness.Target("params", 1.0), opts, no_data)
    with pytest.raises(harness.HarnessError, match="not offered"):
        bad = parse_options(TrawlValidation.Options, {"ranks": [3]}, "allocator")
        TrawlValidation().allocate(trawl_facts(), harness.Target("params", 1.0), bad, allocation_ctx({}, []))


def test_a_tiny_run_with_model_stacks_and_the_validation_allocator(tiny_model_dir, tmp_path):
    from harness.run.runner import RunOptions, run_suite
    from harness.suite import load_suite
    from tests.conftest import write_suite

    text = f"""
        name = "trawl-tiny"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        [[methods]]
        name = "trawl-cp"
        options = {{ by = "model-mlp", ranks = [2, 4], n_iter_max = 20 }}
        targets = [1.0]
        allocators = [{{ name = "trawl-validation" }}]
        [[methods]]
        name = "trawl-tucker"
        options = {{ by = "thirds-attn", ranks = [2], n_iter_max = 5 }}
        targets = [{{ rank = 0.99 }}]
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 2 }}
        [calibration]
        samples = 3
        seqlen = 16
        loss_samples = 2
        """
    suite = load_suite(write_suite(tmp_path / "trawl.toml", text))
    summary = run_suite(suite, RunOptions(tmp_path / "results", progress=False))
    assert not summary.failed, [r.error for r in summary.failed]
    cells = {r.method["name"]: r for r in summary.results if r.method}
    cp = cells["trawl-cp"]
    assert set(cp.ranks.values()) <= {2, 4} and len(set(cp.ranks.values())) == 1  # one rank for the whole stack
    assert len(cp.ranks) == 6  # gate, up, down of both layers: one [3L, d_ff, d] stack
    (info,) = cp.factorization_info.values()
    assert info["grouping"] == "model-mlp" and info["stack_shape"] == [6, 160, 64]
    tucker = cells["trawl-tucker"]
    assert len(tucker.factorization_info) == 4  # 2 layers in thirds of 1, 1, 0: [q, o] and [k, v] per third
