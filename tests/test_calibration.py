"""Calibration statistics on a tiny random Llama (no download), checked against direct computations."""

from __future__ import annotations

import pytest
import torch

from harness import LayerStats
from harness.errors import HarnessError
from harness.run.calibration import cache_digest, collect_stats, load_or_collect
from harness.surgery import find_linears

SAMPLES, SEQLEN, BATCH = 5, 12, 2
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def layers(model):
    return find_linears(model)


@pytest.fixture(scope="module")
def batches():
    return torch.randint(0, 97, (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(1))


def capture(model, layers, batches, batch_size):
    """Inputs and outputs of every layer, captured by our own hooks, batch by batch."""
    seen = {layer.name: ([], []) for layer in layers}
    handles = []
    for layer in layers:

        def hook(module, inputs, output, name=layer.name):
            seen[name][0].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double())
            seen[name][1].append(output.detach().reshape(-1, output.shape[-1]).double())

        handles.append(model.get_submodule(layer.name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for chunk in batches.split(batch_size):
                model(input_ids=chunk)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (torch.cat(xs), torch.cat(ys)) for name, (xs, ys) in seen.items()}


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls, handle


def test_forward_stats_match_direct_computation(model, layers, batches):
    stats = collect_stats(model, layers, batches, {"gram", "abs_mean", "out_cov"}, CPU, BATCH, progress=False)
    direct = capture(model, layers, batches, BATCH)
    assert set(stats) == {layer.name for layer in layers}
    assert len(layers) == 2 * 7
    for layer in layers:
        X, Y = direct[layer.name]
        s = stats[layer.name]
        assert s.tokens == SAMPLES * SEQLEN == X.shape[0]
        assert s.gram.dtype == torch.float64 and s.gram.shape == (layer.shape[1],) * 2
        torch.testing.assert_close(s.gram, X.T @ X, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.abs_mean, X.abs().mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.sq_mean, X.square().mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.out_cov, Y.T @ Y, rtol=1e-10, atol=1e-10)
        assert s.fisher_in is None and s.fisher_out is None


def test_only_the_needed_kinds_are_filled(model, layers, batches):
    stats = collect_stats(model, layers, batches, {"abs_mean"}, CPU, BATCH, progress=False)
    s = stats[layers[0].name]
    assert s.abs_mean is not None and s.sq_mean is not None and s.tokens == SAMPLES * SEQLEN
    assert s.gram is None and s.out_cov is None and s.fisher_in is None
    stats = collect_stats(model, layers, batches, {"out_cov"}, CPU, BATCH, progress=False)
    s = stats[layers[0].name]
    assert s.out_cov is not None and s.tokens == SAMPLES * SEQLEN and s.sq_mean is None


def test_forward_stats_take_one_pass_and_skip_the_head(model, layers, batches):
    calls, handle = count_forwards(model)
    head_calls = []
    head = model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    try:
        collect_stats(model, layers, batches, {"gram", "out_cov"}, CPU, BATCH, progress=False)
    finally:
        handle.remove()
        head.remove()
    assert len(calls) == -(-SAMPLES // BATCH)
    assert not head_calls  # the forward stopped after the last target layer


def direct_fisher(model, layers, batches):
    weights = {layer.name: model.get_submodule(layer.name).weight for layer in layers}
    fin = {name: torch.zeros(w.shape[1], dtype=torch.float64) for name, w in weights.items()}
    fout = {name: torch.zeros(w.shape[0], dtype=torch.float64) for name, w in weights.items()}
    for window in batches.split(1):
        for w in weights.values():
            w.requires_grad_(True)
        loss = model(input_ids=window, labels=window).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        for (name, _), g in zip(weights.items(), grads, strict=True):
            fin[name] += g.double().square().sum(0)
            fout[name] += g.double().square().sum(1)
        for w in weights.values():
            w.requires_grad_(False)
    return fin, fout


def test_fisher_reductions_match_direct_computation_and_leave_no_grads(model, layers, batches):
    flags = [p.requires_grad for p in model.parameters()]
    calls, handle = count_forwards(model)
    try:
        stats = collect_stats(model, layers, batches, {"fisher", "gram"}, CPU, BATCH, progress=False)
    finally:
        handle.remove()
    assert len(calls) == SAMPLES  # fisher and gram in the same pass, one window at a time
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    fin, fout = direct_fisher(model, layers, batches)
    direct = capture(model, layers, batches, 1)
    for layer in layers:
        s = stats[layer.name]
        assert s.fisher_in.shape == (layer.shape[1],) and s.fisher_out.shape == (layer.shape[0],)
        assert float(s.fisher_in.sum()) > 0
        torch.testing.assert_close(s.fisher_in, fin[layer.name], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(s.fisher_out, fout[layer.name], rtol=1e-5, atol=1e-12)
        X, _ = direct[layer.name]
        torch.testing.assert_close(s.gram, X.T @ X, rtol=1e-6, atol=1e-8)


def test_fisher_restores_requires_grad_of_a_trainable_model(model, layers, batches):
    model.requires_grad_(True)
    try:
        collect_stats(model, layers[:2], batches[:1], {"fisher"}, CPU, progress=False)
        assert all(p.requires_grad for p in model.parameters())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.requires_grad_(False)


def test_unknown_kind_is_rejected(model, layers, batches):
    with pytest.raises(HarnessError, match="unknown calibration"):
        collect_stats(model, layers, batches, {"hessian"}, CPU, progress=False)


def test_disk_cache_round_trips_and_hits(model, layers, batches, tmp_path):
    key = {"model": "tiny-llama", "data": "abc", "samples": SAMPLES, "seqlen": SEQLEN}
    logs: list[str] = []

    def run(needs, key=key):
        calls, handle = count_forwards(model)
        try:
            out = load_or_collect(
                model, layers, batches, needs, key=key, cache_dir=tmp_path, device=CPU,
                batch_size=BATCH, log=logs.append, progress=False,
            )  # fmt: skip
        finally:
            handle.remove()
        return out, len(calls)

    first, passes = run({"gram", "abs_mean"})
    assert passes == 3 and not any("hit" in m for m in logs)
    folder = tmp_path / cache_digest(key, layers)
    assert {p.name for p in folder.iterdir()} == {"gram.pt", "abs_mean.pt", "key.json"}

    logs.clear()
    second, passes = run({"gram", "abs_mean"})
    assert passes == 0 and any("cache hit" in m for m in logs)
    for name in first:
        for field in ("gram", "abs_mean", "sq_mean"):
            assert torch.equal(getattr(first[name], field), getattr(second[name], field))
        assert second[name].tokens == first[name].tokens == SAMPLES * SEQLEN

    logs.clear()
    third, passes = run({"gram", "out_cov"})  # only out_cov is collected
    assert passes == 3
    assert any("cache hit: gram" in m for m in logs) and any("collecting out_cov" in m for m in logs)
    assert torch.equal(third[layers[0].name].gram, first[layers[0].name].gram)
    assert third[layers[0].name].out_cov is not None

    _, passes = run({"gram"}, key={**key, "samples": SAMPLES + 1})  # another key misses
    assert passes == 3


def test_unreadable_cache_file_is_a_miss(model, layers, batches, tmp_path):
    key = {"model": "tiny-llama"}
    folder = tmp_path / cache_digest(key, layers)
    folder.mkdir(parents=True)
    (folder / "gram.pt").write_bytes(b"not a torch file")
    logs: list[str] = []
    stats = load_or_collect(
        model, layers, batches, {"gram"}, key=key, cache_dir=tmp_path, device=CPU, log=logs.append, progress=False
    )
    assert isinstance(stats[layers[0].name], LayerStats) and stats[layers[0].name].gram is not None
    assert any("ignoring" in m for m in logs)
    assert torch.load(folder / "gram.pt", weights_only=True).keys() == stats.keys()


def test_cache_digest_is_canonical(layers):
    assert cache_digest({"a": 1, "b": [1, 2]}, layers) == cache_digest({"b": [1, 2], "a": 1}, layers)
    assert cache_digest({"a": 1}, layers) != cache_digest({"a": 1}, layers[:-1])
    assert cache_digest({"a": 1}, layers) != cache_digest({"a": 2}, layers)
