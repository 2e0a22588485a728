"""harness export: a computed cell's compressed model out of the harness and back, factored and dense."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from harness_perplexity import Perplexity, PerplexityOptions

import harness
from harness.api import RunContext
from harness.cli import main
from harness.errors import HarnessError
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from harness.surgery import FactoredLinear, count_model
from tests.conftest import write_suite

PPL = {"source": "wiki-passages", "seqlen": 64, "max_windows": 2}


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    suite_file = write_suite(
        tmp / "ex.toml",
        textwrap.dedent(
            f"""
            name = "ex"
            models = ["random:tiny-llama"]
            targets = [0.6]
            methods = ["svd-llm", "bitstack"]
            [[evaluators]]
            name = "perplexity"
            options = {{ source = "{PPL["source"]}", seqlen = {PPL["seqlen"]}, max_windows = {PPL["max_windows"]} }}
            [calibration]
            samples = 4
            seqlen = 32
            """
        ),
    )
    summary = run_suite(load_suite(suite_file), RunOptions(tmp / "results", progress=False))
    assert not summary.failed
    cells = {(r.method or {}).get("name"): r for r in summary.results}
    return {"tmp": tmp, "suite": suite_file, "results": tmp / "results", "cells": cells}


def perplexity(model, tokenizer=None) -> float:
    """The cell's perplexity evaluation; a shape-only model reads the harness's tokenizer (ids mod its vocab:
    the one exported is the embedded model's, unmapped)."""
    from harness.models import load_model

    tokenizer = load_model("random:tiny-llama?layers=1", "float32", "cpu").tokenizer
    ctx = RunContext(seed=0, device=torch.device("cpu"), model_id="x")
    return Perplexity().evaluate(model, tokenizer, PerplexityOptions(**PPL), ctx).metrics["perplexity"]


def export(computed, cell_id: str, fmt: str) -> Path:
    out = computed["tmp"] / f"{cell_id}-{fmt}"
    args = ["export", str(computed["suite"]), cell_id[:8], "--out", str(out), "--format", fmt]
    assert main([*args, "--results", str(computed["results"])]) == 0
    return out


def test_a_factored_export_loads_back_as_the_cell_that_was_measured(computed):
    record = computed["cells"]["svd-llm"]
    out = export(computed, record.cell_id, "factored")
    model, tokenizer = harness.load_compressed(out)
    factored = {n: m for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
    assert {n: m.rank for n, m in factored.items()} == {n: r for n, r in record.ranks.items() if r is not None}
    assert count_model(model)[0] == record.sizes["model_params"]
    assert perplexity(model, tokenizer) == pytest.approx(record.metrics["perplexity"], rel=1e-6)
    manifest = json.loads((out / "harness_compressed.json").read_text())
    assert manifest["cell_id"] == record.cell_id and manifest["factored_modules"] == len(factored)


def test_a_dense_export_is_a_plain_checkpoint_with_the_cells_numbers_and_is_larger_by_the_byte_ratio(computed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = computed["cells"]["svd-llm"]
    dense_dir = export(computed, record.cell_id, "dense")
    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert not any(isinstance(m, FactoredLinear) for m in model.modules())
    assert perplexity(model, AutoTokenizer.from_pretrained(dense_dir)) == pytest.approx(
        record.metrics["perplexity"], rel=1e-4
    )
    factored_dir = computed["tmp"] / f"{record.cell_id}-factored"
    if not factored_dir.exists():
        factored_dir = export(computed, record.cell_id, "factored")
    saved = (dense_dir / "model.safetensors").stat().st_size - (factored_dir / "model.safetensors").stat().st_size
    expected = record.sizes["dense_decomposable_bytes"] - record.metrics["bytes_kept"]
    assert saved == pytest.approx(expected, rel=0.01)  # headers differ by a few hundred bytes


def test_a_tampered_export_is_refused_in_one_line(computed):
    record = computed["cells"]["svd-llm"]
    out = computed["tmp"] / f"{record.cell_id}-factored"
    if not out.exists():
        out = export(computed, record.cell_id, "factored")
    manifest_path = out / "harness_compressed.json"
    manifest = json.loads(manifest_path.read_text())
    name, shape = next(iter(manifest["layers"].items()))
    manifest["layers"][name] = {**shape, "rank": shape["rank"] + 1}
    manifest_path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(HarnessError, match=r"do not match|not the exported cell"):
            harness.load_compressed(out)
    finally:
        manifest["layers"][name] = shape
        manifest_path.write_text(json.dumps(manifest))


def test_module_replacements_export_dense_only_and_bad_cells_are_one_line_errors(computed, capsys):
    bitstack = computed["cells"]["bitstack"]
    out = computed["tmp"] / "bitstack"
    args = [
        "export",
        str(computed["suite"]),
        bitstack.cell_id,
        "--out",
        str(out),
        "--results",
        str(computed["results"]),
    ]
    assert main(args) == 2
    assert "BitStackLinear, not two factors; export this cell with --format dense" in capsys.readouterr().err
    baseline = computed["cells"][None]
    assert main([*args[:2], baseline.cell_id, *args[3:]]) == 2
    assert "expected a computed compressed cell" in capsys.readouterr().err
    assert main([*args[:2], "ffffff", *args[3:]]) == 2
