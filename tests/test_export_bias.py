"""harness export and load_compressed round-trip factored layers that carry a bias of their own.

Centred ``lord`` replaces each bias-free Llama projection by ``LowRank(A, B, bias)``: a factored layer
with an output offset the architecture has no tensor for. The manifest records it, the loader builds
it, and the loaded model's perplexity and tensors are the cell's.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from harness_perplexity import Perplexity, PerplexityOptions
from safetensors.torch import load_file

import harness
from harness.api import RunContext
from harness.cli import main
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from harness.surgery import FactoredLinear, count_model
from tests.conftest import write_suite

PPL = {"source": "wiki-passages", "seqlen": 64, "max_windows": 2}


def perplexity(model) -> float:
    from harness.models import load_model

    tokenizer = load_model("random:tiny-llama?layers=1", "float32", "cpu").tokenizer
    ctx = RunContext(seed=0, device=torch.device("cpu"), model_id="x")
    return Perplexity().evaluate(model, tokenizer, PerplexityOptions(**PPL), ctx).metrics["perplexity"]


@pytest.mark.slow
def test_a_biased_factored_export_loads_back_as_the_cell(tmp_path):
    suite_file = write_suite(
        tmp_path / "lord.toml",
        textwrap.dedent(
            f"""
            name = "lord-export"
            models = ["random:tiny-llama"]
            targets = [0.6]
            methods = ["lord"]
            [[evaluators]]
            name = "perplexity"
            options = {{ source = "{PPL["source"]}", seqlen = {PPL["seqlen"]}, max_windows = {PPL["max_windows"]} }}
            [calibration]
            samples = 4
            seqlen = 32
            """
        ),
    )
    summary = run_suite(load_suite(suite_file), RunOptions(tmp_path / "results", progress=False))
    assert not summary.failed
    (record,) = [r for r in summary.results if r.method]
    out = tmp_path / "exported"
    args = ["export", str(suite_file), record.cell_id[:8], "--out", str(out), "--results", str(tmp_path / "results")]
    assert main(args) == 0
    manifest = json.loads((out / "harness_compressed.json").read_text())
    factored_names = [n for n, r in record.ranks.items() if r is not None]
    assert factored_names and all(manifest["layers"][n]["bias"] is True for n in factored_names)
    model, _ = harness.load_compressed(out)
    factored = {n: m for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
    assert set(factored) == set(factored_names) and all(m.bias is not None for m in factored.values())
    tensors = load_file(str(out / "model.safetensors"))
    name = factored_names[0]
    assert torch.equal(factored[name].bias, tensors[f"{name}.bias"]) and factored[name].bias.abs().max() > 0
    assert count_model(model)[0] == record.sizes["model_params"]
    assert perplexity(model) == pytest.approx(record.metrics["perplexity"], rel=1e-6)
    # the manifest's bias is checked: a layer listed without one does not load
    manifest["layers"][name]["bias"] = False
    (out / "harness_compressed.json").write_text(json.dumps(manifest))
    with pytest.raises(harness.HarnessError, match=r"do not match|not the exported cell"):
        harness.load_compressed(out)
