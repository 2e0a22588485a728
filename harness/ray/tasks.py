"""What the Ray executor's workers run: the sequential runner's own code, one step per task.

Each task gets the ``Job`` (the suite and run options, as the driver resolved
them) and opens a ``ModelSession`` exactly as the sequential runner does; a
worker keeps its last session, so cells that land on the same worker load the
model once. The steps:

- ``plan_task``: the model's cells, which of them are pending (not in the
  store yet, or ``--force``), and for each pending cell the failed result the
  driver records if every attempt of its task dies;
- ``calibrate_task``: calibration statistics, collected once into the store's
  ``calibration/`` cache in the order the sequential runner asks for them;
- ``factorize_task``: one method's factorizations, written once to the store,
  one file per group (``harness.factorfiles``; ``harness.run.diskfactors``
  names the directory), for every cell of the method;
- ``cell_task``: one cell (baseline or allocate, truncate, evaluate), written
  to the store by ``ResultStore.save`` and returned. It opens the method's
  group files memory-mapped and reads only what it materializes: the groups
  its ranks keep, each up to its rank, brought to its own device.

A ``HarnessError`` (bad input) comes back as ``Refused`` and the driver exits 2
with its message, as the sequential run would; any other exception is a
failed cell, as in the sequential run.
"""

from __future__ import annotations

import functools
import os
import platform
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.factorfiles import FactorFileError
from harness.ray import factstore
from harness.run import diskfactors
from harness.run.cells import Cell, content_hash
from harness.run.env import RunOptions, log
from harness.run.record import CellRecord, error_record
from harness.run.runner import SuiteRunner
from harness.run.session import ModelSession
from harness.suite import Method, Suite


@dataclass(frozen=True)
class Job:
    """What every task of one run gets."""

    suite: Suite
    options: RunOptions
    threads: int
    """torch threads in every task: the count of a sequential run, so that the numbers are the same."""
    probe: str | None = None
    """A file the driver wrote in the results directory: a worker that cannot see it does not share the store."""
    kill_once: str | None = None
    """Tests: a marker file; the first cell task that creates it kills its own worker (SIGKILL)."""


@dataclass(frozen=True)
class Refused:
    """A HarnessError raised in a task: bad input, reported by the driver as one line, exit 2."""

    message: str


@dataclass(frozen=True)
class Plan:
    cells: list[Cell]
    fallbacks: dict[str, CellRecord]
    """Pending cell id -> its failed result without an error (recorded where every attempt of its task dies)."""
    versions: dict[str, str]


@dataclass(frozen=True)
class Factorized:
    """Where a method's factorizations are: ``path``, their directory in the store; None with ``error`` where
    factorizing failed, None without one where they cannot be stored (each cell then factorizes itself)."""

    path: str | None
    error: dict | None = None


_SESSIONS: dict[str, ModelSession] = {}


def session(job: Job, model_spec: str) -> ModelSession:
    """The worker's session of ``model_spec`` under ``job``: opened once, kept until another is needed."""
    torch.set_num_threads(job.threads)
    key = content_hash({"job": repr(job), "model": model_spec})  # the job names its run (its probe file)
    if key not in _SESSIONS:
        _SESSIONS.clear()
        runner = SuiteRunner(job.suite, job.options)
        _SESSIONS[key] = runner.open_session(model_spec)
        torch.use_deterministic_algorithms(True, warn_only=True)  # as after the sequential run's first cell
    return _SESSIONS[key]


def guarded(task: Callable[..., Any]) -> Callable[..., Any]:
    """HarnessError -> Refused; a Refused input (an earlier step's) is passed on without running."""

    @functools.wraps(task)
    def run(*args: Any) -> Any:
        refused = next((a for a in args if isinstance(a, Refused)), None)
        if refused is not None:
            return refused
        try:
            return task(*args)
        except HarnessError as exc:
            return Refused(str(exc))

    return run


# ---------------------------------------------------------------- tasks
@guarded
def plan_task(job: Job, model_spec: str) -> Plan:
    check_shared(job)
    current = session(job, model_spec)
    cells = current.cells()
    fallbacks = {c.id: current.failed(c, None) for c in cells if current.env.pending(c)}
    return Plan(cells, fallbacks, current.versions())


