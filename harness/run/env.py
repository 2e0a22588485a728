"""What every stage of a run receives: the suite, the run's options, the plugins,
the results store and the device, in one narrow, read-only environment.

Options reach every stage from here (``env.options.progress`` turns every
progress bar off, calibration's included); no stage reaches back into the runner.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    import torch

    from harness.plugins import Plugins
    from harness.run.cells import Cell
    from harness.run.lock import RunLock
    from harness.run.quiet import RunLog
    from harness.run.record import CellRecord
    from harness.store import ResultStore
    from harness.suite import Suite


_TERMINAL: list[TextIO] = []
"""Where ``log`` writes while a plugin's output is captured (``harness.run.quiet``); else sys.stderr."""


def log(message: str) -> None:
    print(f"[harness] {message}", file=_TERMINAL[-1] if _TERMINAL else sys.stderr, flush=True)


@contextmanager
def terminal(stream: TextIO) -> Iterator[None]:
    """Inside, ``log`` writes to ``stream`` whatever sys.stderr is."""
    _TERMINAL.append(stream)
    try:
        yield
    finally:
        _TERMINAL.pop()


@dataclass
class RunOptions:
    results_root: Path = Path("results")
    force: bool = False
    limit: int | None = None
    progress: bool = True
    command: str = ""
    model_key: str | None = None
    """How errors name a model: None for the suite's ``models[i]``, '--model' where the CLI replaced them."""
    verbose: bool = False
    """Library warnings and progress bars on the terminal; otherwise in ``run.log`` (harness.run.quiet)."""
    calibration_cache: Path | None = None
    """Where calibration statistics are cached: None for ``cache_dir()/calibration`` (the Ray executor shares
    them through the results store)."""
    shared: bool = False
    """``--shared``: share the results directory with other runs, each cell computed by one (harness.run.lock)."""


@dataclass(frozen=True)
class RunEnv:
    suite: Suite
    options: RunOptions
    plugins: Plugins
    store: ResultStore
    device: torch.device
    runlog: RunLog | None = None
    """Where plugins' library output goes (``harness.run.quiet``); None: left where it is."""
    lock: RunLock | None = None
    """The run's lock on the results directory and its claims on cells (``harness.run.lock``); None: no lock
    (a Ray task: the driver holds it)."""

    def captured(self, what: str):
        """A context in which a plugin's stdout/stderr go to the run log (a no-op without one)."""
        from contextlib import nullcontext

        return nullcontext() if self.runlog is None else self.runlog.capture(what)

    def pending(self, cell: Cell) -> bool:
        """True where ``cell`` is to be computed: not done yet and not claimed by another run, or ``--force``."""
        if self.options.force:
            return True
        return not self.store.done(cell.id) and (self.lock is None or not self.lock.blocked(cell.id))

    def claim(self, cell: Cell) -> bool:
        """Claim ``cell`` just before computing it: False where another run computes it (``--shared``) or
        has by now."""
        return self.lock is None or self.lock.claim(cell.id)


class CellSink(Protocol):
    """Where a session hands its cells: the runner's summary, hooks and trackers."""

    def skip(self, cell: Cell) -> None: ...

    def collect(self, cell: Cell, record: CellRecord, path: Path) -> None: ...
