"""SVD-LLM V2 (plugins/harness_svdllm_v2): loss-optimized truncation and the per-type ratio rule, on known answers.

The decomposer's error at rank k is checked against the tail of the singular
values of the calibration outputs C = W X^T (the paper's theoretical minimum,
Eckart-Young on C), against those of a Cholesky-whitened weight, and against
||(W - A B) X^T||_F^2 computed from the materialized factors. The allocator is
checked against the paper's formula written out by hand on planted flat
spectra, where every loss is a closed form.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from harness_svdllm import SVDLLM, SVDLLMOptions
from harness_svdllm_v2 import SVDLLMV2, SVDLLMV2Allocator, SVDLLMV2AllocatorOptions, SVDLLMV2Options
from harness_svdllm_v2.allocate import inverse_log_scores

import harness
from harness.suite import load_suite

M, N, T = 24, 16, 200
NAME = "model.layers.0.self_attn.q_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(tokens: int = T, dead: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W (M, N) and inputs X (tokens, N), correlated and unevenly scaled; the last ``dead`` channels are zero."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=gen, dtype=torch.float64)
    mix = torch.randn(N, N, generator=gen, dtype=torch.float64)
    X = (
        torch.randn(tokens, N, generator=gen, dtype=torch.float64)
        @ mix
        * torch.logspace(-1.5, 1.5, N, dtype=torch.float64)
    )
    if dead:
        X[:, N - dead :] = 0
    return W, X


def factorize(W: torch.Tensor, X: torch.Tensor, **options) -> harness.Factorization:
    stats = harness.LayerStats(tokens=X.shape[0], gram=X.T @ X)
    return SVDLLMV2().factorize_matrix(NAME, W, stats, SVDLLMV2Options(**options), CTX)


def output_error(fact: harness.Factorization, W: torch.Tensor, X: torch.Tensor, rank: int) -> float:
    low = fact.materialize(rank)[NAME]
    return float(((W - low.A.double() @ low.B.double()) @ X.T).square().sum())


def tail(values: torch.Tensor, k: int) -> float:
    return float(values[k:].square().sum())


# ---------------------------------------------------------------- the decomposer
def test_truncation_loss_is_the_discarded_whitened_spectrum_and_the_output_error():
    W, X = planted()
    fact = factorize(W, X)
    outputs = torch.linalg.svdvals(W @ X.T)  # the theoretical minimum: Eckart-Young on C = W X^T
    whitened = torch.linalg.svdvals(W @ torch.linalg.cholesky(X.T @ X))  # SVD-LLM's whitened weight
    assert fact.info["gram_rank"] == N
    total = tail(outputs, 0)
    for k in range(N + 1):
        expected = tail(outputs, k)
        assert fact.error(k) == pytest.approx(expected, rel=1e-7, abs=1e-9 * total)
        assert tail(whitened, k) == pytest.approx(expected, rel=1e-7, abs=1e-9 * total)
        assert output_error(fact, W, X, k) == pytest.approx(expected, rel=1e-7, abs=1e-9 * total)


def test_eigendecomposition_whitening_works_where_cholesky_fails():
    """Six tokens and two dead channels: the Gram has rank 6 of 16, Cholesky fails, V2 stays exact."""
    W, X = planted(tokens=6, dead=2)
    gram = X.T @ X
    assert torch.linalg.cholesky_ex(gram).info.item() > 0  # not positive definite
    fact = factorize(W, X)
    assert fact.info["gram_rank"] == 6
    outputs = torch.linalg.svdvals(W @ X.T)
    total = tail(outputs, 0)
    for k in range(7):
        low = fact.materialize(k)[NAME]
        assert torch.isfinite(low.A).all() and torch.isfinite(low.B).all()
        expected = tail(outputs, k)
        assert fact.error(k) == pytest.approx(expected, rel=1e-7, abs=1e-9 * total)
        assert output_error(fact, W, X, k) == pytest.approx(expected, rel=1e-7, abs=1e-9 * total)
    assert output_error(fact, W, X, 6) <= 1e-9 * total  # rank 6 reproduces every calibration output
    # SVD-LLM needs jitter here, and its objective is then that of G + jitter I
    v1 = SVDLLM().factorize_matrix(NAME, W, harness.LayerStats(tokens=6, gram=gram), SVDLLMOptions(), CTX)
    assert v1.info["jitter"] > 0


def test_float32_second_svd_and_rcond_are_options():
    W, X = planted()
    exact = factorize(W, X)
    single = factorize(W, X, dtype="float32")
    assert single.error(8) == pytest.approx(exact.error(8), rel=1e-3)
    # rcond just below 1 keeps only the top eigen-direction of the Gram
    assert factorize(W, X, rcond=0.999999).info["gram_rank"] == 1


# ---------------------------------------------------------------- the allocator
def flat(name: str, m: int, n: int, level: float) -> harness.SVDLikeFactorization:
    """A factorization with every singular value equal to ``level``: error(k) = (r - k) level^2."""
    r = min(m, n)
    s = torch.full((r,), float(level), dtype=torch.float64)
    U = torch.eye(m, r, dtype=torch.float64)
    Vt = torch.eye(r, n, dtype=torch.float64)
    return harness.SVDLikeFactorization(name, U, s, Vt, out_dtype=torch.float64)


def layer_infos(facts) -> dict[str, harness.LayerInfo]:
    infos = {}
    for fact in facts:
        name = fact.names[0]
        infos[name] = harness.LayerInfo(name, name.rsplit(".", 1)[-1], int(name.split(".")[2]), fact.shapes[0])
    return infos


def allocate(facts, target, **options) -> tuple[list[int | None], list[str]]:
    logged: list[str] = []
    ctx = harness.AllocationContext(seed=0, layers=layer_infos(facts), dtype_bytes=2, log=logged.append)
    ranks = SVDLLMV2Allocator().allocate(facts, target, SVDLLMV2AllocatorOptions(**options), ctx)
    return ranks, logged


def paper_ranks(m: int, n: int, levels: list[float], keep: float) -> list[int]:
    """Algorithm 1 by hand on flat spectra of equal shapes: L_i = c_i sqrt(r - k_u), r_i = N R s_i / sum s."""
    r, R = min(m, n), 1 - keep
    uniform = math.floor(keep * m * n / (m + n))
    scores = [1 / math.log(c * math.sqrt(r - uniform)) for c in levels]
    removed = [len(levels) * R * s / sum(scores) for s in scores]
    return [math.floor((1 - x) * m * n / (m + n)) for x in removed]


Q_LEVELS = [10.0, 100.0, 1e3, 1e4]
UP_LEVELS = [3e4, 50.0, 7e2, 5.0]


def two_types() -> list[harness.Factorization]:
    q = [flat(f"model.layers.{i}.self_attn.q_proj", 32, 32, c) for i, c in enumerate(Q_LEVELS)]
    up = [flat(f"model.layers.{i}.mlp.up_proj", 64, 16, c) for i, c in enumerate(UP_LEVELS)]
    return q + up


def test_allocation_follows_the_papers_formula_and_keeps_each_types_budget():
    facts = two_types()
    keep = 0.6
    ranks, logged = allocate(facts, harness.Target("params", keep))
    assert ranks[:4] == paper_ranks(32, 32, Q_LEVELS, keep) == [5, 9, 11, 12]
    assert ranks[4:] == paper_ranks(64, 16, UP_LEVELS, keep)
    for members in (range(0, 4), range(4, 8)):  # each type within its own budget, short of it by < 1 rank each
        group = [facts[i] for i in members]
        dense = sum(f.dense_params for f in group)
        kept = sum(f.params(ranks[i]) for f, i in zip(group, members, strict=True))
        assert keep * dense - sum(sum(f.shapes[0]) for f in group) < kept <= keep * dense
    # the larger a matrix's loss at the uniform ratio, the more of it is kept
    for members, levels in ((range(0, 4), Q_LEVELS), (range(4, 8), UP_LEVELS)):
        by_loss = sorted(members, key=lambda i: levels[i - members[0]])
        assert [ranks[i] for i in by_loss] == sorted(ranks[i] for i in by_loss)
    assert len(logged) == 2 and all("rescaled" not in line for line in logged)


def test_allocation_lowers_the_largest_truncation_loss_of_a_type():
    """The paper's Figure 3: against uniform ratios, the largest losses fall (a few small ones rise)."""
    facts = two_types()[:4]
    ranks, _ = allocate(facts, harness.Target("params", 0.6))
    uniform = harness.keep_fraction(facts, 0.6)
    losses = [f.error(r) for f, r in zip(facts, ranks, strict=True)]
    before = [f.error(r) for f, r in zip(facts, uniform, strict=True)]
    assert max(losses) < max(before)
    assert sum(math.sqrt(x) for x in losses) < sum(math.sqrt(x) for x in before)


