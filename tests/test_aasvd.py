"""AA-SVD (plugins/harness_aasvd): the anchored, shift-aware objective on planted data, the core's
``anchor_cross`` statistic under propagated inputs, and cells end to end.

The objective is checked against answers computed another way: the optimum of
min ||W X^T - W' X'^T|| from a QR of the raw shifted inputs (no Gram, no
Cholesky), and the objective evaluated on the raw inputs themselves."""

from __future__ import annotations

import math

import pytest
import torch
from harness_aasvd import AASVD, AASVDOptions
from harness_svdllm import SVDLLM, SVDLLMOptions

import harness
from harness.plugins import get_plugins
from harness.run.calibration import collect_stats
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from harness.surgery import replaced, weights_of
from tests.conftest import write_suite
from tests.test_pipeline_propagated import hand_compressed_block0, open_session

M, N, T = 20, 12, 300
NAME = "model.layers.1.self_attn.q_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(shift: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (M, N), original inputs X (T, N), correlated and unevenly scaled, and shifted inputs X' = X A + E:
    a planted linear distortion plus noise, what upstream compression does to a layer's inputs."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=gen, dtype=torch.float64)
    mix = torch.randn(N, N, generator=gen, dtype=torch.float64)
    X = torch.randn(T, N, generator=gen, dtype=torch.float64) @ mix * torch.logspace(-1, 1, N, dtype=torch.float64)
    distortion = torch.eye(N, dtype=torch.float64) + shift * torch.randn(N, N, generator=gen, dtype=torch.float64)
    noise = shift * X.std() * torch.randn(T, N, generator=gen, dtype=torch.float64)
    return W, X, X @ distortion + noise


def aasvd(W, X, Xs, **options) -> harness.Factorization:
    stats = harness.LayerStats(tokens=T, gram=Xs.T @ Xs, anchor_cross=X.T @ Xs)
    return AASVD().factorize_matrix(NAME, W, stats, AASVDOptions(**options), CTX)


def svdllm(W, X) -> harness.Factorization:
    return SVDLLM().factorize_matrix(NAME, W, harness.LayerStats(tokens=T, gram=X.T @ X), SVDLLMOptions(), CTX)


def product(fact: harness.Factorization, rank: int) -> torch.Tensor:
    low = fact.materialize(rank)[NAME]
    return low.A.double() @ low.B.double()


def anchored(W, X, Xs, W2) -> float:
    """AA-SVD's objective on the raw inputs: ||W X^T - W' X'^T||_F^2."""
    return float((W @ X.T - W2 @ Xs.T).square().sum())


def optimum(W, X, Xs, rank: int) -> torch.Tensor:
    """The rank-k minimizer from a QR of X' (T, N) = Q R: ||W X^T - W' R^T Q^T|| is, up to a constant,
    ||W X^T Q - W' R^T||, so W' R^T is the truncated SVD of W X^T Q (Eckart-Young)."""
    Q, R = torch.linalg.qr(Xs)
    U, s, Vt = torch.linalg.svd(W @ X.T @ Q, full_matrices=False)
    Z = U[:, :rank] * s[:rank] @ Vt[:rank]
    return torch.linalg.solve_triangular(R, Z.T, upper=True).T  # Z R^-T


# ---------------------------------------------------------------- the objective on planted data
def test_factors_are_the_closed_form_optimum_and_error_is_the_removable_part():
    W, X, Xs = planted()
    fact = aasvd(W, X, Xs)
    floor = anchored(W, X, Xs, product(fact, N))  # full rank: only what no W' removes is left
    assert floor > 1e-3 * anchored(W, X, Xs, torch.zeros_like(W))  # the planted shift is not removable
    for rank in (1, 3, 6, 9, N):
        best = anchored(W, X, Xs, optimum(W, X, Xs, rank))
        got = anchored(W, X, Xs, product(fact, rank))
        assert got == pytest.approx(best, rel=1e-9)
        assert got - floor == pytest.approx(fact.error(rank), rel=1e-7, abs=1e-9 * floor)
    assert fact.info["shifted"] and fact.info["jitter"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_worse_than_svd_llm_on_either_gram_and_better_under_a_shift(seed):
    W, X, Xs = planted(seed=seed)
    fact, on_original, on_shifted = aasvd(W, X, Xs), svdllm(W, X), svdllm(W, Xs)
    gains = []
    for rank in range(1, N):
        ours = anchored(W, X, Xs, product(fact, rank))
        for other in (on_original, on_shifted):
            theirs = anchored(W, X, Xs, product(other, rank))
            assert ours <= theirs * (1 + 1e-9)
            gains.append(theirs - ours)
    assert max(gains) > 1e-2 * anchored(W, X, Xs, torch.zeros_like(W))


def test_without_a_shift_it_is_svd_llm_bit_for_bit():
    W, X, _ = planted()
    gram = X.T @ X
    theirs = svdllm(W, X)
    for cross in (gram, gram.clone()):  # the core hands the Gram itself; equal entries count the same
        stats = harness.LayerStats(tokens=T, gram=gram, anchor_cross=cross)
        ours = AASVD().factorize_matrix(NAME, W, stats, AASVDOptions(), CTX)
        assert not ours.info["shifted"]
        for rank in (2, 7):
            a, b = ours.materialize(rank)[NAME], theirs.materialize(rank)[NAME]
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
            assert ours.error(rank) == theirs.error(rank)


def test_a_singular_shifted_gram_gets_jitter_and_stays_finite():
    W, X, Xs = planted()
    Xs[:, -2:] = 0  # two dead channels downstream of compression
    logged = []
    ctx = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=logged.append)
    stats = harness.LayerStats(tokens=T, gram=Xs.T @ Xs, anchor_cross=X.T @ Xs)
    fact = AASVD().factorize_matrix(NAME, W, stats, AASVDOptions(), ctx)
    assert fact.info["jitter"] > 0 and any("not positive definite" in m for m in logged)
    assert torch.isfinite(product(fact, 5)).all()


