"""ZS-SVD (plugins/harness_zssvd): first-order scores, the zero-sum rule and the budget, on known answers.

The scores are checked against autograd through the singular values
themselves (W(sigma) = U diag(sigma) V^T L^-1, differentiated by torch, not
by the formula) and against the exact loss change of a linear loss, where a
first-order estimate is exact. The selection is checked step by step against
a linear scan of every matrix's next candidate, on planted scores whose
running sum returns exactly to zero, and on a planted model where the
gradient, not the singular values, says which components are harmless.
The ``grad`` statistic is checked against per-window autograd on a tiny Llama.
"""

from __future__ import annotations

import math
import random
import textwrap
from pathlib import Path

import pytest
import torch
from harness_zssvd import ZSSVD, ZSSVDAllocator, ZSSVDAllocatorOptions, ZSSVDOptions
from harness_zssvd.select import SCORES, zero_sum_select

import harness
from harness.run.allocate import recorded_info
from harness.suite import load_suite

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def inputs(tokens: int, n: int, seed: int) -> torch.Tensor:
    """Correlated, unevenly scaled calibration inputs (tokens, n)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (
        torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix * torch.logspace(-1, 1, n, dtype=torch.float64)
    )


def factorize(name: str, W: torch.Tensor, X: torch.Tensor, G: torch.Tensor) -> harness.Factorization:
    stats = harness.LayerStats(tokens=X.shape[0], gram=X.T @ X, grad=G)
    return ZSSVD().factorize_matrix(name, W, stats, ZSSVDOptions(), CTX)


# ---------------------------------------------------------------- the scores
def test_scores_are_minus_sigma_times_the_autograd_derivative_in_sigma():
    gen = torch.Generator().manual_seed(0)
    m, n = 12, 9
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    X = inputs(60, n, 1)
    target = torch.randn(60, m, generator=gen, dtype=torch.float64)

    def loss(weight):  # nonlinear: tanh of the outputs against a target
        return (torch.tanh(X @ weight.T) - target).square().mean()

    Wg = W.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(loss(Wg), Wg)
    fact = factorize("q", W, X, G)
    sigma = fact.s.clone().requires_grad_(True)
    rebuilt = fact.U @ torch.diag(sigma) @ fact.Vt @ fact.right  # W as a function of its whitened singular values
    torch.testing.assert_close(rebuilt.detach(), W, rtol=1e-9, atol=1e-9)
    (d_sigma,) = torch.autograd.grad(loss(rebuilt), sigma)
    expected = (-fact.s * d_sigma).tolist()
    assert fact.info[SCORES] == pytest.approx(expected, rel=1e-8, abs=1e-12)
    assert fact.info["predicted_change_total"] == pytest.approx(sum(expected), rel=1e-8, abs=1e-12)


def test_for_a_linear_loss_the_summed_scores_are_the_exact_change_of_every_truncation():
    gen = torch.Generator().manual_seed(2)
    m, n = 10, 7
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    C = torch.randn(m, n, generator=gen, dtype=torch.float64)  # L(W) = <C, W>: its gradient is C everywhere
    fact = factorize("o", W, inputs(50, n, 3), C)
    scores = fact.info[SCORES]
    for k in range(fact.full_rank + 1):
        low = fact.materialize(k)["o"]
        change = float((C * (low.A @ low.B)).sum() - (C * W).sum())
        assert change == pytest.approx(sum(scores[k:]), rel=1e-9, abs=1e-9)


def test_the_factors_are_svd_llms():
    from harness_svdllm import SVDLLM, SVDLLMOptions

    gen = torch.Generator().manual_seed(4)
    W = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    X = inputs(40, 6, 5)
    ours = factorize("k", W, X, torch.zeros_like(W))
    theirs = SVDLLM().factorize_matrix("k", W, harness.LayerStats(tokens=40, gram=X.T @ X), SVDLLMOptions(), CTX)
    for k in (1, 3, 6):
        assert ours.error(k) == pytest.approx(theirs.error(k), rel=1e-12)
        a, b = ours.materialize(k)["k"], theirs.materialize(k)["k"]
        torch.testing.assert_close(a.A @ a.B, b.A @ b.B, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the zero-sum rule
def planted(scores: list[list[float]], m: int = 100) -> list[harness.Factorization]:
    """Wide (m, r) factorizations whose info holds ``scores`` (largest singular value first):
    at m = 100 every rank below full saves, so each removal is one unit of a rank target."""
    facts = []
    for g, values in enumerate(scores):
        r = len(values)
        U = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64))[0]
        s = torch.linspace(r, 1, r, dtype=torch.float64)
        fact = harness.SVDLikeFactorization(f"layer{g}", U, s, torch.eye(r, dtype=torch.float64))
        fact.info[SCORES] = list(values)
        facts.append(fact)
    return facts


def test_planted_pairs_bring_the_running_sum_back_to_exactly_zero():
    # removal goes last component first: matrix 0 offers +9, +1, +2, +3; matrix 1 offers -9, -1, -2, -3
    facts = planted([[3.0, 2.0, 1.0, 9.0], [-3.0, -2.0, -1.0, -9.0]])
    ranks, steps = zero_sum_select(facts, [f.info[SCORES] for f in facts], [0, 0], harness.Target("rank", 0.25), 2)
    assert [(s.group, s.delta) for s in steps] == [(0, 9.0), (1, -9.0), (0, 1.0), (1, -1.0), (0, 2.0), (1, -2.0)]
    assert [s.total for s in steps] == [9.0, 0.0, 1.0, 0.0, 2.0, 0.0]
    assert ranks == [1, 1]


def test_the_rule_is_not_smallest_magnitude_first():
    # matrix 0 offers +0.25, +0.5, +0.5; matrix 1 offers -0.75, -1, +8. Smallest |change| first would take
    # 0.25, 0.5, 0.5 (sum 1.25); the zero-sum rule answers +0.25 with -0.75, then +0.5: exactly 0.
    facts = planted([[0.5, 0.5, 0.25], [8.0, -1.0, -0.75]])
    ranks, steps = zero_sum_select(facts, [f.info[SCORES] for f in facts], [0, 0], harness.Target("rank", 0.5), 2)
    assert [(s.group, s.delta, s.total) for s in steps] == [(0, 0.25, 0.25), (1, -0.75, -0.5), (0, 0.5, 0.0)]
    assert ranks == [1, 2]


def reference_choice(heads: dict[int, float], total: float) -> int:
    """The rule by a linear scan: opposite sign to the running sum (>= 0 when it is <= 0), smallest |delta|."""
    wanted = [g for g, d in heads.items() if (d >= 0) == (total <= 0)]
    pool = wanted or list(heads)
    return min(pool, key=lambda g: abs(heads[g]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_step_takes_what_the_rule_says_and_the_sum_stays_within_one_score(seed):
    rng = random.Random(seed)
    scores = [[rng.gauss(0, 1) * rng.choice([0.01, 1, 5]) for _ in range(rng.randint(3, 8))] for _ in range(9)]
    floors = [rng.randint(0, 2) for _ in scores]
    facts = planted(scores)
    ranks, steps = zero_sum_select(facts, scores, floors, harness.Target("rank", 0.45), 2)
    at = [len(s) for s in scores]
    total, largest = 0.0, 0.0
    for step in steps:
        heads = {g: scores[g][at[g] - 1] for g in range(len(scores)) if at[g] > floors[g]}
        assert step.group == reference_choice(heads, total)
        both_signs = any(d >= 0 for d in heads.values()) and any(d < 0 for d in heads.values())
        at[step.group] -= 1
        total += step.delta
        largest = max(largest, abs(step.delta))
        assert step.delta == scores[step.group][at[step.group]] and step.total == pytest.approx(total)
        if both_signs:
            assert abs(total) <= largest + 1e-12  # the zero-sum bound
    # every removal is a suffix of its matrix's components (smallest sigma first); an untouched matrix stays dense
    assert ranks == [None if k == len(s) else k for k, s in zip(at, scores, strict=True)]


def test_the_gradient_not_the_spectrum_decides_which_components_go():
    """Matrix 0 has every small singular value, but the loss rises by 1 with each of its components removed;
    matrix 1 has the large ones, and its components change the loss by +-2^-10 in alternation. Energy would cut
    matrix 0; the scores cut matrix 1 alone, and that is the allocation with the smallest true loss change
    (brute force over every pair of ranks that meets the budget exactly). The loss is linear, <C, W>: its first-order
    changes are exact, and C is planted through the whitened SVD computed here, not by the plugin."""
    gen = torch.Generator().manual_seed(7)
    m, n, eps = 64, 8, 2.0**-10
    X = torch.eye(n, dtype=torch.float64) * 3  # Gram 9 I: the whitened weight is 3 W
    weights = [torch.randn(m, n, generator=gen, dtype=torch.float64) * s for s in (0.1, 10.0)]
    wanted = [[1.0] * n, [eps if (n - 1 - i) % 2 == 0 else -eps for i in range(n)]]  # Delta L_i, largest sigma first
    slopes = []
    for W, deltas in zip(weights, wanted, strict=True):
        U, s, Vt = torch.linalg.svd(3 * W, full_matrices=False)
        c = -torch.tensor(deltas, dtype=torch.float64) / s  # Delta L_i = -sigma_i c_i with c_i = u_i^T C (3 I)^-1 v_i
        slopes.append(3 * U @ torch.diag(c) @ Vt)
    facts = [factorize(f"w{i}", W, X, C) for i, (W, C) in enumerate(zip(weights, slopes, strict=True))]
    assert float(facts[0].s[0]) < float(facts[1].s[-1])  # every sigma of matrix 0 is below matrix 1's
    target = harness.Target("rank", 0.75)  # 12 of 16: matrix 0 dense (8) leaves matrix 1 rank 4
    ctx = harness.AllocationContext(0, {}, log=lambda msg: None)
    ranks = ZSSVDAllocator().allocate(facts, target, ZSSVDAllocatorOptions(), ctx)

    def true_change(assignment):
        total = 0.0
        for fact, W, C, rank in zip(facts, weights, slopes, assignment, strict=True):
            if rank is not None:
                low = fact.materialize(rank)[fact.names[0]]
                total += float((C * (low.A @ low.B - W)).sum())
        return total

    choices = [*range(1, n), None]
    feasible = [[a, b] for a in choices for b in choices if target.fits(facts, [a, b], 2)]
    tight = max(target.assignment_cost(facts, p, 2) for p in feasible)  # remove no more than the budget asks
    best = min((p for p in feasible if target.assignment_cost(facts, p, 2) == tight), key=lambda p: abs(true_change(p)))
    assert ranks == best == [None, 4]
    assert abs(true_change(ranks)) < 1e-9


# ---------------------------------------------------------------- the budget
@pytest.mark.parametrize(
    "target",
    [
        harness.Target("params", 0.6),
        harness.Target("params", 0.85),
        harness.Target("rank", 0.5),
        harness.Target("bits", 9.0),
    ],
)
def test_the_allocation_meets_the_target_and_stops_at_the_first_step_that_does(target):
    gen = torch.Generator().manual_seed(11)
    facts = []
    for i, (m, n) in enumerate([(40, 24), (24, 40), (32, 32), (48, 16)]):
        W = torch.randn(m, n, generator=gen, dtype=torch.float64)
        facts.append(factorize(f"l{i}", W, inputs(80, n, i), torch.randn(m, n, generator=gen, dtype=torch.float64)))
    scores = [f.info[SCORES] for f in facts]
    ranks, steps = zero_sum_select(facts, scores, [1] * 4, target, 2)
    assert target.fits(facts, ranks, 2)
    assert ranks == ZSSVDAllocator().allocate(
        facts, target, ZSSVDAllocatorOptions(), harness.AllocationContext(0, {}, log=lambda m: None)
    )
    assert all(r is None or harness.saves(f, r) for f, r in zip(facts, ranks, strict=True))
    # one step fewer (the last component put back) does not meet the target
    last = steps[-1].group
    back = [f.full_rank if r is None else r for f, r in zip(facts, ranks, strict=True)]
    back[last] += 1
    before = [r if harness.saves(f, r) else None for f, r in zip(facts, back, strict=True)]
    assert not target.fits(facts, before, 2)


def test_floors_over_budget_and_missing_scores_are_one_line_errors():
    facts = planted([[1.0, -1.0, 2.0], [0.5, 0.25, -2.0]])
    ctx = harness.AllocationContext(0, {}, log=lambda m: None)
    with pytest.raises(harness.HarnessError, match="floor rank") as info:
        ZSSVDAllocator().allocate(facts, harness.Target("rank", 0.2), ZSSVDAllocatorOptions(min_rank=2), ctx)
    assert "\n" not in str(info.value)
    del facts[1].info[SCORES]
    with pytest.raises(harness.HarnessError, match="'zs-svd' method"):
        ZSSVDAllocator().allocate(facts, harness.Target("rank", 0.8), ZSSVDAllocatorOptions(), ctx)


def test_keep_rank_ratio_floors_at_a_fraction_of_break_even():
    facts = planted([[0.1] * 6, [0.2] * 6])  # (100, 6): break-even rank 5
    ctx = harness.AllocationContext(0, {}, log=lambda m: None)
    options = ZSSVDAllocatorOptions(keep_rank_ratio=0.5)  # floor ceil(2.5) = 3
    ranks = ZSSVDAllocator().allocate(facts, harness.Target("rank", 0.5), options, ctx)
    assert ranks == [3, 3]


def test_scores_travel_with_the_factorization_but_stay_out_of_the_record():
    (fact,) = planted([[1.0, 2.0]])
    kept = fact.compact(1)
    assert kept.info[SCORES] == [1.0, 2.0]
    assert SCORES not in recorded_info(fact.info) and recorded_info({"jitter": 0.0}) == {"jitter": 0.0}


# ---------------------------------------------------------------- the grad statistic
def test_grad_statistic_is_the_mean_window_gradient_and_shares_fishers_pass():
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.run.calibration import collect_stats
    from harness.surgery import find_linears

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    layers = find_linears(model)
    batches = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, layers, batches, {"grad", "fisher"}, torch.device("cpu"), progress=False)
    weights = [model.get_submodule(layer.name).weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    per_window = [torch.autograd.grad(model(input_ids=b, labels=b).loss, weights) for b in batches.split(1)]
    for w in weights:
        w.requires_grad_(False)
    for i, layer in enumerate(layers):
        mean = sum(g[i].double() for g in per_window) / len(per_window)
        squares = sum(g[i].double().square().sum(0) for g in per_window)
        assert stats[layer.name].grad.dtype == torch.float32 and stats[layer.name].grad.shape == layer.shape
        torch.testing.assert_close(stats[layer.name].grad.double(), mean, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(stats[layer.name].fisher_in, squares, rtol=1e-5, atol=1e-12)
    assert all(w.grad is None and not w.requires_grad for w in weights)


# ---------------------------------------------------------------- suites
def suite_text(model: str = "random:tiny-llama", allocator: str = '"zs-svd"', extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        name = "zs"
        device = "cpu"
        dtype = "float32"
        models = ["{model}"]
        targets = [0.8]
        allocators = [{allocator}]
        {extra}
        [calibration]
        samples = 4
        seqlen = 64
        batch_size = 4
        [[methods]]
        name = "zs-svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ source = "wiki-passages", seqlen = 32, max_windows = 2 }}
        """
    )


