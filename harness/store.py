"""The results store: one JSON file per cell, written atomically.

Layout of ``results/<suite>/``::

    cells/<cell id>.json   one result per cell (schema: harness/run/record.py)
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
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

CELL_ID = re.compile(r"^[0-9a-f]{1,64}$")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


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

    def load(self, cell_id: str) -> dict | None:
        path = self.path(cell_id)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def done(self, cell_id: str) -> bool:
        result = self.load(cell_id)
        return result is not None and result.get("status") == "ok"

    def save(self, result: dict) -> Path:
        path = self.path(result["cell_id"])
        try:
            atomic_write_json(path, result)
        except OSError as exc:  # disk full, directory removed or made read-only mid-run
            raise HarnessError(f"{path}: cannot write the cell result: {exc.strerror or exc}") from None
        shutil.rmtree(self.work_dir(result["cell_id"], create=False), ignore_errors=True)
        return path

    def work_dir(self, cell_id: str, create: bool = True) -> Path:
        path = self.path(cell_id).parent.parent / "work" / cell_id
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def all_results(self) -> list[dict]:
        return _read_cells(self.cells)


def _read_cells(cells: Path) -> list[dict]:
    results = []
    for path in sorted(cells.glob("*.json")):
        try:
            results.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return results


def read_results(directory: Path) -> list[dict]:
    """Every cell result under a suite's results directory (``cells/*.json``)."""
    directory = Path(directory)
    cells = directory / "cells"
    if not cells.is_dir():
        raise HarnessError(f"{directory}: not a results directory (no cells/ folder)")
    return _read_cells(cells)