def test_missing_statistics_and_bad_options_are_one_line_errors():
    W, _, _ = planted()
    with pytest.raises(harness.HarnessError, match="anchor_cross"):
        AASVD().factorize_matrix(NAME, W, harness.LayerStats(tokens=T, gram=torch.eye(N)), AASVDOptions(), CTX)
    with pytest.raises(ValueError, match=r"jitter_eps: expected a positive number, got 0.0"):
        AASVDOptions(jitter_eps=0.0)
    assert "anchor_cross" in harness.STAT_KINDS and AASVD.needs == {"gram", "anchor_cross"}


# ---------------------------------------------------------------- the core's anchor_cross
def layer_inputs(model, names, batches) -> dict[str, torch.Tensor]:
    """Each layer's inputs (tokens, n) for ``batches`` through ``model`` as it is now."""
    seen: dict[str, list] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, args, out, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            for chunk in batches.split(2):
                model(input_ids=chunk, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def test_propagated_anchor_cross_is_original_against_shifted_inputs(tmp_path, tiny_model_dir):
    # the whole block at once (``sequential = false``): block 1's X' carries block 0's shift alone
    options = {"aa-svd": "{ sequential = false }"}
    suite, session = open_session(tmp_path, tiny_model_dir, methods=["aa-svd"], options=options)
    (cell,) = session.cells()[1:]
    session.prepared.expect(suite.methods, [cell])
    facts, _ = session.prepared.factorize_cell(cell)
    job = session.prepared.blocks._streams[cell.id]
    model, layers, batches = session.loaded.model, session.layers, session.prepared.batches()
    # block 0 sees no shift: aa-svd is svd-llm there, so svd-llm's hand compression is the pass's
    replacements, _ = hand_compressed_block0(session)
    second = [x.name for x in layers if ".layers.1." in x.name]
    original = layer_inputs(model, second, batches)
    with replaced(model, replacements):
        shifted = layer_inputs(model, second, batches)
        hand = collect_stats(model, [x for x in layers if x.name in second], batches, {"gram"}, "cpu", 2, False)
    index = {group[0]: i for i, group in enumerate(job.groups)}
    decomposer = get_plugins().get("decomposer", "aa-svd")
    for name in second:
        X, Xs = original[name], shifted[name]
        assert (X - Xs).abs().max() > 1e-3  # block 1's inputs are shifted
        stats = harness.LayerStats(tokens=X.shape[0], gram=hand[name].gram, anchor_cross=X.T @ Xs)
        together = decomposer.Options(sequential=False)
        expected = decomposer.factorize(weights_of(model, [name]), {name: stats}, together, CTX)
        piped = facts[index[name]]
        assert piped.info["shifted"]
        rank = max(1, round(0.5 * min(dict((x.name, x.shape) for x in layers)[name])))
        ((a,),), ((b,),) = [piped.materialize(rank).values()], [expected.materialize(rank).values()]
        scale = (b.A @ b.B).abs().max()
        torch.testing.assert_close(a.A @ a.B, b.A @ b.B, rtol=1e-4, atol=1e-5 * scale)


def suite_text(inputs: str) -> str:
    return f"""
        name = "aa"
        device = "cpu"
        dtype = "float32"
        models = ["embedded"]
        targets = [0.9]
        [[methods]]
        name = "aa-svd"
        [[methods]]
        name = "svd-llm"
        [[evaluators]]
        name = "perplexity"
        options = {{ source = "wiki-passages", seqlen = 32, max_windows = 2 }}
        [calibration]
        samples = 2
        seqlen = 32
        batch_size = 2
        pipeline = "blocks"
        inputs = "{inputs}"
        """


@pytest.mark.slow
def test_end_to_end_cells_on_the_embedded_model(tmp_path):
    """Original inputs: aa-svd's cell is svd-llm's (same perplexity); propagated: its own, finite, cell."""
    perplexity = {}
    for inputs in ("original", "propagated"):
        path = write_suite(tmp_path / f"{inputs}.toml", suite_text(inputs))
        root = tmp_path / inputs
        run_suite(load_suite(path), RunOptions(results_root=root, progress=False, limit=3))
        records = [r for r in harness.read_results(root / "aa") if r["method"]]
        assert len(records) == 2 and all(r["status"] == "ok" for r in records), records
        for r in records:
            (value,) = [v for k, v in r["metrics"].items() if "perplexity" in k]
            assert math.isfinite(value) and value > 1
            perplexity[inputs, r["method"]["name"]] = value
    assert perplexity["original", "aa-svd"] == perplexity["original", "svd-llm"]
    assert perplexity["propagated", "aa-svd"] != perplexity["propagated", "svd-llm"]
