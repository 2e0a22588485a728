"""Basis Sharing (harness_basis_sharing) on planted data with known answers, and through the runner.

The references here are independent of the plugin's Cholesky + stacked SVD:
the pooled whitened objective is evaluated as sum_i tr(E_i G E_i^T) straight
from the Gram, and its optimum from an eigendecomposition of G^1/2 (sum_i
W_i^T W_i) G^1/2 with the symmetric square root of G.
"""

from __future__ import annotations

import gc

import pytest
import torch
from harness_basis_sharing import BasisSharing, BasisSharingOptions
from harness_basis_sharing.grouping import share_groups

import harness
from harness.errors import HarnessError
from harness.run import pipeline
from harness.run.calibration import collect_stats
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from harness.surgery import count_model, find_linears
from tests.conftest import write_suite

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
M, N, T = 12, 10, 80
DECOMPOSER = BasisSharing()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def names(count: int, kind: str = "q_proj") -> list[str]:
    return [f"model.layers.{i}.self_attn.{kind}" for i in range(count)]


def inputs(gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Calibration inputs (T, N) with correlated, unevenly scaled channels."""
    mix = torch.randn(N, N, generator=gen, dtype=torch.float64)
    return torch.randn(T, N, generator=gen, dtype=torch.float64) @ mix * torch.logspace(-1, 1, N) * scale


def planted_group(count: int, rank: int | None, seed: int = 0):
    """``count`` weights W_i = C_i B with one shared B (rank, N) (None: full rank, no shared structure),
    each layer with its own inputs; returns weights, stats and the inputs."""
    gen = torch.Generator().manual_seed(seed)
    B = None if rank is None else torch.randn(rank, N, generator=gen, dtype=torch.float64)
    weights, stats, xs = {}, {}, {}
    for i, name in enumerate(names(count)):
        if B is None:
            W = torch.randn(M, N, generator=gen, dtype=torch.float64)
        else:
            W = torch.randn(M, rank, generator=gen, dtype=torch.float64) @ B
        X = inputs(gen, scale=1.0 + i)
        weights[name], xs[name] = W, X
        stats[name] = harness.LayerStats(tokens=T, gram=X.T @ X)
    return weights, stats, xs


def factorize(weights, stats, **options):
    return DECOMPOSER.factorize(weights, stats, BasisSharingOptions(**options), CTX)


def products(fact, rank: int) -> dict[str, torch.Tensor]:
    """Each layer's dense weight as its replacement module computes it (module applied to the identity)."""
    eye = torch.eye(fact.shapes[0][1], dtype=torch.float64)
    return {name: module(eye).T for name, module in fact.materialize(rank).items()}


def pooled_objective(weights, approx, gram) -> float:
    """sum_i tr((W_i - What_i) G (W_i - What_i)^T), from the pooled Gram directly."""
    return sum(float(torch.trace((weights[n] - approx[n]) @ gram @ (weights[n] - approx[n]).T)) for n in weights)


def sym_sqrt(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(gram)
    return vectors @ torch.diag(values.sqrt()) @ vectors.T, vectors @ torch.diag(values.rsqrt()) @ vectors.T


def optimal_tail(weights, gram) -> list[float]:
    """The minimum of the pooled objective at each rank k: the discarded eigenvalues of
    R (sum_i W_i^T W_i) R with R = G^1/2 (a shared row space of dimension k is the best k-subspace)."""
    root, _ = sym_sqrt(gram)
    stacked = sum(w.T @ w for w in weights.values())
    values = torch.linalg.eigvalsh(root @ stacked @ root).flip(0).clamp_min(0)
    return [float(values[k:].sum()) for k in range(len(values) + 1)]


# ---------------------------------------------------------------- planted structure
def test_a_planted_shared_basis_is_recovered_exactly_at_its_rank():
    r = 4
    weights, stats, _ = planted_group(3, r)
    fact = factorize(weights, stats)
    assert fact.names == tuple(names(3)) and fact.full_rank == N  # min(3 M, N)
    assert fact.error(r) <= 1e-20 * fact.error(0) and fact.error(r - 1) > 1e-6 * fact.error(0)
    for name, approx in products(fact, r).items():
        torch.testing.assert_close(approx, weights[name], rtol=0, atol=1e-9)
    # the kept basis spans the planted row space: stacked with the planted B it has rank r, not 2 r
    basis = fact.materialize(r)[names(3)[0]].basis.detach()
    gen = torch.Generator().manual_seed(0)
    planted_B = torch.randn(r, N, generator=gen, dtype=torch.float64)
    assert torch.linalg.matrix_rank(torch.cat([basis, planted_B]), rtol=1e-9) == r


def test_error_is_the_pooled_whitened_objective_and_its_optimum_at_every_rank():
    weights, stats, _ = planted_group(3, None, seed=1)
    fact = factorize(weights, stats)
    gram = sum(s.gram for s in stats.values())
    best = optimal_tail(weights, gram)
    for k in (0, 1, 3, 6, N):
        measured = pooled_objective(weights, products(fact, k), gram)
        assert fact.error(k) == pytest.approx(measured, rel=1e-8, abs=1e-8 * best[0])
        assert fact.error(k) == pytest.approx(best[k], rel=1e-8, abs=1e-8 * best[0])


def test_sharing_a_basis_never_beats_private_bases_on_the_pooled_objective():
    """A shared basis is a constrained private one: the per-layer optimum under the same Gram is no worse."""
    weights, stats, _ = planted_group(2, None, seed=2)
    gram = sum(s.gram for s in stats.values())
    shared = factorize(weights, stats)
    pooled = {n: harness.LayerStats(tokens=T, gram=gram) for n in weights}
    private = [factorize({n: w}, {n: pooled[n]}) for n, w in weights.items()]
    for k in (2, 5):
        assert sum(f.error(k) for f in private) <= shared.error(k) * (1 + 1e-9)


# ---------------------------------------------------------------- parameter accounting
def test_params_count_the_shared_basis_once_plus_each_layers_coefficients():
    weights, stats, _ = planted_group(3, None, seed=3)
    fact = factorize(weights, stats)
    for k in (1, 4, 7):
        by_hand = k * N + 3 * (M * k)  # basis (k x N) once, three coefficient matrices (M x k)
        assert fact.params(k) == by_hand
        modules = fact.materialize(k)
        assert sum(m.harness_params() for m in modules.values()) == by_hand
        assert count_model(torch.nn.ModuleList(modules.values()))[0] == by_hand
        bases = {id(m.basis) for m in modules.values()}
        assert len(bases) == 1 and [m.owner for m in modules.values()] == [True, False, False]
    assert fact.dense_params == 3 * M * N
    assert fact.saving_rank == (3 * M * N - 1) // (N + 3 * M)  # the largest k with k (N + 3 M) < 3 M N


def test_compact_keeps_errors_params_and_products_and_refuses_ranks_beyond():
    weights, stats, _ = planted_group(2, None, seed=4)
    fact = factorize(weights, stats)
    kept = fact.compact(5, dtype=torch.float64, device="cpu")
    assert kept.stored_rank == 5 and list(kept.ranks) == list(fact.ranks)
    assert [kept.error(k) for k in fact.ranks] == [fact.error(k) for k in fact.ranks]
    assert [kept.params(k) for k in fact.ranks] == [fact.params(k) for k in fact.ranks]
    for k in (1, 5):
        for name, approx in products(kept, k).items():
            assert torch.equal(approx, products(fact, k)[name])
    with pytest.raises(ValueError, match="beyond the 5 ranks"):
        kept.materialize(6)


# ---------------------------------------------------------------- group size 1 is SVD-LLM
def test_group_size_one_is_the_closed_form_whitened_svd():
    weights, stats, xs = planted_group(1, None, seed=5)
    ((name, W),) = weights.items()
    groups = DECOMPOSER.groups(
        [harness.LayerInfo(n, "q_proj", i, (M, N)) for i, n in enumerate(names(3))], BasisSharingOptions(group_size=1)
    )
    assert groups == [(n,) for n in names(3)]
    fact = factorize(weights, stats, group_size=1)
    gram = stats[name].gram
    root, root_inv = sym_sqrt(gram)
    U, s, Vt = torch.linalg.svd(W @ root, full_matrices=False)
    for k in (1, 4, 8):
        closed = (U[:, :k] * s[:k]) @ Vt[:k] @ root_inv  # argmin ||(W - What) X^T||_F over rank k
        torch.testing.assert_close(products(fact, k)[name], closed, rtol=0, atol=1e-9)
        output_error = float(((W - closed) @ xs[name].T).square().sum())
        assert fact.error(k) == pytest.approx(output_error, rel=1e-9)
        assert fact.params(k) == harness.lowrank_params(M, N, k)


# ---------------------------------------------------------------- groups
def llama_layers(count: int) -> list[harness.LayerInfo]:
    kinds = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8)}
    kinds |= {"gate_proj": (16, 8), "up_proj": (16, 8), "down_proj": (8, 16)}
    part = {k: "self_attn" if k in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for k in kinds}
    return [
        harness.LayerInfo(f"model.layers.{i}.{part[k]}.{k}", k, i, shape)
        for i in range(count)
        for k, shape in kinds.items()
    ]


