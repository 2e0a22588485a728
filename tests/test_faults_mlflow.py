"""MLflow unreachable mid-suite: results stay in the local store, a warning says so,
and `harness sync` later logs the missing runs, without duplicates.

A real `mlflow server` on 127.0.0.1 is stopped by a test plugin's
``harness_cell_start`` hook as the second cell starts (the first cell reached
the server), then started again on the same port and database for the sync.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import harness
from harness.cli import main
from harness.plugins import get_plugins
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from tests.conftest import write_suite

pytestmark = pytest.mark.server


class MlflowServer:
    def __init__(self, folder: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.folder = folder
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.folder}/server.db",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
        ]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not start within 120 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers: the group this test started
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Outage:
    """Stops the server as the second cell starts."""

    def __init__(self, server: MlflowServer) -> None:
        self.server = server
        self.started = 0

    @harness.hookimpl
    def harness_cell_start(self, cell):
        self.started += 1
        if self.started == 2:
            self.server.stop()


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def cell_runs(url: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([found.experiment_id]) if "harness.cell_id" in r.data.tags]


def test_an_mlflow_outage_costs_no_result_and_sync_fills_the_gap(server, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    get_plugins().register(Outage(server), name="outage")
    suite = write_suite(
        tmp_path / "outage.toml",
        f"""
        name = "outage"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.5, 0.25]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 1 }}
        [[trackers]]
        name = "mlflow"
        options = {{ tracking_uri = "{server.url}", experiment = "outage-test" }}
    """,
    )
    summary = run_suite(load_suite(suite), RunOptions(results_root=tmp_path / "r", progress=False))
    results_dir = tmp_path / "r" / "outage"
    assert summary.computed == 3 and not summary.failed
    assert len(list((results_dir / "cells").glob("*.json"))) == 3
    err = capsys.readouterr().err
    assert err.count("warning: tracker 'mlflow' failed") == 1  # then off for the rest of the run
    assert "failed in log_cell" in err and "results stay in the local store" in err
    assert f"log them later with: harness sync {results_dir}" in err

    server.start()  # back, same port and database
    assert len(cell_runs(server.url, "outage-test")) == 1
    # tracking URI and experiment come from the suite recorded in the results
    assert main(["sync", str(results_dir)]) == 0
    assert "2 cell(s) logged, 1 already present in experiment 'outage-test'" in capsys.readouterr().out
    runs = cell_runs(server.url, "outage-test")
    assert sorted(r.data.tags["harness.cell_id"] for r in runs) == sorted(r["cell_id"] for r in summary.results)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.metrics["perplexity"] > 1
    synced = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(synced) == 3  # the live one under the suite's parent, the synced ones under a sync parent
    assert main(["sync", str(results_dir), "--tracking-uri", server.url, "--experiment", "outage-test"]) == 0
    assert "0 cell(s) logged, 3 already present" in capsys.readouterr().out
    assert len(cell_runs(server.url, "outage-test")) == 3


def test_sync_to_an_unreachable_server_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from tests.test_repro_check import GOOD, write_results

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = write_results(tmp_path / "res", GOOD)
    assert main(["sync", str(folder), "--tracking-uri", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: error: --tracking-uri: expected a reachable MLflow store")
