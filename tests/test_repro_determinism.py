"""Two runs of one suite on CPU give identical numbers, and every result says where
its numbers came from (`harness show`).

The first run is in this process, the second a fresh `harness run` subprocess
with its own empty cache (calibration statistics recomputed, not reused). The
suite has a plain and a calibrated method (SVD, ASVD) on the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from tests.conftest import ROOT, write_suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("determinism")
    suite = write_suite(
        tmp / "det.toml",
        f"""
        name = "det"
        seed = 7
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.6, 0.3]
        [[methods]]
        name = "svd"
        [[methods]]
        name = "asvd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 32, max_windows = 3 }}
        [[profilers]]
        name = "params"
        [calibration]
        samples = 4
        seqlen = 32
    """,
    )
    previous = os.environ["HARNESS_CACHE"]
    os.environ["HARNESS_CACHE"] = str(tmp / "cache-a")
    try:
        assert main(["run", str(suite), "--results", str(tmp / "a"), "--no-progress"]) == 0
    finally:
        os.environ["HARNESS_CACHE"] = previous
    env = {**os.environ, "HARNESS_CACHE": str(tmp / "cache-b"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(suite), "--results", str(tmp / "b"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calibration: abs_mean block by block" in proc.stderr  # recomputed (the block pipeline keeps no cache)
    return {"a": tmp / "a" / "det", "b": tmp / "b" / "det", "tmp": tmp}


def cells(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (folder / "cells").glob("*.json")}


def test_two_runs_give_identical_numbers(two_runs):
    a, b = cells(two_runs["a"]), cells(two_runs["b"])
    assert len(a) == 5 and a.keys() == b.keys()  # same cell ids: same config, data and versions
    for cell_id, first in a.items():
        second = b[cell_id]
        assert first["status"] == second["status"] == "ok"
        assert first["metrics"] == second["metrics"]  # exact, not approximate
        assert first["ranks"] == second["ranks"]
        assert first["sizes"] == second["sizes"]
    methods = {(r["method"] or {}).get("name") for r in a.values()}
    assert methods == {None, "svd", "asvd"}


def test_harness_check_finds_nothing_moved(two_runs, capsys):
    baseline = two_runs["tmp"] / "baseline.json"
    assert main(["baseline", str(two_runs["a"]), "-o", str(baseline)]) == 0
    header = json.loads(baseline.read_text())["header"]
    assert header["seed"] == [7] and header["run_commands"][0].startswith("harness run ")
    assert "torch" in header["libraries"] and header["hardware"]
    assert main(["check", str(two_runs["b"]), "--baseline", str(baseline)]) == 0
    out = capsys.readouterr().out
    assert "check ok" in out and "0 moved within tolerance, 0 out of tolerance" in out


def test_every_result_records_its_provenance(two_runs):
    for result in cells(two_runs["a"]).values():
        prov = result["provenance"]
        assert prov["seed"] == 7 and prov["torch_deterministic"] is True
        assert prov["suite"]["name"] == "det" and prov["suite"]["calibration"]["samples"] == 4
        assert len(prov["suite_sha256"]) == 64
        assert prov["model_files"] == result["model"]["files"] and "model.safetensors" in prov["model_files"]
        assert {"torch", "transformers", "numpy", "python"} <= set(prov["libraries"])
        assert prov["hardware"]["cpu_count"] and prov["git"]
        (perplexity,) = prov["data"]["texts"]["perplexity"]["files"].values()
        assert len(perplexity) == 64
        calibrated = (result["method"] or {}).get("name") == "asvd"
        assert ("calibration" in prov["data"]["texts"]) == calibrated
        if calibrated:
            text = prov["data"]["texts"]["calibration"]
            assert text["source"] == "lambada" and text["text_sha256"] == result["calibration"]["data"]
            assert all(name.endswith("requests.jsonl.gz") for name in text["files"])


def test_harness_show_prints_a_cells_provenance(two_runs, capsys):
    result = next(r for r in cells(two_runs["a"]).values() if (r["method"] or {}).get("name") == "asvd")
    prefix = result["cell_id"][:6]
    assert main(["show", prefix, "--results", str(two_runs["a"].parent)]) == 0
    out = capsys.readouterr().out
    assert f"cell         {result['cell_id']}" in out
    sha = next(iter(result["provenance"]["data"]["texts"]["calibration"]["files"].values()))
    assert f"sha256 {sha}" in out
    assert "model.safetensors  sha256 " in out and "seed         7" in out
    assert "samples=4, seqlen=32, source=lambada" in out
    assert main(["show", prefix, "--results", str(two_runs["a"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cell_id"] == result["cell_id"]
