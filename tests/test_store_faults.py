"""Faults of the results store: cell files that cannot be read, writes that cannot be made.

An unreadable or schema-invalid cell file (truncated, edited, another schema)
is reported by every command that reads the store (one warning line per file,
naming it and why); ``harness leaderboard`` and ``harness report`` exit 1
unless ``--allow-missing``; ``harness run`` recomputes it and keeps the bad
file aside as ``<id>.json.corrupt``. A full disk (ENOSPC) or a read-only
results directory in the middle of a run stops it with one line naming the
directory (exit 2); every cell written before stays intact and the rerun
resumes. The end-to-end cases run a tiny model (two blocks of width 64).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

import harness
from harness.cli import main
from harness.errors import HarnessError
from harness.plugins import get_plugins
from harness.run.record import CellRecord
from harness.store import (
    ResultStore,
    StorageError,
    Unreadable,
    atomic_write_text,
    read_record,
    read_results,
    scan_results,
)
from tests.conftest import write_suite

DEV_FULL = Path("/dev/full")
"""Where it is the kernel's device, every write(2) to it fails with ENOSPC: a full disk."""
GOOD = ("aa01", "aa02")
BAD = {
    "bb01": '{"schema": 1, "cell_id": "bb01", "status": "o',  # truncated mid-write
    "bb02": json.dumps({"schema": 7, "cell_id": "bb02", "suite": "s", "status": "ok", "model": {}}),
    "bb03": json.dumps({"schema": 1, "cell_id": "bb03", "suite": "s", "status": "ok", "model": {}, "metrics": "x"}),
    "bb04": json.dumps({"schema": 1, "cell_id": "other", "suite": "s", "status": "ok", "model": {}}),
}
REASONS = {"bb01": "invalid JSON", "bb02": "schema", "bb03": "metrics", "bb04": "cell_id"}


def record(cell_id: str, target: float | None = None) -> CellRecord:
    method = None if target is None else {"name": "svd", "label": "svd"}
    return CellRecord(
        cell_id=cell_id,
        suite="s",
        status="ok",
        model={"id": "m", "fingerprint": "0" * 16},
        method=method,
        allocator=None if target is None else {"name": "uniform", "label": "uniform"},
        target=None if target is None else {"kind": "params", "value": target, "label": f"keep={target}"},
        metrics={"perplexity": 10.0 + (target or 0), "params_kept": 1e6 * (target or 1), "bytes_kept": 4e6},
        higher_is_better={"perplexity": False},
        sizes={"model_params": 2_000_000, "model_bytes": 8_000_000},
    )


def damaged_store(tmp_path: Path) -> Path:
    """A suite's results directory: two good cells and one file of every kind of damage (plus a binary one)."""
    store = ResultStore(tmp_path / "s")
    store.save(record(GOOD[0]))
    store.save(record(GOOD[1], 0.5))
    for cell_id, text in BAD.items():
        store.path(cell_id).write_text(text)
    store.path("bb05").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return store.root


def warnings_of(err: str) -> dict[str, str]:
    """cell id -> its warning line, for the lines of ``err`` that warn about a cell file."""
    lines = [line for line in err.splitlines() if "warning:" in line and "/cells/" in line]
    return {Path(line.split("warning: ")[1].split(":")[0]).stem: line for line in lines}


# ---------------------------------------------------------------- unreadable cell files
def test_read_results_warns_once_per_unreadable_file_naming_it_and_why(tmp_path, capsys):
    root = damaged_store(tmp_path)
    results = read_results(root)
    assert sorted(r.cell_id for r in results) == list(GOOD)
    warned = warnings_of(capsys.readouterr().err)
    assert sorted(warned) == [*BAD, "bb05"]
    for cell_id, reason in {**REASONS, "bb05": "UTF-8"}.items():
        assert reason in warned[cell_id] and str(root / "cells" / f"{cell_id}.json") in warned[cell_id]
    scan = scan_results(root)
    assert len(scan.records) == 2 and len(scan.unreadable) == 5
    assert isinstance(read_record(root / "cells" / "bb03.json"), Unreadable)


@pytest.mark.parametrize("command", ["leaderboard", "report"])
def test_leaderboard_and_report_exit_1_unless_allow_missing(command, tmp_path, capsys):
    root = damaged_store(tmp_path)
    assert main([command, str(root)]) == 1
    out, err = capsys.readouterr()
    assert len(warnings_of(err)) == 5
    assert "5 cell file(s) could not be read" in err and "--allow-missing" in err
    if command == "leaderboard":
        assert "svd" in out and "keep=0.5" in out  # the readable rows are still shown
    assert main([command, str(root), "--allow-missing"]) == 0
    assert len(warnings_of(capsys.readouterr().err)) == 5


