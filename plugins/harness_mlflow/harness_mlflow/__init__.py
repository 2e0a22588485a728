"""MLflow tracker: a parent run per suite run, a nested run per computed cell.

Each cell run gets the cell's parameters (model, method, allocator, target,
options, seed, limit), its metrics under names MLflow accepts (lm-eval's
``acc,none`` becomes ``acc``; anything else outside MLflow's alphabet becomes
``_``), non-finite metrics as tags instead of values, and the cell JSON as an
artifact, and the tag ``harness.row`` (model | method | allocator | target,
the same across suites and over time, for MLflow's run comparison); the
parent run gets the leaderboard as an MLflow table (``leaderboard_table.json``:
one row per cell with its id, every metric and its significance mark), the
leaderboard markdown, report.html and the Pareto plots (every ``*.png`` in the
results directory) at the end. The store is
MLflow's own default (SQLite ``mlflow.db`` in the working directory) unless
``MLFLOW_TRACKING_URI`` or the suite's ``tracking_uri`` says otherwise. An
unreachable server costs a warning, never a result: the cells stay in the
local results store, and ``harness sync`` (this plugin's command, in
``harness_mlflow.sync``) logs them later with ``log_result`` (runs matched by
the tag ``harness.cell_id``).

Interruptions (``harness_mlflow.recover``): SIGINT / SIGTERM end the parent
run as KILLED (a cell run being logged at that moment too); a cell in flight
has no MLflow run yet (one is created only once its result is saved), so
nothing is left RUNNING. Each parent carries the tags ``harness.suite``,
``harness.results_dir``, ``harness.pid``, ``harness.host`` and
``harness.started``: the next run on the same directory ends a parent left
RUNNING by a dead process (SIGKILL, power cut) as KILLED and moves the cell
runs of every KILLED parent under its own (tag ``harness.superseded_by`` on
the old one), then, at its end, logs the reused cells that no run of the
directory holds (saved, but killed before MLflow heard of them), so the
suite's latest parent holds every cell once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness

__version__ = "0.1.0"

_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(name: str) -> str:
    """A metric name MLflow accepts."""
    return _BAD.sub("_", name.split(",")[0])


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[metric_key(prefix)] = str(value)[:6000]
    return out


def cell_params(result: harness.CellRecord) -> dict[str, str]:
    # the baseline has no method, allocator or target: logged as name "none"
    parts = {k: getattr(result, k) or {"name": "none"} for k in ("method", "allocator", "target", "surgery")}
    params = flatten("", parts, {})
    params.update(
        {
            "cell_id": result.cell_id,
            "model": result.model_id,
            "model_fingerprint": result.model["fingerprint"][:16],
            "seed": str(result.provenance.get("seed")),
            "limit": str(result.provenance.get("limit")),
        }
    )
    return params


@dataclass(frozen=True)
class MLflowOptions:
    tracking_uri: str | None = None
    """Default: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)."""
    experiment: str | None = None
    """Default: the suite's name."""
    http_retries: int = field(default=1, metadata={"minimum": 0})
    """Retries per request to a server (MLflow's own default waits minutes)."""
    http_timeout: int = field(default=10, metadata={"minimum": 1})


class MLflowTracker(harness.Tracker):
    name = "mlflow"
    Options = MLflowOptions
    description = "MLflow runs: parent per suite, nested per cell"

    def __init__(self) -> None:
        self.client = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self.results_dir = ""
        self.suite_name = ""
        self.started = 0.0
        self.adopted: list[str] = []
        """Parent runs of killed runs on the same results directory whose cells this run took over."""

    def start(self, suite, options: MLflowOptions, results_dir: Path) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(options.http_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(options.http_timeout))
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=options.tracking_uri)
        experiment = options.experiment or suite.name
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        from harness_mlflow import recover

        self.results_dir = str(Path(results_dir).resolve())
        self.suite_name, self.started = suite.name, time.time()
        tags = {"harness.suite": suite.name, **recover.owner_tags(self.results_dir)}
        run = self.client.create_run(self.experiment_id, run_name=f"{suite.name}", tags=tags)
        self.parent_id = run.info.run_id
        self.client.log_param(self.parent_id, "suite_file", suite.file)
        self.client.log_param(self.parent_id, "models", ",".join(suite.models))
        self.adopted = recover.adopt(self.client, self.experiment_id, suite.name, self.results_dir, self.parent_id)

    def catch_up_hint(self, results_dir: Path) -> str:
        return f"log them later with: harness sync {results_dir}"

    def log_cell(self, cell, result: harness.CellRecord, cell_file: Path) -> None:
        if self.client is None:
            return
        log_result(self.client, self.experiment_id, self.parent_id, result, cell_file)

    def end(self, suite, results, results_dir: Path) -> None:
        if self.client is None:
            return
        directory = Path(results_dir)
        # the leaderboard, report.html and the Pareto plots, written by the runner just before
        for path in [directory / "leaderboard.md", directory / "report.html", *sorted(directory.glob("*.png"))]:
            if path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        board = directory / "leaderboard.json"
        if board.exists():
            self.client.log_table(self.parent_id, leaderboard_table(json.loads(board.read_text())), TABLE)
        if self.adopted:  # cells a killed run saved but never logged
            from harness_mlflow import recover

            recover.log_missing(self, results, directory)
        self.client.set_terminated(self.parent_id, "FAILED" if any(not r.ok for r in results) else "FINISHED")

    def interrupted(self, suite, results, results_dir: Path, signal: str) -> None:
        """SIGINT / SIGTERM: the parent run ends as KILLED (a rerun moves its cells under its own parent)."""
        if self.client is None:
            return
        self.client.set_tag(self.parent_id, "harness.interrupted", signal)
        self.client.set_terminated(self.parent_id, "KILLED")


