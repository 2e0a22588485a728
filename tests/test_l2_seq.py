"""The ``l2_seq`` calibration statistic (BitStack's per-sequence L2 norm) and bitstack's ``statistic`` option.

The statistic is checked against the inputs a plain forward hook records (the repo's formula,
``torch.norm(x, dim=1).mean(dim=0)`` on (sequences, seqlen, n)), on both calibration paths, and
the block pipeline's tensors bitwise against the whole-model pass's.
"""

from __future__ import annotations

import pytest
import torch
from harness_bitstack import BitStack
from harness_bitstack.decompose import activation_scales

import harness
from harness.options import options_dict, parse_options
from harness.run import pipeline
from harness.run.calibration import collect_stats
from harness.surgery import find_linears

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    from harness.models import load_model

    model = load_model("random:tiny-llama", "float32", "cpu").model
    batches = torch.randint(0, 4096, (5, 16), generator=torch.Generator().manual_seed(0))  # batches of 2, 2, 1
    return model, find_linears(model), batches


def hooked_inputs(model, name: str, batches: torch.Tensor) -> torch.Tensor:
    """The layer's inputs (sequences, seqlen, n) in float64, recorded by a plain forward hook."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].double()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    return seen[0]


def blockwise(model, layers, batches, needs):
    got = {}
    job = pipeline.Job("x", frozenset(needs), [[x.name] for x in layers], lambda group, stats: got.update(stats))
    pipeline.run_blocks(model, layers, batches, [job], device=CPU, batch_size=2, progress=False)
    assert job.error is None
    return got


def test_l2_seq_is_the_mean_per_sequence_norm_on_both_paths(tiny):
    model, layers, batches = tiny
    whole = collect_stats(model, layers, batches, {"l2_seq"}, CPU, batch_size=2, progress=False)
    blocks = blockwise(model, layers, batches, {"l2_seq"})
    for layer in layers:
        assert blocks[layer.name].sequences == whole[layer.name].sequences == batches.shape[0]
        assert torch.equal(blocks[layer.name].l2_seq, whole[layer.name].l2_seq), layer.name
    for name in (layers[0].name, layers[6].name):  # q_proj (shared input), down_proj
        x = hooked_inputs(model, name, batches)
        repos = torch.norm(x, dim=1).mean(dim=0)
        torch.testing.assert_close(whole[name].l2_seq, repos, rtol=1e-10, atol=0)
        pooled = x.square().sum(1).mean(0).sqrt()  # sqrt(seqlen * sq_mean): not what l2_seq is
        assert (pooled - repos).abs().max() > 1e-6


def test_l2_seq_with_other_kinds_leaves_them_bitwise_and_fills_only_its_fields(tiny):
    model, layers, batches = tiny
    alone = collect_stats(model, layers, batches, {"abs_mean"}, CPU, batch_size=2, progress=False)
    both = collect_stats(model, layers, batches, {"abs_mean", "l2_seq"}, CPU, batch_size=2, progress=False)
    blocks = blockwise(model, layers, batches, {"abs_mean", "l2_seq"})
    for layer in layers:
        for field in ("abs_mean", "sq_mean"):
            assert torch.equal(both[layer.name].__dict__[field], alone[layer.name].__dict__[field])
            assert torch.equal(blocks[layer.name].__dict__[field], alone[layer.name].__dict__[field])
        assert torch.equal(blocks[layer.name].l2_seq, both[layer.name].l2_seq)
    only = blockwise(model, layers[:3], batches, {"l2_seq"})[layers[0].name]
    assert only.sq_mean is None and only.abs_mean is None and only.l2_seq is not None


def test_l2_seq_is_cached_as_its_own_kind(tiny, tmp_path):
    from harness.run.calibration import load_or_collect

    model, layers, batches = tiny
    kwargs = {"key": {"t": 1}, "cache_dir": tmp_path, "device": CPU, "batch_size": 2, "progress": False}
    first = load_or_collect(model, layers, batches, {"l2_seq"}, log=lambda m: None, **kwargs)
    logs = []
    again = load_or_collect(model, layers, batches, {"l2_seq"}, log=logs.append, **kwargs)
    assert any("cache hit" in m for m in logs) and not any("collecting" in m for m in logs)
    name = layers[0].name
    assert torch.equal(again[name].l2_seq, first[name].l2_seq) and again[name].sequences == batches.shape[0]


# ---------------------------------------------------------------- bitstack's statistic option
def test_bitstack_default_is_the_repos_per_sequence_statistic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 7, generator=gen, dtype=torch.float64) * torch.tensor([0.2, 1.0, 5.0])[:, None, None]
    st = harness.LayerStats(
        tokens=48,
        sequences=3,
        sq_mean=x.square().mean((0, 1)),
        abs_mean=x.abs().mean((0, 1)),
        l2_seq=x.norm(dim=1).mean(0),
    )
    assert BitStack.Options().statistic == "l2_seq" and "l2_seq" in BitStack.needs
    scales, label = activation_scales(st, BitStack.Options().statistic, 16)
    torch.testing.assert_close(scales, torch.norm(x, dim=1).mean(dim=0) + 1e-3)  # get_act_scale
    assert "l2_seq" in label
    pooled, _ = activation_scales(st, "l2", 16)  # the former default: above the repo's on uneven sequences
    assert (pooled > scales * 1.05).all()
    with pytest.raises(harness.HarnessError, match="l2_seq"):
        activation_scales(harness.LayerStats(sq_mean=st.sq_mean), "l2_seq", 16)


def test_the_former_default_keeps_its_cell_identity():
    """Cells hashed statistic = "l2" (the former default, always in the options dict): a suite that says
    it gets the same options dict, so the same cell id; the new default hashes differently."""
    former = {
        "niter": 16,
        "k": 16,
        "scale": True,
        "fuse_scale": True,
        "statistic": "l2",
        "seqlen": 2048,
        "svd": "full",
        "cache_dense": False,
    }
    assert options_dict(parse_options(BitStack.Options, {"statistic": "l2"}, "m")) == former
    assert options_dict(BitStack.Options()) == {**former, "statistic": "l2_seq"}


def test_the_planner_counts_the_l2_seq_vectors():
    from harness.plan.memory import input_stats_bytes

    n = 10
    assert input_stats_bytes(n, frozenset({"l2_seq"})) == (8 * 2 * n, 8 * 2 * n)  # norm sums + x^2 sums
    with_abs = input_stats_bytes(n, frozenset({"abs_mean", "l2_seq"}))
    assert with_abs == (input_stats_bytes(n, frozenset({"abs_mean"}))[0] + 8 * n, 8 * 3 * n)
