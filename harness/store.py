"""The results store: one JSON file per cell (a ``CellRecord``), written atomically.

Layout of ``results/<suite>/``::

    cells/<cell id>.json   one record per cell (schema: harness/run/record.py)
    work/<cell id>/        partial progress of a cell in flight (removed when done)
    leaderboard.md|json    written at the end of a run (and by `harness leaderboard`)

A write goes to a temporary file in the same directory, is fsynced and then
renamed over the target: a crash or kill leaves the old file or the new one,
never half of one. A rerun treats a cell as done when its file says "ok".

A cell file that cannot be read as a record (truncated, edited, another
schema) is never silently dropped: ``scan_results`` lists it with the reason,
``read_results`` and ``ResultStore.load`` warn about it (one line per file),
and ``ResultStore.save`` moves it aside as ``<id>.json.corrupt`` (never
deleted) before writing the recomputed cell in its place.

A write that fails for want of space or permission (ENOSPC, EDQUOT, EROFS,
EACCES, EPERM, or any other OSError of the write path) is a ``StorageError``:
one line naming the directory, what could not be written and what to do; the
temporary file is removed, so every file written before is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from harness.errors import HarnessError
from harness.run.record import SCHEMA_VERSION, CellRecord

CELL_ID = re.compile(r"^[0-9a-f]{1,64}$")


# ---------------------------------------------------------------- files
FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""No room: free space, then rerun."""
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
"""No permission: make the directory writable, then rerun."""


class StorageError(HarnessError, OSError):
    """A file could not be written (disk full, read-only, no permission): one line naming the directory.

    A HarnessError (the CLI prints it on one line, exit 2) and an OSError (so
    that code catching OSError around a write still catches it); ``errno`` is
    the one the write failed with.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        OSError.__init__(self, message)
        self.errno = code


def storage_error(exc: OSError, path: Path, what: str = "") -> StorageError:
    """``exc`` (raised writing ``path``) as a StorageError naming ``path``'s directory and what to do."""
    if isinstance(exc, StorageError):
        return exc
    path = Path(path)
    code = exc.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    reason = f"{exc.strerror or exc}" + (f" ({name})" if name else "")
    if code in FULL:
        remedy = "free some space on it"
    elif code in READ_ONLY:
        remedy = "make it writable"
    else:
        remedy = "check the disk"
    thing = what or path.name
    return StorageError(
        f"{path.parent}: cannot write {thing}: {reason}; {remedy}; every file written before is intact", code
    )


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(stream)`` into a temporary file beside ``path``, fsynced, then renamed over ``path``.

    Any OSError on the way (the directory cannot be made, the disk is full, it
    is read-only) removes the temporary file and raises a ``StorageError``
    naming the directory; ``path`` keeps what it held before.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise storage_error(exc, path) from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):  # a read-only directory keeps it: a hidden .tmp no reader takes for a result
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def atomic_savefig(fig: Any, path: Path, **options: Any) -> Path:
    """A matplotlib figure saved atomically (format from ``path``'s suffix): a full disk leaves no half PNG."""
    path = Path(path)
    atomic_write(path, lambda stream: fig.savefig(stream, format=path.suffix.lstrip(".") or "png", **options))
    return path


def canonical_json(data: Any) -> str:
    """The one JSON text of ``data`` that content hashes are taken of (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


# ---------------------------------------------------------------- cells
@dataclass(frozen=True)
class Unreadable:
    """A cell file that is not a readable cell record, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    @property
    def warning(self) -> str:
        return f"{self}; this cell is left out (rerun the suite to recompute it)"


@dataclass
class Scan:
    """What a results directory holds: its readable records, and the files that are not one."""

    records: list[CellRecord] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


def stderr_warning(message: str) -> None:
    print(f"harness: warning: {message}", file=sys.stderr, flush=True)


