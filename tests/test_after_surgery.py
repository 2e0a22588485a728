"""The per-cell weight optimization after surgery (``Decomposer.after_surgery``), end to end through a run:
svd-llm's ``update = "lora"`` on a tiny random Llama.

Independent checks: the tuned cell's numbers against the same method untuned (must differ) and the
calibration loss the plugin measured before and after (must fall); the dense restore against runs that never
had a tuned cell (bitwise equal numbers); the export against the record's perplexity, recomputed by the
evaluator on the exported model loaded back.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from harness_svdllm import SVDLLM

import harness
from harness.cli import main
from harness.options import options_dict, parse_options
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from tests.conftest import write_suite

PPL = {"source": "wiki-passages", "seqlen": 32, "max_windows": 1}
LORA = (
    '{ update = "lora", lora_lr = 1e-2, lora_warmup_steps = 0, lora_epochs = 2, lora_batch_size = 4, '
    "lora_dropout = 0.0 }"
)


def suite_text(name: str, targets: list[float], methods: list[str]) -> str:
    blocks = {
        "lora": f'[[methods]]\nname = "svd-llm"\nlabel = "svd-llm-lora"\noptions = {LORA}\n',
        "none": '[[methods]]\nname = "svd-llm"\n',
    }
    return textwrap.dedent(
        f"""
            name = "{name}"
            models = ["random:tiny-llama"]
            targets = {targets}
            [[evaluators]]
            name = "perplexity"
            options = {{ source = "{PPL["source"]}", seqlen = {PPL["seqlen"]}, max_windows = {PPL["max_windows"]} }}
            [calibration]
            samples = 8
            seqlen = 32
            batch_size = 4
            """
    ) + "\n".join(blocks[m] for m in methods)


def run(tmp: Path, name: str, targets: list[float], methods: list[str]):
    suite_file = write_suite(tmp / f"{name}.toml", suite_text(name, targets, methods))
    summary = run_suite(load_suite(suite_file), RunOptions(tmp / "results", progress=False))
    assert not summary.failed, [r.error for r in summary.failed]
    cells = {(r.method_label, r.target_label): r for r in summary.results if not r.is_baseline}
    return suite_file, summary, cells


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run "after": the tuned method first (two cells sharing its factors), then the untuned one; run "before":
    the untuned method first, then the tuned one with a single cell."""
    tmp = tmp_path_factory.mktemp("after-surgery")
    after = run(tmp, "after", [0.6, 0.5], ["lora", "none"])
    before = run(tmp, "before", [0.5], ["none", "lora"])
    return {"tmp": tmp, "after": after, "before": before}


@pytest.mark.slow
def test_a_lora_cell_lowers_its_calibration_loss_and_differs_from_update_none(runs):
    _, _, cells = runs["after"]
    for target in ("keep=0.6", "keep=0.5"):
        tuned, plain = cells["svd-llm-lora", target], cells["svd-llm", target]
        summary = tuned.weight_optimization
        assert summary["calibration_loss_after"] < summary["calibration_loss_before"] - 0.05, summary
        assert summary["steps"] == 2 * 2 * 2  # 2 stages x 2 epochs x (8 windows / 4 per step)
        assert tuned.ranks == plain.ranks  # the same surgery: only the weights moved
        assert tuned.metrics["perplexity"] != pytest.approx(plain.metrics["perplexity"], rel=1e-4)
        assert tuned.sizes["model_params"] == plain.sizes["model_params"]


@pytest.mark.slow
def test_every_cell_starts_from_the_dense_originals_and_untouched_factors(runs):
    """The untuned cell after two tuned cells equals one computed before any tuned cell; the second tuned
    cell of a method (factors shared with the first) equals one that is its method's only cell."""
    _, _, after = runs["after"]
    _, _, before = runs["before"]
    plain, lora = ("svd-llm", "keep=0.5"), ("svd-llm-lora", "keep=0.5")
    assert after[plain].metrics == before[plain].metrics
    assert after[lora].metrics == before[lora].metrics
    summaries = [{k: v for k, v in c[lora].weight_optimization.items() if k != "seconds"} for c in (after, before)]
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_the_record_and_the_leaderboard_say_which_cells_were_tuned(runs):
    _, summary, cells = runs["after"]
    tuned, plain = cells["svd-llm-lora", "keep=0.5"], cells["svd-llm", "keep=0.5"]
    assert tuned.method["weight_optimization"] is True and "weight_optimization" not in plain.method
    assert tuned.timing["weight_optimization_s"] == tuned.weight_optimization["seconds"] > 0
    stored = json.loads((summary.results_dir / "cells" / f"{plain.cell_id}.json").read_text())
    assert "weight_optimization" not in stored and "weight_optimization_s" not in stored["timing"]
    stored = json.loads((summary.results_dir / "cells" / f"{tuned.cell_id}.json").read_text())
    assert (
        stored["weight_optimization"]["calibration_loss_after"] == tuned.weight_optimization["calibration_loss_after"]
    )
    board = json.loads((summary.results_dir / "leaderboard.json").read_text())
    assert "weight optimization" in board["columns"]
    rows = {(r["method"], r["target"]): r for r in board["rows"]}
    assert rows["svd-llm-lora", "keep=0.5"]["weight optimization"].startswith("loss ")
    assert "weight optimization" not in rows["svd-llm", "keep=0.5"]
    assert "weight optimization" in summary.leaderboard


