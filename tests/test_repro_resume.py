"""Resume: `harness run` killed with SIGKILL at several points, then rerun.

The rerun completes without recomputing a finished cell (their files keep
their modification times; the run says "N cells computed, M reused"), and no
result file is ever half-written. A slow evaluator, installed as a third-party
distribution on PYTHONPATH, marks when each cell starts and sleeps, so the
kills land where intended: after the first cell file appears, in the middle of
a cell, and just after a later cell's file appears.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_suite

pytestmark = pytest.mark.slow

SLOW_PLUGIN = """
import os
import time
from dataclasses import dataclass

import harness


@dataclass(frozen=True)
class SlowOptions:
    seconds: float = 1.0
    markers: str = ""


class Slow(harness.Evaluator):
    name = "slow"
    Options = SlowOptions

    def evaluate(self, model, tokenizer, options, ctx):
        open(os.path.join(options.markers, ctx.work_dir.name + ".started"), "w").close()
        time.sleep(options.seconds)
        return harness.EvalResult({"slept": options.seconds}, {}, {"slept": False})


@harness.hookimpl
def register_evaluators(register):
    register(Slow())
"""


def install_slow_plugin(site: Path) -> None:
    info = site / "harness_plugin_slow-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: harness-plugin-slow\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[harness]\nslow = harness_plugin_slow\n")
    (info / "RECORD").write_text("")
    (site / "harness_plugin_slow.py").write_text(SLOW_PLUGIN)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"harness run exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_a_killed_run_resumes_without_recomputing_finished_cells(tmp_path, tiny_model_dir):
    install_slow_plugin(tmp_path / "site")
    markers = tmp_path / "markers"
    markers.mkdir()
    suite = write_suite(
        tmp_path / "resume.toml",
        f"""
        name = "resume"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.8, 0.6, 0.4, 0.2]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "slow"
        options = {{ seconds = 2.0, markers = "{markers}" }}
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 1 }}
    """,
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
        "HARNESS_LOAD_PLUGINS": os.environ["HARNESS_LOAD_PLUGINS"] + ",slow",
    }
    command = [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        str(suite),
        "--results",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    cells = tmp_path / "r" / "resume" / "cells"

    def done() -> dict[str, int]:
        return {p.stem: p.stat().st_mtime_ns for p in cells.glob("*.json")} if cells.exists() else {}

    def start() -> subprocess.Popen:
        for marker in markers.iterdir():
            marker.unlink()
        log = open(tmp_path / f"run{len(runs)}.log", "w")  # noqa: SIM115 - closed when the test ends
        runs.append(log)
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    def kill(proc: subprocess.Popen) -> None:
        proc.kill()  # SIGKILL: no handler, no finally blocks
        proc.wait()

    runs: list = []
    finished: dict[str, int] = {}
    try:
        # 1. just after the first cell's file appears
        proc = start()
        wait_for(lambda: len(done()) >= 1, proc, "the first cell file")
        kill(proc)
        finished = done()
        assert len(finished) >= 1

        # 2. in the middle of a cell: it has started, its file is not there
        proc = start()
        wait_for(lambda: any(m.stem not in done() for m in markers.glob("*.started")), proc, "a cell to start")
        time.sleep(0.3)
        kill(proc)
        interrupted = {m.stem for m in markers.glob("*.started")} - set(done())
        assert interrupted and done() == finished  # nothing new finished, nothing rewritten

        # 3. just after a later cell's file appears
        proc = start()
        wait_for(lambda: len(done()) > len(finished), proc, "another cell file")
        kill(proc)
        assert {k: v for k, v in done().items() if k in finished} == finished
        finished = done()
        assert interrupted <= set(finished)  # the interrupted cell was redone from its start
    finally:
        for log in runs:
            log.close()

    # 4. the rerun completes, computing only what is left
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = 5  # baseline + 4 targets
    left = total - len(finished)
    assert left >= 1
    assert f"{left} cells computed, {len(finished)} reused" in proc.stdout
    assert len(re.findall(r"\[harness\] skip ", proc.stderr)) == len(finished)
    final = done()
    assert len(final) == total
    assert {k: v for k, v in final.items() if k in finished} == finished  # finished files untouched
    for path in cells.glob("*.json"):
        assert json.loads(path.read_text())["status"] == "ok"  # every file whole
    assert not (tmp_path / "r" / "resume" / "work").exists() or not any((tmp_path / "r" / "resume" / "work").iterdir())