TABLE = "leaderboard_table.json"
"""The parent run's leaderboard as an MLflow table (``MlflowClient.load_table(experiment, TABLE)``)."""


def leaderboard_table(board: dict[str, Any]) -> dict[str, list]:
    """``leaderboard.json``'s rows as MLflow table columns: identity columns, the cell id, each metric
    (a number, None where the cell has none) and its significance mark ("", "≈" or "(few)").

    Rows computed over several calibration draws (``[calibration] draws``) hold the mean; the table then
    has ``draws`` (n, 1 for the others) and, per metric, ``<metric> std`` (sample standard deviation,
    ddof 1), ``<metric> min`` and ``<metric> max`` (None for rows of one draw)."""
    rows, marks = board.get("rows", []), board.get("marks") or [{} for _ in board.get("rows", [])]
    spreads = board.get("spread")
    ids = board.get("cell_ids") or [None] * len(rows)
    columns = [c for c in board.get("columns", []) if c not in board.get("metrics", [])]
    table: dict[str, list] = {"cell_id": list(ids), **{c: [row.get(c) for row in rows] for c in columns}}
    if spreads:
        table["draws"] = [len(draws) for draws in board.get("draws") or [[None]] * len(rows)]
    for metric in board.get("metrics", []):
        table[metric_key(metric)] = [_number(row.get(metric)) for row in rows]
        if any(metric in mark for mark in marks):
            table[f"{metric_key(metric)} mark"] = [mark.get(metric, "") for mark in marks]
        if spreads and any(metric in spread for spread in spreads):
            for what in ("std", "min", "max"):
                values = [(spread.get(metric) or {}).get(what) for spread in spreads]
                table[f"{metric_key(metric)} {what}"] = [_number(v) for v in values]
    if any("status" in row for row in rows):
        table["status"] = [row.get("status", "ok") for row in rows]
    return table


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def row_name(result: harness.CellRecord) -> str:
    """The same string for the same model x method x allocator x target in any suite, at any time:
    what MLflow's run comparison lines cells up by (the tag ``harness.row``)."""
    return " | ".join(result.row_key)


def log_result(client, experiment_id: str, parent_id: str | None, result: harness.CellRecord, cell_file: Path) -> str:
    """One nested run for ``result``; returns its run id."""
    label = f"{result.method_label} {(result.target or {}).get('label', '')}"
    tags = {
        "harness.cell_id": result.cell_id,
        "harness.status": result.status,
        "harness.row": row_name(result),
        "mlflow.runName": label.strip(),
    }
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    results_dir = Path(cell_file).parent.parent
    tags["harness.results_dir"] = str(results_dir.resolve())
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    try:
        fill_run(client, run_id, result, results_dir, cell_file)
    except BaseException:  # SIGINT / SIGTERM (or a failing store) half-way: never left RUNNING
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED" if result.ok else "FAILED")
    return run_id


def fill_run(client, run_id: str, result: harness.CellRecord, results_dir: Path, cell_file: Path) -> None:
    """The cell run's metrics, parameters, tags and artifacts."""
    from mlflow.entities import Metric, Param, RunTag

    metrics, flagged = [], []
    for name, value in result.metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.append(Metric(metric_key(name), float(value), 0, 0))
        else:
            flagged.append(name)
    tag_list = [RunTag("harness.flagged_metrics", ",".join(flagged))] if flagged else []
    if result.error:
        tag_list.append(RunTag("harness.error", f"{result.error['type']}: {result.error['message']}"[:5000]))
    params = [Param(k, v) for k, v in cell_params(result).items()]
    client.log_batch(run_id, metrics=metrics, params=params, tags=tag_list)
    client.log_artifact(run_id, str(cell_file))
    for artifact in result.artifacts:
        if (results_dir / artifact).exists():
            client.log_artifact(run_id, str(results_dir / artifact), artifact_path=str(Path(artifact).parent))


@harness.hookimpl
def register_trackers(register):
    register(MLflowTracker())
