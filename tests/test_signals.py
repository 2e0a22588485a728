"""SIGTERM and SIGKILL in the middle of a suite, with the real MLflow tracker (SQLite in tmp_path).

The napping evaluator of tests/test_lock.py lets two cells through and holds
the third at a gate, so the signal always lands inside a cell. SIGTERM: exit
143, every MLflow run of the killed run ended (its parent KILLED), nothing
RUNNING; SIGKILL: the parent stays RUNNING until the rerun ends it as KILLED.
Either way the rerun computes only what is left, and the suite's MLflow view
ends with every cell once, under the rerun's parent.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from tests.test_lock import Runs, summary_line

pytestmark = pytest.mark.slow


@pytest.fixture
def duo(tmp_path, tiny_model_dir):
    made = Runs(tmp_path, tiny_model_dir, free=2, mlflow=True)
    yield made
    made.close()


def mlflow_runs(duo: Runs) -> tuple[list, list]:
    """(parents, cell runs) of the suite's experiment, deleted ones left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=duo.uri)
    experiment = client.get_experiment_by_name("duo").experiment_id
    every = client.search_runs([experiment])
    cells = [r for r in every if "harness.cell_id" in r.data.tags]
    return [r for r in every if "harness.cell_id" not in r.data.tags], cells


def stop_in_a_cell(duo: Runs, how: signal.Signals) -> tuple[int, set[str]]:
    """Start a run, let two cells finish, signal it while the third is held; (exit status, cells done)."""
    proc = duo.start()
    duo.wait_for(lambda: len(duo.computed()) >= 3 and len(duo.done()) >= 2, proc, "the third cell to start")
    proc.send_signal(how)
    proc.wait(timeout=120)
    done = duo.done()
    assert len(done) == 2, duo.output(proc)[-3000:]
    return proc.returncode, done


def rerun_and_check(duo: Runs, done: set[str], old_parent: str) -> None:
    duo.open_gate()
    proc = duo.start()
    out = duo.finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert summary_line(out) == (2, 2)  # the two left computed, the two done reused
    counts = duo.computed()
    assert all(counts[c] == 1 for c in done)  # finished cells never recomputed
    parents, cells = mlflow_runs(duo)
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    old = next(r for r in parents if r.info.run_id == old_parent)
    new = next(r for r in parents if r.info.run_id != old_parent)
    assert old.info.status == "KILLED" and old.data.tags["harness.superseded_by"] == new.info.run_id
    assert Counter(r.data.tags["harness.cell_id"] for r in cells) == Counter(dict.fromkeys(duo.done(), 1))
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {new.info.run_id}  # every cell once, one parent
    assert {r.info.status for r in cells} == {"FINISHED"}


def test_sigterm_ends_the_mlflow_runs_as_killed_and_the_rerun_resumes(duo):
    status, done = stop_in_a_cell(duo, signal.SIGTERM)
    assert status == 143, duo.output(duo.procs[-1])[-3000:]
    assert "harness: interrupted by SIGTERM; finished cells are saved" in duo.output(duo.procs[-1])
    parents, cells = mlflow_runs(duo)
    assert [r.info.status for r in parents] == ["KILLED"]  # not left RUNNING
    assert sorted(r.data.tags["harness.cell_id"] for r in cells) == sorted(done)
    assert {r.info.status for r in cells} == {"FINISHED"}
    assert not list((duo.results / "duo" / ".run" / "holders").glob("*.json"))  # the lock let go
    rerun_and_check(duo, done, parents[0].info.run_id)


def test_after_sigkill_the_rerun_ends_the_dead_parent_and_holds_every_cell_once(duo):
    status, done = stop_in_a_cell(duo, signal.SIGKILL)
    assert status == -signal.SIGKILL
    parents, _ = mlflow_runs(duo)
    assert [r.info.status for r in parents] == ["RUNNING"]  # what a SIGKILL leaves behind
    rerun_and_check(duo, done, parents[0].info.run_id)
    out = duo.output(duo.procs[-1])
    assert f"was left RUNNING by pid {duo.procs[0].pid}" in out and "ended as KILLED" in out
