"""The layer-sequential pipeline (``calibration.pipeline = "blocks"``) against the whole-model pass.

Both are computed here on random Llamas (the tiny one of conftest.py and a
4-block one built below): the whole-model pass hooks every layer of one full
forward (tests/test_calibration.py checks it against closed forms), the
pipeline runs the blocks one by one from the captured inputs of block 0. The
statistics and the factorizations must be bitwise equal (``torch.equal``):
same kernels, same batches, the same order of float64 additions per layer.
"""

from __future__ import annotations

import gc

import pytest
import torch

from harness.errors import HarnessError
from harness.plugins import get_plugins
from harness.run import blocks, pipeline
from harness.run.calibration import collect_stats
from harness.run.runner import RunOptions, SuiteRunner, run_suite
from harness.suite import load_suite
from harness.surgery import find_linears
from tests.conftest import write_suite

ALL = frozenset({"gram", "abs_mean", "out_cov"})
FIELDS = ("gram", "abs_mean", "sq_mean", "out_cov")
CPU = torch.device("cpu")
HIDDEN, INTER, KV = 32, 48, 16  # 4 heads of 8, 2 key/value heads


@pytest.fixture(scope="module")
def four_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    batches = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(2))  # 3 batches of 2, 2, 1
    return model, batches


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from harness.models import load_model

    loaded = load_model(str(tiny_model_dir), "float32", "cpu")
    batches = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(3))
    return loaded.model, batches


def blockwise_stats(model, layers, batches, needs, batch_size, **kwargs):
    got = {}
    job = pipeline.Job("record", frozenset(needs), [[layer.name] for layer in layers], lambda g, s: got.update(s))
    pipeline.run_blocks(model, layers, batches, [job], device=CPU, batch_size=batch_size, progress=False, **kwargs)
    assert job.error is None
    return got


@pytest.mark.parametrize("which", ["tiny", "four_blocks"])
def test_blocks_statistics_are_bitwise_those_of_the_whole_model_pass(which, request):
    model, batches = request.getfixturevalue(which)
    layers = find_linears(model, include_lm_head=which == "four_blocks")
    whole = collect_stats(model, layers, batches, set(ALL), CPU, batch_size=2, progress=False)
    blocks = blockwise_stats(model, layers, batches, ALL, batch_size=2)
    assert set(blocks) == set(whole) == {layer.name for layer in layers}
    for name in whole:
        assert blocks[name].tokens == whole[name].tokens == batches.numel()
        for field in FIELDS:
            assert torch.equal(getattr(blocks[name], field), getattr(whole[name], field)), (name, field)
    # layers fed the same tensor share one set of input statistics (not copies)
    attn = "model.layers.1.self_attn"
    assert blocks[f"{attn}.q_proj"].gram is blocks[f"{attn}.v_proj"].gram
    assert blocks[f"{attn}.q_proj"].out_cov is not blocks[f"{attn}.v_proj"].out_cov


def test_each_job_sees_only_the_fields_of_its_needs(four_blocks):
    model, batches = four_blocks
    layers = find_linears(model)[:7]
    seen = {}
    jobs = [
        pipeline.Job(kind, frozenset({kind}), [[layers[0].name]], lambda g, s, k=kind: seen.update({k: s[g[0]]}))
        for kind in sorted(ALL)
    ]
    pipeline.run_blocks(model, layers, batches, jobs, device=CPU, batch_size=2, progress=False)
    present = {kind: {f for f in FIELDS if getattr(stats, f) is not None} for kind, stats in seen.items()}
    assert present == {"gram": {"gram", "sq_mean"}, "abs_mean": {"abs_mean", "sq_mean"}, "out_cov": {"out_cov"}}


def one_block_bytes() -> int:
    """float64 bytes of one Llama block's statistics for gram + abs_mean + out_cov, from the shapes alone:
    4 distinct inputs (q/k/v, o, gate/up, down), each an n x n Gram and 4 n-vectors (|x| and x^2 sums, means),
    and 7 output covariances."""
    inputs = [HIDDEN, HIDDEN, HIDDEN, INTER]
    outputs = [HIDDEN, KV, KV, HIDDEN, INTER, INTER, HIDDEN]
    return 8 * (sum(n * n + 4 * n for n in inputs) + sum(m * m for m in outputs))


def test_no_more_than_one_blocks_statistics_are_alive_at_a_time(four_blocks):
    model, batches = four_blocks
    layers = find_linears(model)
    tracker = pipeline.LiveStats()
    calls = []
    job = pipeline.Job("count", ALL, [[layer.name] for layer in layers], lambda g, s: calls.append(g))
    pipeline.run_blocks(model, layers, batches, [job], device=CPU, batch_size=2, progress=False, tracker=tracker)
    gc.collect()
    assert len(calls) == 28 and job.error is None
    assert tracker.peak == one_block_bytes()  # 4 blocks' worth on the whole-model path
    assert tracker.live == 0 and tracker.count == 0


