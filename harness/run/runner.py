"""Run a suite: per model, load once, calibrate once, factorize each method once,
then allocate, truncate, evaluate and record every cell of the grid.

Every finished cell is written to the results store at once (atomically), so a
crash or kill loses no finished cell; a rerun skips the cells already there. A
run holds a lock on its results directory (``harness.run.lock``): a second run
waits for it, or, under ``--shared``, runs beside it and computes only the cells
nobody else claimed, then waits for the others' cells and reuses them. SIGINT
and SIGTERM stop the run cleanly (``harness.run.interrupt``): the trackers hear
``interrupted`` (MLflow ends its runs as KILLED) and the claims are released. A
cell whose plugin raises is recorded as failed with its error and the others
go on; the run's exit status says so at the end. The stages live beside this
module: ``session`` (one model), ``prepare`` (calibration, factorization),
``allocate`` (ranks), ``measure`` (evaluators, profilers), ``record`` (the result).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import first_line
from harness.models import resolve_device
from harness.plugins import get_plugins
from harness.run.env import RunEnv, RunOptions, log
from harness.run.interrupt import Interrupted, interruptible
from harness.run.lock import RunLock
from harness.run.quiet import run_log
from harness.run.session import ModelSession, open_session
from harness.store import ResultStore

if TYPE_CHECKING:
    import torch

    from harness.run.cells import Cell
    from harness.run.record import CellRecord
    from harness.suite import Suite

__all__ = ["RunOptions", "RunSummary", "SuiteRunner", "run_suite"]

POLL_S = 0.5
"""How often a ``--shared`` run looks whether the cells other runs compute are in the store yet."""


@dataclass
class RunSummary:
    results_dir: Path
    results: list[CellRecord] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0
    leaderboard: str | None = None
    """The leaderboard's markdown, once written (with plots and report.html) at the end of the run."""

    @property
    def failed(self) -> list[CellRecord]:
        return [r for r in self.results if not r.ok]


def run_suite(suite: Suite, options: RunOptions) -> RunSummary:
    return SuiteRunner(suite, options).run()


