"""Two runs on one results directory: never two computations of one cell (harness.run.lock).

The claims and the lock are tested in this process first (fast); then real
`harness run` processes on a tiny model: two `--shared` runs at once divide
the cells between them, and a second run without `--shared` waits for the
first and reuses its cells. A napping evaluator (a third-party distribution on
PYTHONPATH) appends "pid cell" to a log each time it evaluates a cell, so the
test counts computations; after the first ``free`` evaluations it waits until
the test creates a gate file, so the runs overlap where the test wants them to
whatever the machine's speed.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from harness.run.lock import Owner, RunLock, owner_json
from tests.conftest import ROOT, write_suite

NAP_PLUGIN = """
import os
import time
from dataclasses import dataclass

import harness


@dataclass(frozen=True)
class NapOptions:
    seconds: float = 0.2
    log: str = ""
    gate: str = ""
    free: int = 0


class Nap(harness.Evaluator):
    name = "nap"
    Options = NapOptions

    def evaluate(self, model, tokenizer, options, ctx):
        with open(options.log, "a") as stream:
            stream.write(f"{os.getpid()} {ctx.work_dir.name}\\n")
        with open(options.log) as stream:
            held = len(stream.read().split()) // 2 > options.free
        deadline = time.monotonic() + 300
        while held and not os.path.exists(options.gate) and time.monotonic() < deadline:
            time.sleep(0.05)  # evaluations after the first `free` wait until the test opens the gate
        time.sleep(options.seconds)
        return harness.EvalResult({"napped": options.seconds}, {}, {"napped": False})


@harness.hookimpl
def register_evaluators(register):
    register(Nap())
