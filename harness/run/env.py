"""What every stage of a run receives: the suite, the run's options, the plugins,
the results store and the device, in one narrow, read-only environment.

Options reach every stage from here (``env.options.progress`` turns every
progress bar off, calibration's included); no stage reaches back into the runner.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from harness.plugins import Plugins
    from harness.run.cells import Cell
    from harness.run.record import CellRecord
    from harness.store import ResultStore
    from harness.suite import Suite


def log(message: str) -> None:
    print(f"[harness] {message}", file=sys.stderr, flush=True)


@dataclass
class RunOptions:
    results_root: Path = Path("results")
    force: bool = False
    limit: int | None = None
    progress: bool = True
    command: str = ""
    model_key: str | None = None
    """How errors name a model: None for the suite's ``models[i]``, '--model' where the CLI replaced them."""
    calibration_cache: Path | None = None
    """Where calibration statistics are cached: None for ``cache_dir()/calibration`` (the Ray executor shares
    them through the results store)."""


@dataclass(frozen=True)
class RunEnv:
    suite: Suite
    options: RunOptions
    plugins: Plugins
    store: ResultStore
    device: torch.device

    def pending(self, cell: Cell) -> bool:
        """True where ``cell`` is to be computed: not done yet, or ``--force``."""
        return self.options.force or not self.store.done(cell.id)


class CellSink(Protocol):
    """Where a session hands its cells: the runner's summary, hooks and trackers."""

    def skip(self, cell: Cell) -> None: ...

    def collect(self, cell: Cell, record: CellRecord, path: Path) -> None: ...