def test_a_group_spanning_blocks_is_factorized_once_after_its_last_block(four_blocks):
    model, batches = four_blocks
    layers = find_linears(model)
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    groups = [[q0, q1], *([layer.name] for layer in layers if layer.name not in (q0, q1))]
    forwards = [0] * 4
    handles = [
        block.register_forward_hook(lambda *a, i=i: forwards.__setitem__(i, forwards[i] + 1))
        for i, block in enumerate(model.model.layers)
    ]
    calls, tracker = [], pipeline.LiveStats()

    def factorize(group, stats):
        grams = {n: s.gram.clone() for n, s in stats.items()} if len(group) == 2 else {}  # kept: not tracked
        calls.append((tuple(group), list(forwards), grams, tracker.live))
        return tuple(group)

    job = pipeline.Job("pairs", frozenset({"gram"}), groups, factorize)
    try:
        pipeline.run_blocks(model, layers, batches, [job], device=CPU, batch_size=2, progress=False, tracker=tracker)
    finally:
        for handle in handles:
            handle.remove()
    assert job.factorizations == [tuple(g) for g in groups]
    pair = [c for c in calls if c[0] == (q0, q1)]
    assert len(pair) == 1
    _, seen_forwards, grams, _ = pair[0]
    assert seen_forwards == [3, 3, 0, 0]  # after block 1's three batches, before block 2
    whole = collect_stats(model, layers, batches, {"gram"}, CPU, batch_size=2, progress=False)
    assert set(grams) == {q0, q1} and all(torch.equal(grams[n], whole[n].gram) for n in grams)
    # block 0's other groups went before block 1 ran; while the pair waits, q0's Gram is held into block 1
    block0 = [c for c in calls if c[0][0].startswith("model.layers.0.") and c[0] != (q0, q1)]
    assert block0 and all(c[1] == [3, 0, 0, 0] for c in block0)
    # during block 1's factorizations: its finished statistics (a Gram and the x^2 means per distinct input)
    # and layer 0's q/k/v input statistics, held for the pair
    block1 = [c for c in calls if any(n.startswith("model.layers.1.") for n in c[0])]
    finished = 8 * sum(n * n + n for n in (HIDDEN, HIDDEN, HIDDEN, INTER))
    assert len(block1) == 7 and all(c[3] == finished + 8 * (HIDDEN * HIDDEN + HIDDEN) for c in block1)
    later = [c for c in calls if c[0][0].startswith(("model.layers.2.", "model.layers.3."))]
    assert len(later) == 14 and all(c[3] == finished for c in later)  # nothing held once the pair is done


def test_moving_factorizations_reaches_nested_tensors():
    class Fact:
        def __init__(self):
            self.U = torch.ones(2, 2)
            self.parts = [torch.zeros(1), {"s": torch.ones(3)}]
            self.info = {"tokens": 4}

    moved = blocks.move_tensors(Fact(), torch.device("meta"))
    assert moved.U.is_meta and moved.parts[0].is_meta and moved.parts[1]["s"].is_meta
    assert moved.info == {"tokens": 4}


def test_unsupported_models_say_why(four_blocks):
    model, _ = four_blocks
    assert isinstance(blocks.block_plan(model, find_linears(model)), blocks.BlockPlan)
    odd = [*find_linears(model)[:1], type(find_linears(model)[0])("extra.0.proj", "proj", 0, (4, 4))]
    assert "more than one list of blocks" in blocks.block_plan(model, odd)


# ---------------------------------------------------------------- through the runner
def suite_text(model_dir, pipeline_mode: str | None) -> str:
    option = f'pipeline = "{pipeline_mode}"' if pipeline_mode else ""
    return f"""
        name = "pipe"
        device = "cpu"
        models = ["{model_dir}"]
        targets = [0.6]
        [[methods]]
        name = "svd-llm"
        [[methods]]
        name = "asvd"
        [[methods]]
        name = "lord"
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 2 }}
        [calibration]
        samples = 5
        seqlen = 24
        batch_size = 2
        {option}
        """


