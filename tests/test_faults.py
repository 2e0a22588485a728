"""Faults during a run: a plugin that raises, a NaN metric, out of memory in
calibration, a plugin that fails to import, a crash while a result is written.

A failing cell is recorded as failed (error in its result and in MLflow), the
other cells run, and the run exits 1. A non-finite metric is flagged: kept out
of MLflow's metrics (a tag says which) and listed under the leaderboard.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import harness
from harness.plugins import Plugins, get_plugins, set_plugins
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from tests.conftest import ROOT, write_suite


@dataclass(frozen=True)
class FlakyOptions:
    fail_on_call: int = 2
    nan_on_call: int = 3


class Flaky(harness.Evaluator):
    """Raises on its n-th call and returns NaN on another."""

    name = "flaky"
    Options = FlakyOptions

    def __init__(self) -> None:
        self.calls = 0

    def evaluate(self, model, tokenizer, options, ctx):
        self.calls += 1
        if self.calls == options.fail_on_call:
            raise RuntimeError("flaky evaluator broke on purpose")
        value = math.nan if self.calls == options.nan_on_call else float(self.calls)
        return harness.EvalResult({"score": value}, {"calls": self.calls}, {"score": True})


class Broken(harness.Decomposer):
    name = "broken"

    def factorize(self, weights, stats, options, ctx):
        raise ValueError("this decomposer cannot factorize anything")


class FaultyPlugin:
    def __init__(self) -> None:
        self.flaky = Flaky()

    @harness.hookimpl
    def register_evaluators(self, register):
        register(self.flaky)

    @harness.hookimpl
    def register_decomposers(self, register):
        register(Broken())


@pytest.fixture
def faulty():
    plugin = FaultyPlugin()
    get_plugins().register(plugin, name="faulty")
    yield plugin


def faulty_suite(tmp_path: Path, model_dir: Path) -> Path:
    return write_suite(
        tmp_path / "faulty.toml",
        f"""
        name = "faulty"
        device = "cpu"
        models = ["{model_dir}"]
        targets = [0.75, 0.5, 0.25]
        [[methods]]
        name = "svd"
        [[methods]]
        name = "broken"
        [[evaluators]]
        name = "flaky"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 1 }}
        [[trackers]]
        name = "mlflow"
        options = {{ tracking_uri = "sqlite:///{tmp_path}/mlflow.db", experiment = "faulty" }}
    """,
    )


def test_a_failing_plugin_costs_its_cells_only(faulty, tiny_model_dir, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from harness.cli import main

    code = main(["run", str(faulty_suite(tmp_path, tiny_model_dir)), "--results", str(tmp_path / "r"), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "7 cells computed, 0 reused" in captured.out
    assert "4 cell(s) failed" in captured.err
    results = [json.loads(p.read_text()) for p in (tmp_path / "r" / "faulty" / "cells").glob("*.json")]
    by_status = {}
    for result in results:
        by_status.setdefault(result["status"], []).append(result)
    assert len(by_status["ok"]) == 3 and len(by_status["failed"]) == 4
    errors = {(r["method"] or {}).get("name", "baseline"): r["error"] for r in by_status["failed"]}
    assert errors["broken"]["type"] == "ValueError" and "cannot factorize" in errors["broken"]["message"]
    assert errors["svd"] == {**errors["svd"], "type": "RuntimeError", "message": "flaky evaluator broke on purpose"}
    assert any("in evaluate" in line for line in errors["svd"]["traceback"])
    # the leaderboard lists failures and flags the NaN instead of ranking it
    board = (tmp_path / "r" / "faulty" / "leaderboard.md").read_text()
    assert board.count("FAILED: ValueError: this decomposer cannot factorize anything") == 3
    assert "nan (flagged)" in board
    assert "Flagged non-finite metrics (not ranked): svd keep=0.5: score" in board
    # MLflow has the error and the flagged metric as tags
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("faulty")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "harness.cell_id" in r.data.tags]
    assert len(runs) == 7
    failed = [r for r in runs if r.data.tags["harness.status"] == "failed"]
    assert len(failed) == 4 and all(r.info.status == "FAILED" for r in failed)
    assert {r.data.tags["harness.error"] for r in failed} == {
        "ValueError: this decomposer cannot factorize anything",
        "RuntimeError: flaky evaluator broke on purpose",
    }
    flagged = [r for r in runs if "harness.flagged_metrics" in r.data.tags]
    assert len(flagged) == 1 and flagged[0].data.tags["harness.flagged_metrics"] == "score"
    assert "score" not in flagged[0].data.metrics and "perplexity" in flagged[0].data.metrics


def test_a_rerun_retries_failed_cells_only(faulty, tiny_model_dir, tmp_path):
    suite = load_suite(faulty_suite(tmp_path, tiny_model_dir))
    options = RunOptions(results_root=tmp_path / "r", progress=False)
    first = run_suite(suite, options)
    assert (first.computed, first.skipped, len(first.failed)) == (7, 0, 4)
    faulty.flaky.calls = 10  # the evaluator works now; the broken decomposer still fails
    second = run_suite(suite, options)
    assert (second.computed, second.skipped, len(second.failed)) == (4, 3, 3)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 9 GB"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_in_calibration_names_the_settings_to_lower(tiny_model_dir, tmp_path, monkeypatch, error):
    import harness.run.calibration

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(harness.run.calibration, "load_or_collect", out_of_memory)
    suite = write_suite(
        tmp_path / "oom.toml",
        f"""
        name = "oom"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.5]
        [[methods]]
        name = "asvd"
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 1 }}
        [calibration]
        samples = 4
        seqlen = 32
        batch_size = 2
        pipeline = "whole"
    """,
    )
    summary = run_suite(load_suite(suite), RunOptions(results_root=tmp_path / "r", progress=False))
    (failed,) = summary.failed
    assert failed["method"]["name"] == "asvd"
    assert failed["error"]["type"] == "OutOfMemory"
    message = failed["error"]["message"]
    for setting in ("calibration.batch_size (now 2)", "calibration.samples (4)", "calibration.seqlen (32)"):
        assert setting in message
    assert "oom.toml" in message and "out of memory" in message
    assert sum(r["status"] == "ok" for r in summary.results) == 2


def test_out_of_memory_in_an_evaluator_names_its_batch_size(faulty, tiny_model_dir, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(faulty.flaky, "evaluate", out_of_memory)
    suite = write_suite(
        tmp_path / "oom.toml",
        f"""
        name = "oom-eval"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 1 }}
        [[evaluators]]
        name = "flaky"
    """,
    )
    summary = run_suite(load_suite(suite), RunOptions(results_root=tmp_path / "r", progress=False))
    (failed,) = summary.failed
    assert failed["error"]["type"] == "OutOfMemory"
    assert "evaluator 'flaky' ran out of memory on cpu" in failed["error"]["message"]
    assert "--limit" in failed["error"]["message"]


# ---------------------------------------------------------------- a plugin that fails to import
def broken_distribution(site: Path) -> None:
    """An installed distribution whose entry point names a module that raises on import."""
    info = site / "harness_plugin_broken-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-plugin-broken\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[harness]\nbroken = harness_plugin_broken\n")
    (info / "RECORD").write_text("")
    (site / "harness_plugin_broken.py").write_text("raise ImportError('needs libfrobnicate, which is missing')\n")


def test_a_plugin_that_fails_to_import_is_listed_by_harness_plugins(tmp_path):
    broken_distribution(tmp_path / "site")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
        "HARNESS_LOAD_PLUGINS": os.environ["HARNESS_LOAD_PLUGINS"] + ",broken",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "plugins"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "FAILED to load plugin 'broken': ImportError: needs libfrobnicate, which is missing" in proc.stdout
    assert any(line.startswith("svd ") for line in proc.stdout.splitlines())


def test_a_plugin_that_fails_to_import_is_reported_at_run_start(tmp_path, tiny_model_dir, monkeypatch, capsys):
    broken_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", os.environ["HARNESS_LOAD_PLUGINS"] + ",broken")
    plugins = Plugins()
    assert "broken" in plugins.failures and "svd" in plugins.names("decomposer")
    set_plugins(plugins)
    suite = write_suite(
        tmp_path / "s.toml",
        f"""
        name = "with-broken-plugin"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.5]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 1 }}
    """,
    )
    summary = run_suite(load_suite(suite), RunOptions(results_root=tmp_path / "r", progress=False))
    assert not summary.failed and summary.computed == 2
    err = capsys.readouterr().err
    assert "warning: plugin 'broken' failed to load and is skipped: ImportError: needs libfrobnicate" in err


# ---------------------------------------------------------------- a crash while a result is written
def test_a_crash_mid_write_leaves_the_old_result_whole(tmp_path, monkeypatch):
    from harness.run.record import CellRecord
    from harness.store import ResultStore

    store = ResultStore(tmp_path / "s")
    store.save(CellRecord(cell_id="abc123", suite="s", status="ok", model={}, metrics={"x": 1.0}))

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between writing the temporary file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(CellRecord(cell_id="abc123", suite="s", status="ok", model={}, metrics={"x": 2.0}))
    monkeypatch.undo()
    assert store.load("abc123").metrics == {"x": 1.0}
    assert [p.name for p in store.cells.iterdir()] == ["abc123.json"]


def test_an_unreadable_result_counts_as_not_done(tmp_path):
    from harness.store import ResultStore

    store = ResultStore(tmp_path / "s")
    store.path("abc123").write_text('{"cell_id": "abc123", "status": "o')  # half a file
    assert store.load("abc123") is None and not store.done("abc123")