"""


# ---------------------------------------------------------------- in process (fast)
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_claim(lock: RunLock, cell_id: str, owner: Owner) -> None:
    lock.claims.mkdir(parents=True, exist_ok=True)
    lock.claim_path(cell_id).write_text(owner_json(owner))


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    first, second = RunLock(tmp_path, shared=True), RunLock(tmp_path, shared=True)
    second.me = Owner(os.getppid(), socket.gethostname(), time.time())  # a live process that is not us
    first.acquire()
    second.acquire()  # shared locks coexist
    try:
        assert second.claim("aa")
        assert not first.claim("aa") and first.blocked("aa")
        second.unclaim("aa", finished=True)
        assert not second.claim("aa")  # computed by it in this run: never again
        assert first.claim("aa")

        write_claim(first, "bb", Owner(dead_pid(), socket.gethostname(), time.time()))
        assert not first.blocked("bb") and first.claim("bb")  # the dead run's claim is taken over
        assert f'"pid": {os.getpid()}' in first.claim_path("bb").read_text()

        write_claim(first, "cc", Owner(dead_pid(), "elsewhere", time.time() - 60))
        assert first.blocked("cc") and not first.claim("cc")  # another host: honoured
        write_claim(first, "dd", Owner(dead_pid(), "elsewhere", time.time() - 2 * first.timeout))
        assert first.claim("dd")  # unless older than the timeout
    finally:
        first.release()
        second.release()
    assert {p.stem for p in first.claims.glob("*.json")} == {"cc"}  # released: all but the one the test wrote


def test_an_exclusive_lock_says_who_holds_it(tmp_path):
    holder = RunLock(tmp_path, command="harness run a.toml")
    holder.acquire()
    try:
        other = RunLock(tmp_path)
        other.me = Owner(os.getppid(), socket.gethostname(), time.time())
        line = other.waiting_line()
        assert f"pid {os.getpid()} on host {socket.gethostname()} since " in line
        assert "(harness run a.toml)" in line and "--shared" in line
        import fcntl

        fd = os.open(tmp_path / ".run" / "lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):  # a second open file description is refused
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        holder.release()


# ---------------------------------------------------------------- real runs
def install_nap_plugin(site: Path) -> None:
    info = site / "harness_plugin_nap-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-plugin-nap\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[harness]\nnap = harness_plugin_nap\n")
    (info / "RECORD").write_text("")
    (site / "harness_plugin_nap.py").write_text(NAP_PLUGIN)


class Runs:
    """`harness run` processes on a tiny suite with the napping evaluator (and MLflow, where asked)."""

    def __init__(self, tmp_path: Path, model_dir: Path, free: int = 0, mlflow: bool = False) -> None:
        self.tmp = tmp_path
        install_nap_plugin(tmp_path / "site")
        self.log = tmp_path / "nap.log"
        self.gate = tmp_path / "gate"
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        tracker = f'[[trackers]]\nname = "mlflow"\noptions = {{ tracking_uri = "{self.uri}" }}' if mlflow else ""
        self.suite = write_suite(
            tmp_path / "duo.toml",
            f"""
            name = "duo"
            device = "cpu"
            models = ["{model_dir}"]
            targets = [0.6, 0.4, 0.2]
            [[methods]]
            name = "svd"
            [[evaluators]]
            name = "nap"
            options = {{ log = "{self.log}", gate = "{self.gate}", free = {free} }}
            {tracker}
        """,
        )
        self.results = tmp_path / "r"
        self.cells = self.results / "duo" / "cells"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
            "HARNESS_LOAD_PLUGINS": os.environ["HARNESS_LOAD_PLUGINS"] + ",nap",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        self.procs: list[subprocess.Popen] = []
        if mlflow:  # create the database once, before runs open it at the same time
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=self.uri).create_experiment("duo")

    def start(self, *flags: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "harness.cli", "run", str(self.suite), "--results", str(self.results)]
        out = open(self.tmp / f"run{len(self.procs)}.out", "w")  # noqa: SIM115 - read back by output()
        proc = subprocess.Popen(
            [*command, "--no-progress", *flags], stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp
        )
        proc.out = out
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        proc.out.flush()
        return Path(proc.out.name).read_text()

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> str:
        proc.wait(timeout=timeout)
        return self.output(proc)

    def computed(self) -> Counter:
        """How often each cell was evaluated (by any run)."""
        lines = self.log.read_text().split() if self.log.exists() else []
        return Counter(lines[1::2])

    def open_gate(self) -> None:
        self.gate.touch()

    def done(self) -> set[str]:
        return {p.stem for p in self.cells.glob("*.json")} if self.cells.exists() else set()

    def wait_for(self, predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            failed = [p for p in self.procs if p.poll() not in (None, 0)]  # any run, not only the one waited on
            for gone in ([proc] if proc.poll() is not None else []) + failed:
                pytest.fail(f"harness run exited ({gone.returncode}) before {what}:\n{self.output(gone)[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.out.close()


@pytest.fixture
def runs(tmp_path, tiny_model_dir):
    made: list[Runs] = []

    def make(**kwargs) -> Runs:
        made.append(Runs(tmp_path, tiny_model_dir, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def summary_line(text: str) -> tuple[int, int]:
    found = re.search(r"(\d+) cells computed, (\d+) reused", text)
    assert found, text[-3000:]
    return int(found.group(1)), int(found.group(2))


@pytest.mark.slow
def test_two_shared_runs_divide_the_cells_and_compute_each_once(runs):
    duo = runs(mlflow=True)
    first, second = duo.start("--shared"), duo.start("--shared")
    # each holds one cell at the gate: both are in, neither took the other's
    duo.wait_for(lambda: len(duo.computed()) >= 2, first, "both runs to start a cell")
    duo.open_gate()
    outputs = [duo.finish(first), duo.finish(second)]
    assert first.returncode == 0 and second.returncode == 0, outputs[0][-2000:] + outputs[1][-2000:]
    counts = duo.computed()
    assert len(counts) == 4 and set(counts.values()) == {1}, counts  # every cell, once
    (c1, r1), (c2, r2) = summary_line(outputs[0]), summary_line(outputs[1])
    assert c1 + c2 == 4 and c1 + r1 == 4 and c2 + r2 == 4  # disjoint; each run's leaderboard whole
    assert c1 >= 1 and c2 >= 1  # both worked
    pids = Counter(line.split()[0] for line in duo.log.read_text().splitlines())
    assert sorted(pids.values()) == sorted([c1, c2])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=duo.uri)
    experiment = client.get_experiment_by_name("duo").experiment_id
    cell_runs = [r for r in client.search_runs([experiment]) if "harness.cell_id" in r.data.tags]
    assert Counter(r.data.tags["harness.cell_id"] for r in cell_runs) == Counter(dict.fromkeys(duo.done(), 1))
    assert not list((duo.results / "duo" / ".run" / "claims").glob("*.json"))  # every claim released


@pytest.mark.slow
def test_a_second_run_without_shared_waits_then_reuses(runs):
    duo = runs()
    first = duo.start()
    duo.wait_for(lambda: duo.log.exists(), first, "the first run's first cell")  # held at the gate
    second = duo.start()
    duo.wait_for(lambda: "is in use by" in duo.output(second), second, "the waiting line")
    waiting = next(line for line in duo.output(second).splitlines() if "is in use by" in line)
    assert f"pid {first.pid} on host {socket.gethostname()} since " in waiting
    duo.open_gate()
    out = duo.finish(first)
    assert first.returncode == 0, out[-3000:]
    out = duo.finish(second)
    assert second.returncode == 0, out[-3000:]
    assert summary_line(out) == (0, 4)
    assert set(duo.computed().values()) == {1} and len(duo.computed()) == 4