def test_groups_are_consecutive_layers_of_the_shared_kinds_and_the_rest_alone():
    layers = llama_layers(5)
    groups = share_groups(layers, 2, None)
    q = [g for g in groups if g[0].endswith("q_proj")]
    assert q == [tuple(f"model.layers.{i}.self_attn.q_proj" for i in pair) for pair in ((0, 1), (2, 3), (4,))]
    assert all(len(g) == 1 for g in groups if g[0].endswith(("o_proj", "down_proj")))
    assert sorted(n for g in groups for n in g) == sorted(layer.name for layer in layers)  # a partition
    assert len(groups) == 2 * 5 + 5 * 3  # o and down: 5 layers alone each; q, k, v, gate, up: 3 groups each
    only_up = share_groups(layers, 5, ["up_proj"])
    assert [g for g in only_up if len(g) > 1] == [tuple(f"model.layers.{i}.mlp.up_proj" for i in range(5))]


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    "options, expected",
    [
        ("group_size = 0", "group_size: expected an integer of at least 1, got 0"),
        ('group_size = "two"', "group_size: expected an integer"),
        ('share = "q_proj"', "share: expected a list of a string or nothing"),
        ('share = ["q_proj", "q_proj"]', "share: expected each kind once"),
        ('dtype = "float16"', "dtype: expected 'float32' or 'float64'"),
        ("jitter_eps = 0", "jitter_eps: expected a positive number, got 0"),
        ("groupsize = 2", "unknown option (did you mean 'group_size'?)"),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path, options, expected):
    path = write_suite(
        tmp_path / "bad.toml",
        f"""
        name = "bad"
        models = ["embedded"]
        targets = [0.8]
        [[methods]]
        name = "basis-sharing"
        options = {{ {options} }}
        """,
    )
    with pytest.raises(HarnessError) as err:
        load_suite(path)
    message = str(err.value)
    assert expected in message and "bad.toml" in message and "\n" not in message, message