@guarded
def calibrate_task(job: Job, model_spec: str, needs: list[list[str]]) -> dict | None:
    """Collect (or find cached) each list of statistics in turn; the error record where collecting failed."""
    current = session(job, model_spec)
    try:
        for kinds in needs:
            if not current.prepared.served_blockwise(set(kinds)):  # the pipeline collects those in its own pass
                current.stats(set(kinds))
    except HarnessError:
        raise
    except Exception as exc:  # as in the sequential run, it fails the cells of the methods that need it
        return error_record(exc)
    return None


@guarded
def factorize_task(job: Job, model_spec: str, method: Method, calibration_error: dict | None) -> Factorized:
    """The method's factorizations in its per-group files (``harness.run.diskfactors``): found there where
    an earlier task or run wrote them for the same identity, else factorized and written, one file a group."""
    if calibration_error is not None:
        return Factorized(None, calibration_error)
    current = session(job, model_spec)
    files = diskfactors.method_files(current.env, current.loaded.fingerprint, method, always=True)
    if diskfactors.reuse(files, job.options.force) is not None:
        return Factorized(str(files.directory))
    files.reset()
    try:
        factorizations, seconds = current.factorize(method)
    except HarnessError:
        raise
    except Exception as exc:
        return Factorized(None, error_record(exc))
    try:
        files.finish(factorizations, seconds)
    except factstore.Unsupported as exc:
        log(f"warning: {method.label}: factorizations cannot be stored ({exc}); each of its cells factorizes anew")
        return Factorized(None)
    return Factorized(str(files.directory))


@guarded
def cell_task(job: Job, model_spec: str, cell: Cell, factorized: Factorized | None) -> CellRecord:
    current = session(job, model_spec)
    count_attempt(current, cell)
    kill_once(job)
    result = current.attempt(cell, lambda: compute(current, cell, factorized))
    current.env.store.save(result)
    return result


def compute(current: ModelSession, cell: Cell, factorized: Factorized | None) -> CellRecord:
    """The cell's result, from the stored factorizations: what the sequential runner computes for it."""
    if cell.is_baseline or factorized is None:  # only the baseline has no factorizations
        return current.compute_baseline(cell)
    if factorized.error is not None:
        return current.failed(cell, factorized.error)
    found = None if factorized.path is None else stored(current, cell.method)
    factorizations, seconds = found or current.factorize(cell.method)
    return current.compute_cell(cell, factorizations, seconds)


def stored(current: ModelSession, method: Method) -> tuple[list, float] | None:
    """The method's factorizations, memory-mapped from its group files: each cell reads the groups it
    materializes, each up to the rank it chose, onto its own device; None (logged) where they cannot be read."""
    env = current.env
    files = diskfactors.method_files(env, current.loaded.fingerprint, method, always=True, device=env.device)
    try:
        found, reason = files.load(), f"{files.manifest}: no stored factorizations of this identity"
    except FactorFileError as exc:
        found, reason = None, str(exc)
    if found is None:
        log(f"warning: {reason}; the cell factorizes {method.label} itself")
    return found


# ---------------------------------------------------------------- checks
def check_shared(job: Job) -> None:
    if job.probe and not Path(job.probe).exists():
        root = job.options.results_root
        raise HarnessError(
            f"--results {root}: expected a directory shared by every Ray node at the same path, got one that "
            f"node {platform.node()} does not see (put it on shared storage such as NFS)"
        )


def count_attempt(current: ModelSession, cell: Cell) -> None:
    """Count the cell's attempts in its work directory (removed once its result is saved); say so on a retry."""
    counter = current.env.store.work_dir(cell.id) / "ray-attempts"
    earlier = int(counter.read_text() or 0) if counter.exists() else 0
    if earlier:
        log(f"cell {cell.label}: attempt {earlier + 1} (an earlier attempt's worker died)")
    counter.write_text(str(earlier + 1))


def kill_once(job: Job) -> None:
    """Fault injection for tests: the first task to create ``job.kill_once`` dies as a killed worker does."""
    if not job.kill_once:
        return
    try:
        os.close(os.open(job.kill_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
