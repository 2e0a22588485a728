"""A third-party plugin installed with pip, and MLflow through a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_suite

PLUGIN_SRC = ROOT / "tests" / "third_party_plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> dict[str, str]:
    """pip-installs tests/third_party_plugin into a fresh target directory; the
    environment that puts it on sys.path (and allows its entry point)."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(PLUGIN_SRC),
        ],
        check=True,
        capture_output=True,
        cwd=build,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT)])
    env["HARNESS_LOAD_PLUGINS"] = env["HARNESS_LOAD_PLUGINS"] + ",example"
    return env


def harness_cli(args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_installed_plugin_appears_in_harness_plugins(installed_plugin):
    proc = harness_cli(["plugins", "--json"], installed_plugin)
    assert proc.returncode == 0, proc.stderr
    infos = {i["name"]: i for i in json.loads(proc.stdout) if "name" in i}
    assert infos["example"]["version"] == "0.3.1"
    assert infos["example"]["distribution"] == "harness-plugin-example"
    assert infos["example"]["registered"] == {"decomposer": ["example-rsvd"]}


def test_installed_plugin_is_not_loaded_unless_allowed(installed_plugin):
    env = dict(installed_plugin)
    env["HARNESS_LOAD_PLUGINS"] = env["HARNESS_LOAD_PLUGINS"].replace(",example", "")
    proc = harness_cli(["plugins", "--json"], env)
    assert "example" not in {i.get("name") for i in json.loads(proc.stdout)}


def test_installed_plugin_runs_in_a_suite(installed_plugin, tiny_model_dir, tmp_path):
    suite = write_suite(
        tmp_path / "tp.toml",
        f"""
        name = "third-party"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.5]
        [[methods]]
        name = "example-rsvd"
        options = {{ niter = 4 }}
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 32, max_windows = 2 }}
        [[profilers]]
        name = "params"
    """,
    )
    proc = harness_cli(
        ["run", str(suite), "--results", str(tmp_path / "r"), "--no-progress"], installed_plugin, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "r" / "third-party" / "cells").glob("*.json")]
    by_method = {(r["method"] or {}).get("name"): r for r in results}
    assert by_method["example-rsvd"]["provenance"]["plugins"]["example"] == "0.3.1"
    # a randomized SVD with enough power iterations matches the exact one on ranks and sizes
    assert by_method["example-rsvd"]["ranks"] == by_method["svd"]["ranks"]
    assert by_method["example-rsvd"]["metrics"]["params_kept"] == by_method["svd"]["metrics"]["params_kept"]


# ---------------------------------------------------------------- mlflow server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 90 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.server
def test_cells_reach_a_real_mlflow_server(mlflow_server, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.run.runner import RunOptions, run_suite
    from harness.suite import load_suite

    suite = write_suite(
        tmp_path / "srv.toml",
        f"""
        name = "server"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.5, 0.25]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 32, max_windows = 2 }}
        [[trackers]]
        name = "mlflow"
        options = {{ tracking_uri = "{mlflow_server}", experiment = "server-test" }}
    """,
    )
    summary = run_suite(load_suite(suite), RunOptions(results_root=tmp_path / "r", progress=False))
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`harness.status` = 'ok'")
    assert {r.data.tags["harness.cell_id"] for r in runs} == {r["cell_id"] for r in summary.results}
    for run in runs:
        assert run.data.metrics["perplexity"] > 1
        assert any(a.path.endswith(".json") for a in client.list_artifacts(run.info.run_id))