def test_svdllm_asvd_lord_factorizations_are_bitwise_equal_and_one_pass_serves_them(
    tiny_model_dir, tmp_path, monkeypatch
):
    passes = []
    real = pipeline.run_blocks
    monkeypatch.setattr(pipeline, "run_blocks", lambda *a, **k: passes.append(len(a[3])) or real(*a, **k))
    facts = {}
    for mode in ("whole", "blocks"):
        suite = load_suite(write_suite(tmp_path / f"{mode}.toml", suite_text(tiny_model_dir, mode)))
        session = SuiteRunner(suite, RunOptions(tmp_path / mode, progress=False)).open_session(str(tiny_model_dir))
        session.prepared.expect(suite.methods)
        facts[mode] = {m.label: session.factorize(m)[0] for m in suite.methods}
    assert passes == [3]  # one pass for svd-llm, asvd and lord; svd needs no statistics
    for label in ("svd-llm", "asvd", "lord"):
        assert len(facts["blocks"][label]) == len(facts["whole"][label]) == 14
        for whole, piped in zip(facts["whole"][label], facts["blocks"][label], strict=True):
            assert piped.names == whole.names and list(piped.ranks) == list(whole.ranks)
            assert piped.stored_rank == whole.stored_rank  # both compacted to what the suite's targets can choose
            for rank in (1, whole.stored_rank // 2, whole.stored_rank):
                assert piped.error(rank) == whole.error(rank)
                (a,) = piped.materialize(rank).values()
                (b,) = whole.materialize(rank).values()
                assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), (label, whole.names, rank)


def test_a_run_with_blocks_records_the_numbers_and_cell_ids_of_whole(tiny_model_dir, tmp_path):
    records = {}
    for mode in ("whole", "blocks", None):
        suite = load_suite(write_suite(tmp_path / f"{mode}.toml", suite_text(tiny_model_dir, mode)))
        summary = run_suite(suite, RunOptions(tmp_path / str(mode), progress=False))
        assert not summary.failed and summary.computed == 5
        records[mode] = {r.cell_id: r for r in summary.results}
    assert records["whole"].keys() == records["blocks"].keys() == records[None].keys()
    for cell_id, whole in records["whole"].items():
        for mode in ("blocks", None):  # None: the default is "blocks"
            assert records[mode][cell_id].metrics == whole.metrics
            assert records[mode][cell_id].ranks == whole.ranks


def test_out_of_memory_in_the_pipeline_names_the_settings_to_lower(tiny_model_dir, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 GB")

    monkeypatch.setattr(pipeline, "run_blocks", out_of_memory)
    suite = load_suite(write_suite(tmp_path / "oom.toml", suite_text(tiny_model_dir, "blocks")))
    summary = run_suite(suite, RunOptions(tmp_path / "r", progress=False))
    assert sorted(r.method["name"] for r in summary.failed) == ["asvd", "lord", "svd-llm"]
    message = summary.failed[0].error["message"]
    assert "calibration.batch_size (now 2)" in message and "calibration.samples (5)" in message


def test_pipeline_option_is_checked(tmp_path, tiny_model_dir):
    path = write_suite(tmp_path / "bad.toml", suite_text(tiny_model_dir, "layers"))
    with pytest.raises(HarnessError, match="pipeline: expected 'whole' or 'blocks', got 'layers'"):
        load_suite(path)


def test_fisher_methods_keep_the_whole_model_pass(tiny_model_dir, tmp_path):
    suite = load_suite(write_suite(tmp_path / "f.toml", suite_text(tiny_model_dir, "blocks")))
    session = SuiteRunner(suite, RunOptions(tmp_path / "r", progress=False)).open_session(str(tiny_model_dir))
    plugins = get_plugins()
    assert not session.prepared.blockwise(plugins.get("decomposer", "fwsvd"))
    assert session.prepared.blockwise(plugins.get("decomposer", "svd-llm"))
    assert not session.prepared.blockwise(plugins.get("decomposer", "svd"))


def test_output_means_are_the_mean_layer_outputs_on_both_paths():
    """out_mean against the outputs recorded by a plain hook; the block pipeline gives the same tensors."""
    from harness.models import load_model

    loaded = load_model("random:tiny-llama", "float32", "cpu")
    model = loaded.model
    layers = find_linears(model)
    batches = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    whole = collect_stats(model, layers, batches, {"out_cov", "out_mean"}, device="cpu", batch_size=2, progress=False)
    got = {}

    def keep(group, stats):
        got.update(stats)

    job = pipeline.Job("x", frozenset({"out_cov", "out_mean"}), [[x.name] for x in layers], keep)
    pipeline.run_blocks(model, layers, batches, [job], device=torch.device("cpu"), batch_size=2, progress=False)
    for layer in layers:
        assert torch.equal(got[layer.name].out_mean, whole[layer.name].out_mean), layer.name
    name = layers[3].name
    outputs = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda module, inputs, output: outputs.append(output.reshape(-1, output.shape[-1]).double())
    )
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    torch.testing.assert_close(whole[name].out_mean, torch.cat(outputs).mean(0))
    assert whole[name].tokens == 64