def test_equal_losses_give_svd_llms_uniform_ranks():
    facts = [flat(f"model.layers.{i}.self_attn.q_proj", 32, 32, 50.0) for i in range(4)]
    for keep in (0.3, 0.6, 0.9):
        ranks, _ = allocate(facts, harness.Target("params", keep))
        assert ranks == harness.keep_fraction(facts, keep)


def test_small_and_zero_losses_are_rescaled_and_the_target_still_fits():
    """Losses below e make 1/ln L negative or infinite: the rule rescales them, and zero counts as the least."""
    scores, scale = inverse_log_scores([0.0, 0.01, 0.1, 1.0])
    assert scale == pytest.approx(math.e / 0.01)
    assert scores[0] == scores[1] == pytest.approx(1.0) and all(s > 0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert inverse_log_scores([5.0, 50.0]) == ([1 / math.log(5.0), 1 / math.log(50.0)], 1.0)
    facts = [flat(f"model.layers.{i}.mlp.up_proj", 64, 16, c) for i, c in enumerate([1e-4, 1e-3, 1e-2, 0.1])]
    target = harness.Target("params", 0.5)
    ranks, logged = allocate(facts, target)
    assert target.fits(facts, ranks, 2)
    assert any("rescaled" in line for line in logged)


@pytest.mark.parametrize("target", [{"rank": 0.5}, {"bytes": 6000}, {"bits": 6.0}, 0.1])
def test_other_target_kinds_and_floors_are_met(target):
    facts = two_types()
    parsed = (
        harness.Target(*next(iter(target.items()))) if isinstance(target, dict) else harness.Target("params", target)
    )
    ranks, _ = allocate(facts, parsed)
    assert parsed.fits(facts, ranks, 2)
    assert all(r is None or (r >= 1 and harness.saves(f, r)) for f, r in zip(facts, ranks, strict=True))


def test_a_floor_over_budget_is_a_one_line_error():
    facts = two_types()
    with pytest.raises(harness.HarnessError, match="min_rank") as info:
        allocate(facts, harness.Target("params", 0.05), min_rank=8)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- suites
def suite_text(method_options: str = "", allocator: str = '"svd-llm-v2"') -> str:
    return textwrap.dedent(
        f"""
        name = "v2"
        device = "cpu"
        dtype = "float32"
        models = ["random:tiny-llama"]
        targets = [0.8]
        allocators = [{allocator}]
        [calibration]
        samples = 4
        seqlen = 64
        batch_size = 4
        [[methods]]
        name = "svd-llm-v2"
        {method_options}
        [[evaluators]]
        name = "perplexity"
        options = {{ source = "wiki-passages", seqlen = 32, max_windows = 2 }}
        """
    )


def test_end_to_end_on_a_tiny_model_gives_ok_cells(tmp_path: Path):
    from harness.run.runner import RunOptions, run_suite

    path = tmp_path / "v2.toml"
    path.write_text(suite_text())
    summary = run_suite(load_suite(path), RunOptions(results_root=tmp_path / "r", progress=False, limit=2))
    records = harness.read_results(tmp_path / "r" / "v2")
    cells = [r for r in records if r["method"] and r["method"]["name"] == "svd-llm-v2"]
    assert summary.computed == len(records) == 2 and len(cells) == 1  # the baseline and one compressed cell
    assert all(r["status"] == "ok" for r in records)
    (cell,) = cells
    assert cell["allocator"]["name"] == "svd-llm-v2" and cell["factorization_info"]
    assert sum(r for r in cell["ranks"].values() if r) > 0 and None not in cell["ranks"].values()
    assert [v for k, v in cell["metrics"].items() if "perplexity" in k and math.isfinite(v) and v > 1]


@pytest.mark.parametrize(
    ("method_options", "allocator", "expected"),
    [
        ("options = { rcond = -1.0 }", '"svd-llm-v2"', "rcond: expected a number in [0, 1), got -1.0"),
        ('options = { rcond = "small" }', '"svd-llm-v2"', "rcond"),
        ('options = { dtype = "float16" }', '"svd-llm-v2"', "dtype"),
        ("options = { jitter_eps = 1e-6 }", '"svd-llm-v2"', "unknown option"),
        ("", '{ name = "svd-llm-v2", options = { min_rank = -2 } }', "min_rank: expected a rank >= 0, got -2"),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path: Path, method_options, allocator, expected):
    path = tmp_path / "bad.toml"
    path.write_text(suite_text(method_options, allocator))
    with pytest.raises(harness.HarnessError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message and "bad.toml" in message and expected in message
