"""`harness run --executor ray`: the smoke suite on a local Ray runtime with two workers gives the
sequential run's cells, numbers and MLflow runs; a killed worker's cell is retried; with no retries
left it is recorded as failed, the suite goes on, and a rerun computes only that cell.

The suite is suites/smoke.toml itself with `--model` set to the tiny random Llama of conftest (the
embedded model's factorization alone takes minutes on two cores) and `--limit 4`. Fault injection:
HARNESS_RAY_KILL_ONCE names a marker file; the first cell task to create it SIGKILLs its worker.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.ray.cluster import check_address, task_resources
from tests.conftest import ROOT, write_suite
from tests.test_bad_input import BASE

LIMIT = 4
SMOKE = ROOT / "suites" / "smoke.toml"
H100 = {"CPU": 32.0, "GPU": 4.0, "accelerator_type:H100": 1.0}


# ---------------------------------------------------------------- resources (no Ray needed)
def test_cpu_cells_ask_for_their_threads():
    assert task_resources("cpu", H100, None, 4) == {"num_cpus": 4}
    assert task_resources("auto", {"CPU": 8.0}, None, 2) == {"num_cpus": 2}


def test_gpu_cells_are_pinned_to_the_one_accelerator_type():
    expected = {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "H100"}
    assert task_resources("cuda", H100, None, 8) == expected
    assert task_resources("auto", H100, "H100", 8) == expected


@pytest.mark.parametrize(
    "device, cluster, accelerator, message",
    [
        ("cuda", {"CPU": 8.0}, None, "the Ray cluster has no GPUs"),
        ("cuda", {**H100, "accelerator_type:A100": 1.0}, None, "A100, H100: name one with --accelerator-type"),
        ("cuda", H100, "A100", r"expected a GPU kind of the cluster \(H100\), got 'A100'"),
        ("cpu", H100, "H100", "--accelerator-type: only for cells on GPUs"),
    ],
)
def test_resource_requests_that_cannot_hold_are_refused(device, cluster, accelerator, message):
    with pytest.raises(HarnessError, match=message):
        task_resources(device, cluster, accelerator, 1)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address", ["nonsense", "host:port", "http://x:1", "10.0.0.1:99999x"])
def test_malformed_addresses_are_refused(address):
    with pytest.raises(HarnessError, match=r"--address: expected HOST:PORT, ray://HOST:PORT or auto"):
        check_address(address)


# ---------------------------------------------------------------- command line (in process)
def cli(capsys, *argv: str) -> tuple[int, str]:
    from harness.cli import main

    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse
        status = exc.code
    return status, capsys.readouterr().err.strip()


def test_unknown_executor_is_bad_input(capsys, tmp_path):
    status, err = cli(capsys, "run", str(SMOKE), "--results", str(tmp_path), "--executor", "dask")
    assert status == 2 and "--executor: invalid choice: 'dask'" in err and len(err.splitlines()) == 1


def test_ray_flags_need_the_ray_executor(capsys, tmp_path):
    status, err = cli(capsys, "run", str(SMOKE), "--results", str(tmp_path), "--address", "127.0.0.1:1")
    assert (status, err) == (2, "harness: error: --address: only with --executor ray")


def test_unreachable_cluster_is_one_line_at_once(capsys, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_COLOR_PREFIX"):  # what connecting sets, undone afterwards
        monkeypatch.setenv(name, "0")
    address = f"127.0.0.1:{closed_port()}"
    status, err = cli(capsys, "run", str(SMOKE), "--results", str(tmp_path), "--executor", "ray", "--address", address)
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"harness: error: --address {address}: expected a running Ray cluster"), err


# ---------------------------------------------------------------- end to end (subprocesses)
def harness_run(tmp: Path, results: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "harness.cli", "run", str(SMOKE), "--model", str(tmp / "tiny")]
    command += ["--results", str(results), "--limit", str(LIMIT), "--no-progress", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{results}.db", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env, timeout=900)


def ray_run(tmp: Path, results: Path, *extra: str, kill: Path | None = None) -> subprocess.CompletedProcess:
    env = {"HARNESS_RAY_KILL_ONCE": str(kill)} if kill else {}
    return harness_run(tmp, results, "--executor", "ray", "--workers", "2", *extra, env=env)


def cells(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((results / "smoke" / "cells").glob("*.json"))}


def numbers(result: dict) -> dict:
    keys = ("status", "metrics", "ranks", "sizes", "evaluations", "hardware_metrics", "config")
    return {key: result[key] for key in keys}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("ray")
    shutil.copytree(tiny_model_dir, tmp / "tiny")
    sequential = harness_run(tmp, tmp / "seq")
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    ray = ray_run(tmp, tmp / "ray", kill=tmp / "killed")
    assert ray.returncode == 0, ray.stderr[-3000:]
    return {"tmp": tmp, "sequential": sequential, "ray": ray}


@pytest.mark.slow
def test_ray_cells_and_numbers_equal_the_sequential_run(runs):
    tmp = runs["tmp"]
    sequential, ray = cells(tmp / "seq"), cells(tmp / "ray")
    assert len(sequential) == 3 and sequential.keys() == ray.keys()
    for cell_id, result in sequential.items():
        assert numbers(ray[cell_id]) == numbers(result), cell_id
    boards = [json.loads((tmp / name / "smoke" / "leaderboard.json").read_text()) for name in ("seq", "ray")]
    assert boards[0]["rows"] == boards[1]["rows"]
    assert "3 cells computed, 0 reused" in runs["ray"].stdout
    assert not (tmp / "ray" / "smoke" / "factors").exists()  # shared while needed, then removed
    assert "factorizations reused" not in runs["ray"].stderr and "factorizes" not in runs["ray"].stderr


@pytest.mark.slow
def test_a_killed_worker_is_retried(runs):
    assert (runs["tmp"] / "killed").exists()
    assert "attempt 2 (an earlier attempt's worker died)" in runs["ray"].stderr


@pytest.mark.slow
def test_mlflow_gets_the_same_runs(runs):
    from mlflow.tracking import MlflowClient

    def logged(name: str) -> dict[str, dict]:
        client = MlflowClient(tracking_uri=f"sqlite:///{runs['tmp'] / name}.db")
        experiment = client.get_experiment_by_name("smoke")
        found = client.search_runs([experiment.experiment_id])
        return {r.data.tags["harness.cell_id"]: r.data.metrics for r in found if "harness.cell_id" in r.data.tags}

    sequential = logged("seq")
    assert len(sequential) == 3 and logged("ray") == sequential


@pytest.mark.slow
def test_no_retries_left_fails_the_cell_and_a_rerun_computes_only_it(runs, tmp_path):
    results = tmp_path / "ray"
    shutil.copytree(runs["tmp"] / "ray", results)
    before = cells(results)
    victim = next(i for i, r in before.items() if r["method"] and r["target"]["label"] == "keep=0.95")
    (results / "smoke" / "cells" / f"{victim}.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (results / "smoke" / "cells").glob("*.json")}

    failed = ray_run(runs["tmp"], results, "--retries", "0", kill=tmp_path / "killed")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "1 cells computed, 2 reused" in failed.stdout
    result = cells(results)[victim]
    assert result["status"] == "failed" and result["error"]["type"] == "WorkerCrashedError"
    assert result["provenance"]["hardware"] and result["model"]["fingerprint"] == before[victim]["model"]["fingerprint"]

    rerun = ray_run(runs["tmp"], results)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 cells computed, 2 reused" in rerun.stdout
    assert numbers(cells(results)[victim]) == numbers(before[victim])
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


@pytest.mark.slow
def test_gpu_cells_are_scheduled_on_the_accelerator_type_of_the_cluster(capsys, tmp_path, tiny_model_dir):
    """A local runtime that declares one GPU of kind H100 (a logical resource: the cells still compute on
    this CPU, as device "auto" finds no CUDA): the cells ask for it and run, each in a fresh worker."""
    ray = pytest.importorskip("ray")
    device_auto = BASE.replace("{tiny}", str(tiny_model_dir)).replace('device = "cpu"', 'device = "auto"')
    suite = write_suite(tmp_path / "gpu.toml", device_auto)
    run = ["run", str(suite), "--results", str(tmp_path / "r"), "--executor", "ray", "--no-progress"]
    ray.init(address="local", num_cpus=2, num_gpus=1, resources={"accelerator_type:H100": 1}, include_dashboard=False)
    capsys.readouterr()  # Ray's own start-up lines
    try:
        refused = cli(capsys, *run, "--accelerator-type", "A100")
        status, err = cli(capsys, *run)
    finally:
        ray.shutdown()
    assert refused == (2, "harness: error: --accelerator-type: expected a GPU kind of the cluster (H100), got 'A100'")
    assert status == 0, err[-3000:]
    assert "every cell asks for 1 CPU, 1 GPU, accelerator type H100" in err
    results = [json.loads(p.read_text()) for p in (tmp_path / "r" / "bad" / "cells").glob("*.json")]
    assert [r["status"] for r in results] == ["ok", "ok"]


# ---------------------------------------------------------------- the factor store (tasks in process, no Ray)
def test_a_cell_task_reads_only_its_groups_up_to_its_ranks(tmp_path, tiny_model_dir, monkeypatch):
    """The factorize task writes one memory-mapped file per group (no per-method file); a cell task reads
    from each group exactly the rows of the rank its allocator chose, nothing of the groups it leaves dense."""
    from harness.factorfiles import MappedLowRank
    from harness.ray import tasks
    from harness.run.env import RunOptions
    from harness.suite import load_suite

    suite = load_suite(write_suite(tmp_path / "suite.toml", BASE.replace("{tiny}", str(tiny_model_dir))))
    job = tasks.Job(suite, RunOptions(results_root=tmp_path / "r", progress=False), threads=1)
    spec = suite.models[0]
    reads: dict[str, set[int]] = {}
    rows = MappedLowRank.rows

    def counted(self, key, rank):
        reads.setdefault(self.names[0], set()).add(rank)
        return rows(self, key, rank)

    try:
        plan = tasks.plan_task(job, spec)
        factorized = tasks.factorize_task(job, spec, suite.methods[0], None)
        folder = Path(factorized.path)
        assert len(list(folder.glob("group-*.safetensors"))) == 14 and (folder / "factors.json").exists()
        assert not list((tmp_path / "r").rglob("*.pt")) and not (tmp_path / "r" / "bad" / "factorizations").exists()
        monkeypatch.setattr(MappedLowRank, "rows", counted)
        (cell,) = [c for c in plan.cells if c.method is not None]
        record = tasks.cell_task(job, spec, cell, factorized)
    finally:
        tasks._SESSIONS.clear()
    assert record.status == "ok", record.error
    chosen = {name: rank for name, rank in record.ranks.items() if rank is not None}
    assert chosen and reads == {name: {rank} for name, rank in chosen.items()}
    stored = {f.names[0]: f.stored_rank for f in files_of(folder).load()[0]}
    assert any(rank < stored[name] for name, rank in chosen.items())  # a read short of what the file holds


def files_of(folder: Path):
    """The MethodFiles of ``folder`` as its manifest names them (identity read back from the manifest)."""
    from harness.factorfiles import MethodFiles

    manifest = json.loads((folder / "factors.json").read_text())
    return MethodFiles(folder, manifest["identity"], {"harness_svd"})
