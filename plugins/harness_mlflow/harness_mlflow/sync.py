"""``harness sync RESULTS_DIR`` (a command of this plugin): log to MLflow the cells it does not have yet.

The results store is the record; MLflow is a view of it. When the tracking
server was unreachable during a run (the runner warns and carries on), or a
run was made without a tracker, ``harness sync`` logs every cell of the
directory that the experiment lacks, with the mlflow plugin's own
``log_result`` (same parameters, metrics, tags and artifacts as a live run),
nested under one parent run per sync. A cell counts as present when a
finished run of the experiment carries its ``harness.cell_id`` tag and its
status, so syncing twice logs nothing twice. A run left half-logged (still
RUNNING, or KILLED by an interruption while it was logged) is replaced.

The tracking URI and experiment default to the mlflow tracker's options in
the suite the cells were run with (recorded in their provenance), then to
``$MLFLOW_TRACKING_URI`` and the suite's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
from harness import HarnessError, read_results


@dataclass
class SyncSummary:
    tracking_uri: str | None
    experiment: str
    logged: int
    present: int
    replaced: int = 0


def tracker_defaults(results: list[dict]) -> tuple[str | None, str | None]:
    """(tracking_uri, experiment) of the mlflow tracker in the suite the cells were run with."""
    for result in results:
        suite = result.provenance.get("suite") or {}
        for tracker in suite.get("trackers") or []:
            if tracker.get("name") == "mlflow":
                options = tracker.get("options") or {}
                return options.get("tracking_uri"), options.get("experiment")
    return None, None


def logged_runs(client: Any, experiment_id: str) -> list[Any]:
    """Every active run of the experiment that carries a ``harness.cell_id`` tag."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += [run for run in page if "harness.cell_id" in run.data.tags]
        token = page.token
        if not token:
            return runs


def sync(
    results_dir: Path,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    log: Callable[[str], None] = print,
) -> SyncSummary:
    results_dir = Path(results_dir)
    results = read_results(results_dir)
    if not results:
        raise HarnessError(f"{results_dir}: expected cell results to sync, got none")
    default_uri, default_experiment = tracker_defaults(results)
    uri = tracking_uri or default_uri or os.environ.get("MLFLOW_TRACKING_URI")
    suite = str(results[0].get("suite") or results_dir.name)
    experiment = experiment or default_experiment or suite
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise HarnessError(f"harness sync needs mlflow (pip install mlflow): {exc}") from None

    from harness_mlflow import log_result

    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        runs = logged_runs(client, experiment_id)
    except Exception as exc:  # unreachable server, bad URI: nothing was logged
        reason = harness.first_line(exc, 300)
        raise HarnessError(
            f"--tracking-uri: expected a reachable MLflow store, got {uri or 'the default'}: {reason}"
        ) from None
    present = {
        (run.data.tags["harness.cell_id"], run.data.tags.get("harness.status"))
        for run in runs
        if run.info.status in ("FINISHED", "FAILED")
    }
    half_logged = [run for run in runs if run.info.status in ("RUNNING", "KILLED")]
    missing = [r for r in results if (r.cell_id, r.status) not in present]
    summary = SyncSummary(uri, experiment, 0, len(results) - len(missing))
    if not missing:
        return summary
    for run in half_logged:
        if any(run.data.tags["harness.cell_id"] == r.cell_id for r in missing):
            client.delete_run(run.info.run_id)
            summary.replaced += 1
    parent = client.create_run(
        experiment_id, run_name=f"{suite} (sync)", tags={"harness.suite": suite, "harness.sync": "true"}
    ).info.run_id
    try:
        for result in missing:
            log_result(client, experiment_id, parent, result, results_dir / "cells" / f"{result.cell_id}.json")
            summary.logged += 1
            log(f"logged {result.cell_id} ({result.status})")
        board = results_dir / "leaderboard.md"
        if board.exists():
            client.log_artifact(parent, str(board))
    except Exception as exc:
        raise HarnessError(
            f"--tracking-uri: the MLflow store {uri or 'default'} failed after {summary.logged} of {len(missing)} "
            f"cells ({harness.first_line(exc, 300)}); run harness sync again to log the rest"
        ) from None
    client.set_terminated(parent, "FINISHED")
    return summary
