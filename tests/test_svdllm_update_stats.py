"""SVD-LLM's v1 step 2 (whitening on the original inputs, left factor on the propagated ones) and the
``gram_original`` statistic the core collects for it.

References computed here independently: least squares by ``torch.linalg.lstsq``
on the token matrices, output errors on the tokens, Grams from
``collect_stats`` on the uncompressed model (tests/test_calibration.py checks
it against hand sums).
"""

from __future__ import annotations

import pytest
import torch
from harness_svdllm import SVDLLM

from harness.api import FactorizeContext, LayerStats
from harness.options import parse_options
from harness.run.calibration import collect_stats, load_or_collect
from harness.run.runner import RunOptions, SuiteRunner
from harness.suite import load_suite
from tests.conftest import write_suite
from tests.test_svdllm_update import TOKENS, K, N, lstsq_left, out_error, planted, whitening_factors

CPU = torch.device("cpu")
CTX = FactorizeContext(seed=0, device=CPU, log=lambda _: None)


def factorize(W, G, original, **options):
    stats = LayerStats(tokens=TOKENS, gram=G, gram_original=original)
    return SVDLLM().factorize_matrix("w", W, stats, parse_options(SVDLLM.Options, options, "m"), CTX)


# ---------------------------------------------------------------- the decomposer on two Grams
def test_closed_form_is_the_least_squares_left_factor_of_the_original_whitening():
    W, X, Xp = planted(6)
    fact = factorize(W, Xp.T @ Xp, X.T @ X, update="closed-form")
    for k in (1, K, 7, N):
        _, B = whitening_factors(W, X.T @ X, k)  # step 1's right factor, on the uncompressed model's inputs
        got = fact.materialize(k)["w"]
        expect = lstsq_left(W, B, Xp) @ B  # brute-force least squares on the propagated tokens
        assert torch.allclose(got.A @ got.B, expect, atol=1e-8), k
        assert fact.error(k) == pytest.approx(out_error(W, got.A, got.B, Xp), rel=1e-7, abs=1e-9)


def test_closed_form_objective_between_whitening_on_either_gram():
    """On X': no worse than step 1 alone (whitening on X, what update = "none" computes on original inputs),
    never better than whitening on X' itself (the rank-k optimum of that objective)."""
    W, X, Xp = planted(7)
    fact = factorize(W, Xp.T @ Xp, X.T @ X, update="closed-form")
    for k in (1, K, 7):
        got = fact.materialize(k)["w"]
        updated = out_error(W, got.A, got.B, Xp)
        step1 = out_error(W, *whitening_factors(W, X.T @ X, k), Xp)
        best = out_error(W, *whitening_factors(W, Xp.T @ Xp, k), Xp)
        assert best - 1e-9 <= updated < step1, k


def test_closed_form_on_one_gram_is_whitening_bitwise():
    """Original inputs: gram_original IS gram, and the update on the whitening's own Gram is the identity."""
    W, X, _ = planted(8)
    G = X.T @ X
    for original in (G, None):
        closed, none = factorize(W, G, original, update="closed-form"), factorize(W, G, None)
        assert torch.equal(closed.s, none.s) and torch.equal(closed.U, none.U)
    # a copy of G (the first block under propagated inputs) runs the update: the same product, to round-off
    closed = factorize(W, G, G.clone(), update="closed-form").materialize(K)["w"]
    A, B = whitening_factors(W, G, K)
    assert torch.allclose(closed.A @ closed.B, A @ B, atol=1e-9)


def test_needs_for_asks_gram_original_only_for_the_closed_form():
    opts = lambda **o: parse_options(SVDLLM.Options, o, "m")  # noqa: E731
    assert SVDLLM().needs_for(opts()) == {"gram"} == SVDLLM().needs_for(opts(update="direct"))
    assert SVDLLM().needs_for(opts(update="closed-form")) == {"gram", "gram_original"} == SVDLLM.needs


# ---------------------------------------------------------------- the core statistic
def test_original_inputs_serve_gram_original_as_grams_own_tensor(tmp_path):
    from harness.surgery import find_linears
    from tests.test_svdllm_update_lora import tiny_llama

    model = tiny_llama()
    layers = find_linears(model)
    ids = torch.randint(0, 48, (4, 8), generator=torch.Generator().manual_seed(0))
    got = collect_stats(model, layers, ids, {"gram_original"}, CPU, batch_size=2, progress=False)
    plain = collect_stats(model, layers, ids, {"gram"}, CPU, batch_size=2, progress=False)
    for layer in layers:
        assert got[layer.name].gram_original is got[layer.name].gram
        assert torch.equal(got[layer.name].gram_original, plain[layer.name].gram)
    cached = load_or_collect(
        model,
        layers,
        ids,
        {"gram", "gram_original"},
        key={"k": 1},
        cache_dir=tmp_path,
        device=CPU,
        log=lambda _: None,
        progress=False,
    )
    assert all(s.gram_original is s.gram for s in cached.values())
    assert sorted(p.name for p in tmp_path.rglob("*.pt")) == ["gram.pt"]  # cached once, as gram


SUITE = """
    name = "two"
    device = "cpu"
    models = ["{model}"]
    targets = [{{rank = 0.5}}]
    allocators = ["uniform"]
    [[methods]]
    name = "svd-llm"
    [[methods]]
    name = "svd-llm"
    label = "cf"
    options = {{ update = "closed-form" }}
    [calibration]
    samples = 5
    seqlen = 24
    batch_size = 2
    inputs = "propagated"
    """


def test_propagated_pass_gives_closed_form_the_uncompressed_models_gram(tmp_path, tiny_model_dir, monkeypatch):
    suite = load_suite(write_suite(tmp_path / "two.toml", SUITE.format(model=tiny_model_dir)))
    session = SuiteRunner(suite, RunOptions(tmp_path / "r", progress=False)).open_session(str(tiny_model_dir))
    seen: dict[tuple[str, str], LayerStats] = {}
    real = SVDLLM.factorize_matrix

    def spy(self, name, weight, stats, options, ctx):
        seen[options.update, name] = stats
        return real(self, name, weight, stats, options, ctx)

    monkeypatch.setattr(SVDLLM, "factorize_matrix", spy)
    cells = session.cells()[1:]
    session.prepared.expect(suite.methods, cells)
    for cell in cells:
        session.prepared.factorize_cell(cell)
    model, layers = session.loaded.model, session.layers
    original = collect_stats(model, layers, session.prepared.batches(), {"gram"}, CPU, batch_size=2, progress=False)
    for layer in layers:
        cf, none = seen["closed-form", layer.name], seen["none", layer.name]
        assert none.gram_original is None  # update = "none" does not ask for it: no extra stream for it
        assert torch.equal(cf.gram_original, original[layer.name].gram)  # bitwise the whole-model path's
        if ".layers.0." in layer.name:  # block 0: the captured inputs, the same for both
            assert torch.equal(cf.gram, cf.gram_original)
        else:  # later: the compressed model's inputs
            assert (cf.gram - cf.gram_original).abs().max() > 1e-3 * cf.gram_original.abs().max(), layer.name
        # the streams agree to round-off: at block 0 the update ran on two equal Grams (the identity)
        torch.testing.assert_close(cf.gram, none.gram, rtol=1e-4, atol=1e-6 * float(none.gram.abs().max()))