def test_a_kind_the_model_lacks_is_one_line_naming_the_kinds_it_has():
    with pytest.raises(HarnessError) as err:
        share_groups(llama_layers(2), 2, ["q_proj", "c_attn"])
    message = str(err.value)
    assert "share" in message and "'c_attn'" in message and "q_proj" in message and "\n" not in message


# ---------------------------------------------------------------- in the layer-sequential pipeline
@pytest.fixture(scope="module")
def four_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    batches = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(2))
    return model, batches


def pipelined(model, layers, batches, options):
    """Factorize every group in the layer-sequential pass; (factorizations, peak statistics bytes, order)."""
    order, tracker = [], pipeline.LiveStats()
    groups = DECOMPOSER.groups(layers, options)
    weights = {layer.name: model.get_submodule(layer.name).weight.detach() for layer in layers}

    def run(group, stats):
        order.append(tuple(group))
        return DECOMPOSER.factorize({n: weights[n] for n in group}, stats, options, CTX)

    job = pipeline.Job("basis-sharing", DECOMPOSER.needs, groups, run)
    pipeline.run_blocks(model, layers, batches, [job], device=CTX.device, batch_size=2, progress=False, tracker=tracker)
    assert job.error is None
    gc.collect()
    return job.factorizations, tracker.peak, order, groups