def test_check_compare_show_and_baseline_name_the_unreadable_file(tmp_path, capsys):
    root = damaged_store(tmp_path)
    baseline = tmp_path / "baseline.json"
    assert main(["baseline", str(root), "-o", str(baseline)]) == 2  # a baseline without rows would hide them
    err = capsys.readouterr().err
    assert "bb01.json" in err and "expected every cell file readable" in err and len(err.splitlines()) == 1
    for cell_id in BAD:
        (root / "cells" / f"{cell_id}.json").unlink()
    (root / "cells" / "bb05.json").unlink()
    assert main(["baseline", str(root), "-o", str(baseline)]) == 0
    (root / "cells" / f"{GOOD[1]}.json").write_text('{"schema": 1, "cell_')  # an edit gone wrong
    capsys.readouterr()
    assert main(["check", str(root), "--baseline", str(baseline)]) == 1
    out, err = capsys.readouterr()
    assert list(warnings_of(err)) == [GOOD[1]] and "MISSING" in out
    assert main(["compare", str(root), str(root)]) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: {root / 'cells' / GOOD[1]}.json: not a cell result") == 2  # once per directory
    assert main(["show", GOOD[1], "--results", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{GOOD[1]}.json: not a cell result: invalid JSON" in err and len(err.splitlines()) == 1


def test_mlflow_sync_warns_about_an_unreadable_file(tmp_path, capsys):
    pytest.importorskip("mlflow")
    root = damaged_store(tmp_path)
    assert main(["sync", str(root), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    assert sorted(warnings_of(capsys.readouterr().err)) == [*BAD, "bb05"]


def test_save_keeps_an_unreadable_file_aside_never_deleting_it(tmp_path, capsys):
    store = ResultStore(tmp_path / "s")
    bad = BAD["bb01"].replace("bb01", "cc01")
    store.path("cc01").write_text(bad)
    assert not store.done("cc01") and not store.done("cc01")
    assert len(warnings_of(capsys.readouterr().err)) == 1  # warned once per store, however often it asks
    store.save(record("cc01"))
    assert (store.cells / "cc01.json.corrupt").read_text() == bad
    store.path("cc01").write_text("{")
    store.save(record("cc01"))
    assert (store.cells / "cc01.json.corrupt").read_text() == bad
    assert (store.cells / "cc01.json.corrupt.1").read_text() == "{"
    assert store.load("cc01").metrics["perplexity"] == 10.0
    assert not store.keep_aside(store.path("cc01"))  # a readable file stays where it is


# ---------------------------------------------------------------- writes that fail
def test_atomic_write_that_hits_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "d" / "leaderboard.md"
    atomic_write_text(target, "old\n")
    real_fdopen = os.fdopen

    class Full:
        """The file object of a full disk: every write fails as the kernel's write(2) does."""

        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(StorageError) as caught:
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"{target.parent}: cannot write leaderboard.md: No space left on device (ENOSPC)")
    assert "\n" not in message and caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value, HarnessError) and isinstance(caught.value, OSError)
    assert target.read_text() == "old\n" and [p.name for p in target.parent.iterdir()] == ["leaderboard.md"]


def test_a_full_disk_while_the_run_log_is_written_names_the_directory(tmp_path):
    from harness.run.quiet import run_log

    log = run_log(tmp_path, verbose=False)
    full = f"^{tmp_path}: cannot write run.log: No space"
    # the capture's error leaves the run log as it is (the file's last flush, failing too, does not replace it)
    with pytest.raises(StorageError, match=full), log.open():
        log._file.close()
        log._file = open(DEV_FULL, "w") if DEV_FULL.is_char_device() else _failing_file()  # noqa: SIM115
        with log.capture("an evaluator"):
            pass
    # nothing else failing: the last flush on a full disk is the one line itself, not an OSError traceback
    with pytest.raises(StorageError, match=full), log.open():
        log._file.close()
        log._file = _unflushable_file()


def _unflushable_file():
    class Unflushable:
        def write(self, text):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return Unflushable()


def _failing_file():
    class Failing:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            pass

    return Failing()


def test_a_short_safetensors_write_is_a_storage_error(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from harness.factorfiles import write_safetensors

    real = safetensors.torch.save_file

    def short(tensors, path, metadata=None):  # what a full disk can leave behind a save_file that returned
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as stream:
            stream.truncate(os.path.getsize(path) - 100)

    monkeypatch.setattr(safetensors.torch, "save_file", short)
    with pytest.raises(StorageError, match="short write"):
        write_safetensors(tmp_path / "g.safetensors", {"a": torch.zeros(100)}, {})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_safetensors(tmp_path / "g.safetensors", {"a": torch.zeros(100)}, {})  # a whole file passes the check


# ---------------------------------------------------------------- a run on a tiny model
def tiny_suite(tmp_path: Path, model_dir: Path) -> Path:
    return write_suite(
        tmp_path / "tiny.toml",
        f"""
        name = "tiny"
        device = "cpu"
        models = ["{model_dir}"]
        targets = [0.75, 0.5]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 16, max_windows = 1 }}
        """,
    )


def run(suite: Path, results: Path, capsys) -> tuple[int, str, str]:
    code = main(["run", str(suite), "--results", str(results), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def cell_files(cells: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(cells.iterdir())}


@pytest.mark.slow
def test_a_corrupt_cell_is_recomputed_and_kept_aside(tiny_model_dir, tmp_path, capsys):
    suite, results = tiny_suite(tmp_path, tiny_model_dir), tmp_path / "r"
    assert run(suite, results, capsys)[0] == 0
    cells = results / "tiny" / "cells"
    victim = sorted(cells.glob("*.json"))[1]
    good = victim.read_text()
    victim.write_text(good[: len(good) // 2])  # truncated
    code, out, err = run(suite, results, capsys)
    assert code == 0 and "1 cells computed, 2 reused" in out
    assert f"warning: {victim}: not a cell result: invalid JSON" in err and "treated as not done" in err
    assert (cells / f"{victim.name}.corrupt").read_text() == good[: len(good) // 2]
    assert read_record(victim).metrics == json.loads(good)["metrics"]  # recomputed: the same numbers


class Faults:
    """Writes under ``root`` fail after ``cells`` cell files were created there: the disk fills up (a real
    ENOSPC from /dev/full's write(2), else raised at open) or the file system turns read-only (EROFS)."""

    def __init__(self, root: Path, cells: int, code: int) -> None:
        self.root, self.cells, self.code, self.created = str(root), cells, code, 0
        self.real_open, self.real_mkdir = os.open, os.mkdir

    def broken(self, path) -> bool:
        return str(path).startswith(self.root) and self.created >= self.cells

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        if flags & os.O_CREAT and self.broken(path):
            if self.code == errno.ENOSPC and DEV_FULL.is_char_device():
                return self.real_open(DEV_FULL, os.O_WRONLY)
            raise OSError(self.code, os.strerror(self.code), str(path))
        if flags & os.O_CREAT and str(path).startswith(self.root) and "/cells/." in str(path):
            self.created += 1
        return self.real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(self, path, mode=0o777, *args, **kwargs):
        if self.broken(path):
            raise OSError(self.code, os.strerror(self.code), str(path))
        return self.real_mkdir(path, mode, *args, **kwargs)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(os, "open", self.open)
        monkeypatch.setattr(os, "mkdir", self.mkdir)


class ReadOnlyAfter:
    """A plugin that makes the results directory read-only (chmod a-w, recursively) after ``n`` cells."""

    def __init__(self, root: Path, n: int) -> None:
        self.root, self.n, self.seen = root, n, 0

    @harness.hookimpl
    def harness_cell_end(self, cell, result):
        self.seen += 1
        if self.seen == self.n:
            for folder in [self.root, *[p for p in self.root.rglob("*") if p.is_dir()]]:
                folder.chmod(stat.S_IRUSR | stat.S_IXUSR)

    def undo(self) -> None:
        for folder in [self.root, *[p for p in self.root.rglob("*") if p.is_dir()]]:
            folder.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
@pytest.mark.parametrize("after", [2, 3], ids=["mid-run", "at-the-reports"])
def test_a_failing_results_directory_stops_the_run_with_one_line_and_keeps_every_cell(
    fault, after, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    suite, results = tiny_suite(tmp_path, tiny_model_dir), tmp_path / "r"
    root, cells = results / "tiny", results / "tiny" / "cells"
    chmod = fault == "read-only" and os.geteuid() != 0  # root writes through a chmod: inject EROFS instead
    plugin = ReadOnlyAfter(root, after) if chmod else None
    if plugin is not None:
        root.mkdir(parents=True)
        get_plugins().register(plugin, name="read-only-after")
    else:
        Faults(root, after, errno.ENOSPC if fault == "disk full" else errno.EROFS).install(monkeypatch)
    try:
        code, out, err = run(suite, results, capsys)
        kept = cell_files(cells)
    finally:
        monkeypatch.undo()
        if plugin is not None:
            plugin.undo()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("harness: error:")]
    reason = "No space left on device (ENOSPC)" if fault == "disk full" else "(EROFS)" if not chmod else "(EACCES)"
    assert len(errors) == 1 and f"{root}" in errors[0] and reason in errors[0], err
    assert "Traceback" not in err and "FAILED" not in err  # a storage fault is no cell's failure
    assert len(kept) == after and not any(name.startswith(".") for name in kept)  # no temporary file left
    assert all(read_record(cells / name).ok for name in kept)  # whole, readable, ok: no cell failed of it
    code, out, err = run(suite, results, capsys)  # room again: the rerun resumes
    assert code == 0 and f"{3 - after} cells computed, {after} reused" in out
    assert {name: text for name, text in cell_files(cells).items() if name in kept} == kept