class SuiteRunner:
    """The suite-level work: models in turn, hooks, trackers, skipped and computed cells, reports."""

    def __init__(self, suite: Suite, options: RunOptions) -> None:
        self.suite = suite
        self.options = options
        self.plugins = get_plugins()
        self.store = ResultStore(Path(options.results_root) / suite.name)
        self.runlog = run_log(self.store.root, options.verbose)
        self.started = time.time()
        self.lock = RunLock(self.store.root, options.shared, options.command, self.settled)
        self.env = RunEnv(suite, options, self.plugins, self.store, self.resolve_device(), self.runlog, self.lock)
        self.summary = RunSummary(self.store.root)
        self.trackers = Trackers(suite, self.plugins, self.store.root)
        self.seen: set[str] = set()
        """Cells in the summary already (computed or reused): a cell is in it once."""
        self.deferred: list[Cell] = []
        """Cells other runs (``--shared``) compute: waited for at the end of the model (``settle``)."""

    def resolve_device(self) -> torch.device:
        return resolve_device(self.suite.device)

    def run(self) -> RunSummary:
        """The suite, under the results directory's lock, with SIGINT / SIGTERM raising ``Interrupted``."""
        with self.runlog.open(), interruptible():
            try:
                self.lock.acquire()  # a Ctrl-C while waiting for it stops here
                return self._run()
            finally:
                self.lock.release()

    def _run(self) -> RunSummary:
        for name, error in self.plugins.failures.items():
            log(f"warning: plugin {name!r} failed to load and is skipped: {error}")
        self.trackers.call("start", self.suite, None, self.store.root)
        self.plugins.pm.hook.harness_suite_start(suite=self.suite, results_dir=self.store.root)
        stopped: Interrupted | None = None
        try:
            for model in self.suite.models:
                self.run_model(model)
            self.write_reports()
        except Interrupted as exc:
            stopped = exc
            raise
        finally:
            self.plugins.pm.hook.harness_suite_end(suite=self.suite, results=self.summary.results)
            if stopped is None:
                self.trackers.call("end", self.suite, self.summary.results, self.store.root)
            else:
                self.trackers.call("interrupted", self.suite, self.summary.results, self.store.root, stopped.name)
        return self.summary

    def write_reports(self) -> None:
        """Leaderboard, Pareto plots and report.html, written before the trackers end (so they can log them)."""
        from harness.report import html

        title = f"Leaderboard: {self.suite.name}"
        try:
            self.summary.leaderboard = html.write_all(self.summary.results, self.store.root, title)
        except Exception as exc:  # a report must never cost the results: `harness report` can redo it
            log(f"warning: writing the report failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ models
    def model_key(self, model_spec: str) -> str:
        """'suite.toml: models[i]' (or '--model' where the command line replaced the suite's models)."""
        if self.options.model_key:
            return self.options.model_key
        return f"{self.suite.file}: models[{self.suite.models.index(model_spec)}]"

    def run_model(self, model_spec: str) -> None:
        session = self.open_session(model_spec)
        try:
            session.run()
            self.settle(session.run)
        finally:
            session.close()

    def settle(self, rerun: Callable[[], None]) -> None:
        """The cells other runs were computing (``--shared``): wait until each is in the store (then reused)
        or its claim is gone without a result (that run died or stopped: ``rerun`` computes what is left)."""
        while self.deferred:
            cells, self.deferred = self.deferred, []
            owners = "; ".join(o.describe() for o in self.lock.elsewhere([c.id for c in cells]))
            log(f"waiting for {len(cells)} cell(s) that other runs compute ({owners or 'claims gone'})")
            while any(not self.settled(c.id) and self.lock.blocked(c.id) for c in cells):
                time.sleep(POLL_S)
            for cell in cells:
                if self.settled(cell.id):
                    self.skip(cell)
            if any(cell.id not in self.seen for cell in cells):
                rerun()

    def settled(self, cell_id: str) -> bool:
        """True where ``cell_id`` needs no computing by this run: done, or finished (also failed) by another run
        since this one started (a --shared run does not redo what its partner just failed)."""
        if self.store.done(cell_id):
            return True
        try:
            return self.store.path(cell_id).stat().st_mtime >= self.started
        except OSError:
            return False

    def open_session(self, model_spec: str) -> ModelSession:
        return open_session(self.env, self, model_spec, self.model_key(model_spec))

    # ------------------------------------------------------------ cells (the session's sink)
    def skip(self, cell: Cell) -> None:
        """A cell not to compute: done (reused), or another run computes it (deferred until it is in)."""
        if cell.id in self.seen:
            return
        if not self.options.force and not self.settled(cell.id):
            if cell not in self.deferred:
                self.deferred.append(cell)
                log(f"defer {cell.label}: another run is computing it")
            return
        self.seen.add(cell.id)
        self.summary.results.append(self.store.load(cell.id))
        self.summary.skipped += 1
        log(f"skip {cell.label} (done: {self.store.path(cell.id)})")

    def collect(self, cell: Cell, record: CellRecord, path: Path) -> None:
        """A computed cell's record, saved at ``path``: into the summary, then to the hooks and trackers."""
        self.lock.unclaim(cell.id, finished=True)
        self.seen.add(cell.id)
        self.summary.results.append(record)
        self.summary.computed += 1
        self.plugins.pm.hook.harness_cell_end(cell=cell, result=record)
        self.trackers.call("log_cell", cell, record, path)


class Trackers:
    """The suite's trackers; one that fails is warned about once and off for the rest of the run."""

    def __init__(self, suite: Suite, plugins: Any, results_dir: Path) -> None:
        self.items = [(t, plugins.get("tracker", t.name)) for t in suite.trackers]
        self.results_dir = results_dir
        self.off: set[str] = set()

    def call(self, method: str, *args: Any) -> None:
        for component, tracker in self.items:
            if component.label in self.off:
                continue
            call_args = list(args)
            if method == "start":
                call_args[1] = component.options
            name = method
            if method == "interrupted" and not hasattr(tracker, method):  # a tracker not built on harness.Tracker
                name, call_args = "end", call_args[:3]
            try:
                getattr(tracker, name)(*call_args)
            except Exception as exc:  # a tracker must never cost a result
                self.off.add(component.label)
                log(
                    f"warning: tracker {component.label!r} failed in {method}: {first_line(exc, 300)}; it is off "
                    f"for the rest of this run, results stay in the local store {self.results_dir / 'cells'}"
                    f"{hint(tracker, self.results_dir)}"
                )


def hint(tracker: Any, results_dir: Path) -> str:
    """The tracker's own word on how to log its results later (``harness.Tracker.catch_up_hint``)."""
    method = getattr(tracker, "catch_up_hint", None)
    text = method(results_dir) if method is not None else ""
    return f"; {text}" if text else ""