def test_groups_spanning_blocks_match_the_whole_model_statistics_and_hold_only_their_group(four_blocks):
    model, batches = four_blocks
    layers = find_linears(model)
    options = BasisSharingOptions(group_size=2)
    facts, peak, order, groups = pipelined(model, layers, batches, options)
    whole = collect_stats(model, layers, batches, {"gram"}, CTX.device, batch_size=2, progress=False)
    weights = {layer.name: model.get_submodule(layer.name).weight.detach() for layer in layers}
    for group, fact in zip(groups, facts, strict=True):
        reference = DECOMPOSER.factorize({n: weights[n] for n in group}, whole, options, CTX)
        assert fact.names == group and fact.error(3) == reference.error(3)
        for name, module in fact.materialize(3).items():
            other = reference.materialize(3)[name]
            assert torch.equal(module.coeff, other.coeff) and torch.equal(module.basis, other.basis)
    # a pair over blocks (0, 1) is factorized once block 1 is done, before any group of block 2
    pair = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    first_of_block2 = min(i for i, g in enumerate(order) if g[0].startswith("model.layers.2."))
    assert order.index(pair) < first_of_block2
    # statistics alive: the pass holds at most two blocks' worth for pairs (one block for singletons),
    # against every block's at once for one group over all four layers
    _, peak_single, _, _ = pipelined(model, layers, batches, BasisSharingOptions(group_size=1))
    _, peak_all, _, _ = pipelined(model, layers, batches, BasisSharingOptions(group_size=4))
    assert peak_single < peak <= 2 * peak_single < peak_all


# ---------------------------------------------------------------- end to end
def test_a_tiny_run_gives_ok_cells_with_the_groups_parameters(tiny_model_dir, tmp_path):
    records = {}
    for mode in ("blocks", "whole"):
        path = write_suite(
            tmp_path / f"{mode}.toml",
            f"""
            name = "bs"
            device = "cpu"
            models = ["{tiny_model_dir}"]
            targets = [0.8, 0.6]
            [[methods]]
            name = "basis-sharing"
            [[evaluators]]
            name = "perplexity"
            options = {{ seqlen = 16, max_windows = 2 }}
            [calibration]
            samples = 5
            seqlen = 24
            batch_size = 2
            pipeline = "{mode}"
            """,
        )
        summary = run_suite(load_suite(path), RunOptions(tmp_path / mode, progress=False, limit=4))
        assert not summary.failed and summary.computed == 3, [r.error for r in summary.failed]
        records[mode] = {r.cell_id: r for r in summary.results}
    assert records["blocks"].keys() == records["whole"].keys()
    for cell_id, record in records["blocks"].items():
        assert record.status == "ok" and record.metrics == records["whole"][cell_id].metrics
    baseline = next(r for r in records["blocks"].values() if r.method is None)
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    layers = find_linears(harness_model(tiny_model_dir))
    shapes = {layer.name: layer.shape for layer in layers}
    for record in (r for r in records["blocks"].values() if r.method is not None):
        assert record.ranks[q0] == record.ranks[q1] is not None  # one group, one rank
        keep = record.target["value"]
        expected = baseline.sizes["model_params"] - baseline.sizes["dense_decomposable_params"]
        for group in share_groups(layers, 2, None):
            m, n = shapes[group[0]]
            rank = record.ranks[group[0]]
            by_hand = rank * n + len(group) * rank * m
            assert by_hand <= keep * len(group) * m * n < (rank + 1) * n + len(group) * (rank + 1) * m
            expected += by_hand
        assert record.sizes["model_params"] == expected


def harness_model(model_dir):
    from harness.models import load_model

    return load_model(str(model_dir), "float32", "cpu").model