@pytest.mark.slow
def test_a_tuned_cell_exports_its_tuned_factors(runs):
    suite_file, _, cells = runs["before"]
    record = cells["svd-llm-lora", "keep=0.5"]
    out = runs["tmp"] / "export-lora"
    args = ["export", str(suite_file), record.cell_id[:8], "--out", str(out), "--results", str(runs["tmp"] / "results")]
    assert main(args) == 0
    model, _ = harness.load_compressed(out)
    assert perplexity(model) == pytest.approx(record.metrics["perplexity"], rel=1e-6)
    untuned = runs["before"][2]["svd-llm", "keep=0.5"]
    assert record.metrics["perplexity"] != pytest.approx(untuned.metrics["perplexity"], rel=1e-4)


def perplexity(model) -> float:
    """The cell's evaluation on a loaded export (a shape-only model reads the harness's tokenizer)."""
    import torch
    from harness_perplexity import Perplexity, PerplexityOptions

    from harness.api import RunContext
    from harness.models import load_model

    tokenizer = load_model("random:tiny-llama?layers=1", "float32", "cpu").tokenizer
    ctx = RunContext(seed=0, device=torch.device("cpu"), model_id="x")
    return Perplexity().evaluate(model, tokenizer, PerplexityOptions(**PPL), ctx).metrics["perplexity"]


def test_lora_options_keep_existing_cell_ids_and_apply_to_update_lora_only():
    plain = options_dict(parse_options(SVDLLM.Options, {}, "m"))
    assert not any(k.startswith("lora_") or k == "update" for k in plain)
    lora = options_dict(parse_options(SVDLLM.Options, {"update": "lora"}, "m"))
    assert {k for k in lora if k not in plain} == {"update"}  # the defaults stay out of the id
    with pytest.raises(harness.HarnessError, match=r"m: .*lora_r: apply to update = 'lora' only"):
        parse_options(SVDLLM.Options, {"lora_r": 4}, "m")
    with pytest.raises(harness.HarnessError, match=r"m\.lora_dropout: expected .*below 1"):
        parse_options(SVDLLM.Options, {"update": "lora", "lora_dropout": 1.0}, "m")
    assert SVDLLM().tunes(parse_options(SVDLLM.Options, {"update": "lora"}, "m"))
    assert not SVDLLM().tunes(parse_options(SVDLLM.Options, {"update": "closed-form"}, "m"))


# ---------------------------------------------------------------- the planner's training term
def plan_of(tmp: Path, methods: list[str], seqlen: int = 32, targets: tuple = (0.5,)):
    from harness.plan import plan_model

    text = suite_text(f"plan-{len(methods)}-{seqlen}", list(targets), methods).replace(
        "seqlen = 32\nbatch_size", f"seqlen = {seqlen}\nbatch_size"
    )
    suite = load_suite(write_suite(tmp / f"plan-{'-'.join(methods)}-{seqlen}.toml", text))
    return suite, {s.name: s for s in plan_model(suite, "random:tiny-llama", "cpu").stages}


def test_the_plan_counts_a_training_step_for_tuned_cells_only_and_it_scales_with_batch_tokens(tmp_path):
    """By hand, for tiny-llama (h 64, I 176, 2 blocks, vocab 4096, float32 on the CPU) at batch 4: the
    backward keeps 4 * seqlen tokens x (2 (8 h + 5 I) x 4 bytes + 3 x 4096 x 4 bytes); AdamW 12 bytes per
    value of the factors kept at keep=0.5 (half the decomposable values)."""
    decomposable = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176)  # q, o; k, v (2 kv heads of 16); gate, up, down
    adamw = 12 * int(0.5 * decomposable)
    _, plain = plan_of(tmp_path, ["none"])
    assert "training step" not in plain["evaluation"].note
    from harness.plan import evaluation_tokens, evaluation_tokens_bytes, forward_bytes, model_config

    config = model_config("random:tiny-llama", None, False)
    extra = {}
    for seqlen in (32, 64):
        suite, tuned = plan_of(tmp_path, ["lora"], seqlen)
        _, untuned = plan_of(tmp_path, ["none"], seqlen)
        assert "a tuned cell's training step" in tuned["evaluation"].note
        for stage in ("load", "calibration", "factorization"):  # the term is the evaluation stage's only
            assert tuned[stage].host == untuned[stage].host
        activations = 4 * seqlen * (2 * (8 * 64 + 5 * 176) * 4 + 3 * 4096 * 4)
        tokens = evaluation_tokens(suite)  # the evaluation batch: the stage holds the larger of the two
        evaluated = evaluation_tokens_bytes(tokens, 4096, 4) + forward_bytes(tokens, config, 4)
        extra[seqlen] = tuned["evaluation"].host - untuned["evaluation"].host
        assert extra[seqlen] == max(activations + adamw - evaluated, 0), seqlen
    assert extra[64] - extra[32] == 4 * 32 * (2 * (8 * 64 + 5 * 176) * 4 + 3 * 4096 * 4)  # linear in tokens
