"""The results store: one JSON file per cell (a ``CellRecord``), written atomically.

Layout of ``results/<suite>/``::

    cells/<cell id>.json   one record per cell (schema: harness/run/record.py)
    work/<cell id>/        partial progress of a cell in flight (removed when done)
    leaderboard.md|json    written at the end of a run (and by `harness leaderboard`)

A write goes to a temporary file in the same directory, is fsynced and then
renamed over the target: a crash or kill leaves the old file or the new one,
never half of one. A rerun treats a cell as done when its file says "ok".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from harness.errors import HarnessError
from harness.run.record import CellRecord

CELL_ID = re.compile(r"^[0-9a-f]{1,64}$")


# ---------------------------------------------------------------- files
def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(stream)`` into a temporary file beside ``path``, fsynced, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def canonical_json(data: Any) -> str:
    """The one JSON text of ``data`` that content hashes are taken of (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


# ---------------------------------------------------------------- cells
class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.cells = self.root / "cells"
        try:
            self.cells.mkdir(parents=True, exist_ok=True)
            probe = self.cells / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise HarnessError(
                f"results directory {self.root} cannot be written: expected a writable directory, "
                f"got {exc.strerror or exc}"
            ) from None

    def path(self, cell_id: str) -> Path:
        if not CELL_ID.match(cell_id):  # ids are content hashes: never a path
            raise ValueError(f"cell id: expected hexadecimal digits, got {cell_id!r}")
        return self.cells / f"{cell_id}.json"

    def load(self, cell_id: str) -> CellRecord | None:
        """The cell's record; None where it is absent or cannot be read as one."""
        path = self.path(cell_id)
        if not path.exists():
            return None
        return _read_record(path)

    def done(self, cell_id: str) -> bool:
        record = self.load(cell_id)
        return record is not None and record.ok

    def save(self, record: CellRecord) -> Path:
        path = self.path(record.cell_id)
        try:
            atomic_write_json(path, record.to_json())
        except OSError as exc:  # disk full, directory removed or made read-only mid-run
            raise HarnessError(f"{path}: cannot write the cell result: {exc.strerror or exc}") from None
        shutil.rmtree(self.work_dir(record.cell_id, create=False), ignore_errors=True)
        return path

    def work_dir(self, cell_id: str, create: bool = True) -> Path:
        path = self.path(cell_id).parent.parent / "work" / cell_id
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path


def _read_record(path: Path) -> CellRecord | None:
    try:
        return CellRecord.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (OSError, json.JSONDecodeError, HarnessError):
        return None


def read_results(directory: Path) -> list[CellRecord]:
    """Every cell record under a suite's results directory (``cells/*.json``)."""
    directory = Path(directory)
    cells = directory / "cells"
    if not cells.is_dir():
        raise HarnessError(f"{directory}: not a results directory (no cells/ folder)")
    records = (_read_record(path) for path in sorted(cells.glob("*.json")))
    return [record for record in records if record is not None]