def run_cells(tmp_path: Path, text: str) -> list[dict]:
    from harness.run.runner import RunOptions, run_suite

    path = tmp_path / "zs.toml"
    path.write_text(text)
    run_suite(load_suite(path), RunOptions(results_root=tmp_path / "r", progress=False, limit=2))
    return harness.read_results(tmp_path / "r" / "zs")


def check_cells(records: list[dict]) -> None:
    assert all(r["status"] == "ok" for r in records) and len(records) == 2
    (cell,) = [r for r in records if r["method"]]
    assert cell["method"]["needs"] and set(cell["method"]["needs"]) == {"gram", "grad"}
    assert cell["factorization_info"] and all(SCORES not in info for info in cell["factorization_info"].values())
    ranks = [r for r in cell["ranks"].values() if r is not None]
    assert ranks and len(set(ranks)) > 1  # heterogeneous ranks from one global rule
    assert cell["sizes"]["model_params"] < next(r for r in records if not r["method"])["sizes"]["model_params"]
    assert [v for k, v in cell["metrics"].items() if "perplexity" in k and math.isfinite(v) and v > 1]


def test_end_to_end_on_a_tiny_model_gives_ok_cells(tmp_path: Path):
    check_cells(run_cells(tmp_path, suite_text()))


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path: Path):
    check_cells(run_cells(tmp_path, suite_text(model="embedded")))


@pytest.mark.parametrize(
    ("allocator", "extra", "expected"),
    [
        ('{ name = "zs-svd", options = { min_rank = -1 } }', "", "min_rank: expected a rank >= 0, got -1"),
        (
            '{ name = "zs-svd", options = { keep_rank_ratio = 1.5 } }',
            "",
            "keep_rank_ratio: expected a number in [0, 1]",
        ),
        ('"zs-svd"', 'offload = "cpu"', "without the grad statistic under offload"),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path: Path, allocator, extra, expected):
    path = tmp_path / "bad.toml"
    path.write_text(suite_text(allocator=allocator, extra=extra))
    with pytest.raises(harness.HarnessError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message and "bad.toml" in message and expected in message