class ResultStore:
    def __init__(self, root: Path, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.cells = self.root / "cells"
        self.warn = warn or _run_warning
        self._warned: set[tuple[Path, str]] = set()
        try:
            self.cells.mkdir(parents=True, exist_ok=True)
            # a probe of this process's own: two runs sharing the directory (--shared) open it at the same time,
            # and one's unlink took the other's probe (run1: "No such file or directory")
            probe = self.cells / f".write-probe-{os.getpid()}-{os.urandom(4).hex()}"
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
        """The cell's record; None where it is absent or cannot be read as one (warned about, once)."""
        path = self.path(cell_id)
        if not path.exists():
            return None
        record = read_record(path)
        if isinstance(record, Unreadable):
            if (path, record.reason) not in self._warned:
                self._warned.add((path, record.reason))
                self.warn(f"{record}; treated as not done: it is recomputed, the file kept as {path.name}.corrupt")
            return None
        return record

    def done(self, cell_id: str) -> bool:
        record = self.load(cell_id)
        return record is not None and record.ok

    def save(self, record: CellRecord) -> Path:
        path = self.path(record.cell_id)
        self.keep_aside(path)
        atomic_write_json(path, record.to_json())  # StorageError where the disk is full or read-only
        shutil.rmtree(self.work_dir(record.cell_id, create=False), ignore_errors=True)
        return path

    def keep_aside(self, path: Path) -> Path | None:
        """Move an unreadable ``path`` to ``<name>.corrupt`` (``.corrupt.1``, ... where taken): never lost."""
        if not path.exists() or not isinstance(read_record(path), Unreadable):
            return None
        aside = path.with_name(path.name + ".corrupt")
        number = 0
        while aside.exists():
            number += 1
            aside = path.with_name(f"{path.name}.corrupt.{number}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            raise storage_error(exc, aside, f"{aside.name} (the unreadable result kept aside)") from None
        self.warn(f"{path}: unreadable result moved to {aside.name}")
        return aside

    def work_dir(self, cell_id: str, create: bool = True) -> Path:
        path = self.path(cell_id).parent.parent / "work" / cell_id
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise storage_error(exc, path / ".", f"the work folder {path.name}/") from None
        return path


def _run_warning(message: str) -> None:
    from harness.run.env import log  # the run's log line: to the terminal even while a plugin's output is captured

    log(f"warning: {message}")


# ---------------------------------------------------------------- reading cell files
DICTS = (
    "model", "surgery", "ranks", "metrics", "higher_is_better", "evaluations", "sizes", "timing",
    "factorization_info", "provenance", "config",
)  # fmt: skip
OPTIONAL_DICTS = ("error", "method", "allocator", "target", "calibration")
LISTS = ("hardware_metrics", "artifacts")
STATUSES = ("ok", "failed")


def read_record(path: Path) -> CellRecord | Unreadable:
    """The record in ``path``, or ``Unreadable`` saying why it is not one (unreadable, not JSON, wrong schema)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return Unreadable(path, f"not a cell result: not UTF-8 text (byte {exc.start})")
    except OSError as exc:
        return Unreadable(path, f"cannot be read: {exc.strerror or exc}")
    if not text.strip():
        return Unreadable(path, "not a cell result: the file is empty (truncated?)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno}"
        return Unreadable(path, f"not a cell result: invalid JSON ({where}; truncated or edited?)")
    problem = schema_problem(data, path)
    if problem:
        return Unreadable(path, f"not a cell result: {problem}")
    try:
        return CellRecord.from_json(data, str(path))
    except (HarnessError, TypeError) as exc:
        return Unreadable(path, f"not a cell result: {str(exc).removeprefix(f'{path}: ')}")


def schema_problem(data: object, path: Path) -> str | None:
    """What makes ``data`` not a cell record of this schema (the first problem found), or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    if data.get("schema") != SCHEMA_VERSION:
        return f"schema: expected version {SCHEMA_VERSION}, got {data.get('schema')!r} (another harness version?)"
    missing = [k for k in ("cell_id", "suite", "status", "model") if k not in data]
    if missing:
        return f"expected the keys {', '.join(missing)}, got none"
    for key in ("cell_id", "suite", "status"):
        if not isinstance(data[key], str):
            return f"{key}: expected a string, got {type(data[key]).__name__}"
    if data["cell_id"] != path.stem:
        return f"cell_id: expected {path.stem!r} (the file's name), got {data['cell_id']!r}"
    if data["status"] not in STATUSES:
        return f"status: expected one of {', '.join(STATUSES)}, got {data['status']!r}"
    for key, kinds, expected in (
        *((k, (dict,), "an object") for k in DICTS),
        *((k, (dict, type(None)), "an object or null") for k in OPTIONAL_DICTS),
        *((k, (list,), "a list") for k in LISTS),
    ):
        if key in data and not isinstance(data[key], kinds):
            return f"{key}: expected {expected}, got {type(data[key]).__name__}"
    for name, value in (data.get("metrics") or {}).items():
        if not _number(value):
            return f"metrics.{name}: expected a number, got {value!r}"
    return None


def _number(value: object) -> bool:
    """A metric's value: a number (NaN and infinities included: they are flagged, not ranked) or null."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def scan_results(directory: Path) -> Scan:
    """Every ``cells/*.json`` of a suite's results directory: the records, and the files that are not one."""
    directory = Path(directory)
    cells = directory / "cells"
    if not cells.is_dir():
        raise HarnessError(f"{directory}: not a results directory (no cells/ folder)")
    scan = Scan()
    for path in sorted(cells.glob("*.json")):
        found = read_record(path)
        (scan.unreadable if isinstance(found, Unreadable) else scan.records).append(found)
    return scan


def read_results(directory: Path, warn: Callable[[str], None] | None = stderr_warning) -> list[CellRecord]:
    """Every readable cell record under a suite's results directory (``cells/*.json``).

    A file that is not one is left out with a warning line naming it and why
    (``warn``, default: stderr; None: silent). ``scan_results`` returns both.
    """
    scan = scan_results(directory)
    for bad in scan.unreadable:
        if warn is not None:
            warn(bad.warning)
    return scan.records
