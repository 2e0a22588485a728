"""After a run that was killed: its parent run ended, its cells under the next run's parent, each once.

A parent run is matched to a results directory by its tags ``harness.suite``
and ``harness.results_dir`` and to its process by ``harness.pid``,
``harness.host`` and ``harness.started``. When the next run on the directory
starts (``adopt``):

- a parent still RUNNING whose process is gone (same host: ``os.kill(pid, 0)``
  finds no such process; another host: older than a day) is ended as KILLED;
  one whose process lives is a ``--shared`` run beside this one and is left
  alone;
- every KILLED parent not yet taken over (SIGTERM, SIGINT, or just ended
  above) has its finished cell runs moved under the new parent (their tag
  ``mlflow.parentRunId`` rewritten; nothing is uploaded again), its
  half-logged ones (RUNNING or KILLED) deleted, and gets the tag
  ``harness.superseded_by``.

At its end the new run logs, under its parent, each reused cell that no cell
run of the directory holds (``log_missing``: saved by the killed run, which
died before logging it). Why move rather than reuse the old parent: the
killed run's parent keeps the true story (KILLED, when, by what), the new
parent's status, leaderboard and report belong to the run that completed the
suite, and no ended run is ever reopened.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

OWNER_TIMEOUT_S = 24 * 3600.0
"""A RUNNING parent of another host older than this is taken as dead (as a claim in harness's run lock)."""


def note(message: str) -> None:
    print(f"[harness] mlflow: {message}", file=sys.stderr, flush=True)


def owner_tags(results_dir: str) -> dict[str, str]:
    """The tags that tie a parent run to its results directory and its process."""
    return {
        "harness.results_dir": results_dir,
        "harness.pid": str(os.getpid()),
        "harness.host": socket.gethostname(),
        "harness.started": f"{time.time():.3f}",
    }


def alive(tags: dict[str, str]) -> bool:
    """True where the process that created a parent run with these tags may still run."""
    try:
        pid, host, started = int(tags["harness.pid"]), tags["harness.host"], float(tags["harness.started"])
    except (KeyError, ValueError):
        return False
    if host != socket.gethostname():
        return time.time() - started < OWNER_TIMEOUT_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def search(client: Any, experiment_id: str, where: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], where, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def parents(client: Any, experiment_id: str, suite: str, results_dir: str) -> list[Any]:
    """The parent runs of ``suite`` on ``results_dir`` (suite names are safe in a filter: harness.suite)."""
    runs = search(client, experiment_id, f"tags.`harness.suite` = '{suite}'")
    tags = [r.data.tags for r in runs]
    return [r for r, t in zip(runs, tags) if t.get("harness.results_dir") == results_dir and "harness.cell_id" not in t]


def children(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    return search(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def adopt(client: Any, experiment_id: str, suite: str, results_dir: str, parent_id: str) -> list[str]:
    """End the dead runs' parents as KILLED and move their cell runs under ``parent_id``; the ids taken over."""
    adopted = []
    for run in parents(client, experiment_id, suite, results_dir):
        run_id, tags = run.info.run_id, run.data.tags
        if run_id == parent_id or "harness.superseded_by" in tags:
            continue
        if run.info.status == "RUNNING":
            if alive(tags):
                continue
            client.set_tag(run_id, "harness.interrupted", "process gone (SIGKILL or a crash), found by the next run")
            client.set_terminated(run_id, "KILLED")
            note(
                f"run {run_id} was left RUNNING by pid {tags.get('harness.pid')} on {tags.get('harness.host')}, "
                "which is gone: ended as KILLED"
            )
        elif run.info.status != "KILLED":
            continue
        moved = 0
        for child in children(client, experiment_id, run_id):
            if child.info.status in ("FINISHED", "FAILED"):
                client.set_tag(child.info.run_id, "mlflow.parentRunId", parent_id)
                moved += 1
            else:  # half-logged when the run died: its cell is logged again, whole
                client.delete_run(child.info.run_id)
        client.set_tag(run_id, "harness.superseded_by", parent_id)
        note(f"{moved} cell run(s) of the killed run {run_id} moved under this run's parent {parent_id}")
        adopted.append(run_id)
    return adopted


def log_missing(tracker: Any, results: list[Any], directory: Path) -> int:
    """Log under the tracker's parent each reused cell that no cell run of the directory holds; how many."""
    from harness_mlflow import log_result

    client, experiment_id = tracker.client, tracker.experiment_id
    present = set()
    for parent in parents(client, experiment_id, tracker.suite_name, tracker.results_dir):
        for child in children(client, experiment_id, parent.info.run_id):
            if child.info.status in ("FINISHED", "FAILED"):
                present.add((child.data.tags.get("harness.cell_id"), child.data.tags.get("harness.status")))
    logged = 0
    for result in results:
        if result is None or (result.cell_id, result.status) in present:
            continue
        cell_file = directory / "cells" / f"{result.cell_id}.json"
        # only cells saved before this run began: a --shared partner logs its own
        if cell_file.exists() and cell_file.stat().st_mtime < tracker.started:
            log_result(client, experiment_id, tracker.parent_id, result, cell_file)
            logged += 1
    if logged:
        note(f"{logged} reused cell(s) the killed run never logged: logged under {tracker.parent_id}")
    return logged
