"""Two runs on one results directory never compute the same cell.

Every ``harness run`` takes an advisory lock (``fcntl.flock``) on
``<results>/.run/lock`` for as long as it runs: an exclusive one by default,
so a second run on the same directory waits (saying on one line who holds it:
pid, host, since when) and then reuses what the first computed; a shared one
under ``--shared``, so several runs work on the directory at once and divide
its cells between them by claims:

- ``.run/claims/<cell id>.json`` is created with ``O_CREAT | O_EXCL`` (one
  creator wins) just before a cell is computed and holds the claimant's pid,
  host, start time and command; it is removed when the cell's result is saved
  and, for whatever is left, when the run ends (also on SIGINT / SIGTERM).
- A claim whose process is gone (same host, ``os.kill(pid, 0)`` says no such
  process) is stale and taken over: its cell is computed again from its
  start. A claim from another host is honoured unless it is older than
  ``CLAIM_TIMEOUT_S`` (its process cannot be probed from here).
- Take-overs happen under a short exclusive lock on ``.run/claims.mutex``, so
  two runs never both take over one stale claim.

Exclusive runs (and shared ones waiting for an exclusive one) exclude each
other through the lock itself; the claims are only needed between shared runs.
Each holder also writes ``.run/holders/<host>.<pid>.json`` (who, since when)
for the waiting message. ``flock`` works across hosts on NFS (Linux emulates
it with POSIX locks there); where a filesystem refuses locks altogether the
run says so once and goes on unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.run.env import log

CLAIM_TIMEOUT_S = 24 * 3600.0
"""A claim from another host older than this (seconds) is taken as abandoned: a cell of a 7B model on a slow
device can take hours, a day is more than any cell should."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lock or a claim."""

    pid: int
    host: str
    started: float
    """Seconds since the epoch."""
    command: str = ""

    @classmethod
    def me(cls, command: str = "") -> Owner:
        return cls(os.getpid(), socket.gethostname(), time.time(), command)

    def alive(self, timeout: float = CLAIM_TIMEOUT_S) -> bool:
        """Same host: the process exists. Other host: younger than ``timeout``."""
        if self.host != socket.gethostname():
            return time.time() - self.started < timeout
        return pid_alive(self.pid)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        text = f"pid {self.pid} on host {self.host} since {since}"
        return f"{text} ({self.command})" if self.command else text


def pid_alive(pid: int) -> bool:
    """True where a process ``pid`` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_owner(path: Path) -> Owner | None:
    """The owner written at ``path``; None where it is gone or unreadable (half-written by a killed run)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), str(data["host"]), float(data["started"]), str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owner_json(owner: Owner) -> str:
    return json.dumps(asdict(owner), sort_keys=True) + "\n"


class RunLock:
    """The lock of one run on one results directory, and (``shared``) its claims on cells."""

    def __init__(
        self,
        root: Path,
        shared: bool = False,
        command: str = "",
        settled: Callable[[str], bool] = lambda cell_id: False,
        timeout: float = CLAIM_TIMEOUT_S,
    ) -> None:
        self.folder = Path(root) / ".run"
        self.shared = shared
        self.me = Owner.me(command)
        self.settled = settled
        """True where a cell is not to be computed any more (its result is in the store)."""
        self.timeout = timeout
        self.mine: set[str] = set()
        """Cells this run claimed and has not released."""
        self.finished: set[str] = set()
        """Cells this run computed (ok or failed): never claimed again in this run."""
        self.fd: int | None = None

    @property
    def claims(self) -> Path:
        return self.folder / "claims"

    @property
    def holder(self) -> Path:
        return self.folder / "holders" / f"{self.me.host}.{self.me.pid}.json"

    # ------------------------------------------------------------ the directory lock
    def acquire(self) -> None:
        """Take the lock; where another run holds it (exclusively, or we want it so), say who and wait."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                log(self.waiting_line())
                fcntl.flock(self.fd, mode)
                log(f"results directory {self.folder.parent}: lock taken, going on")
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EINTR):
                raise
            log(f"warning: {self.folder / 'lock'}: cannot lock ({exc.strerror}); concurrent runs are not detected")
        self.holder.parent.mkdir(parents=True, exist_ok=True)
        self.holder.write_text(owner_json(self.me), encoding="utf-8")
        if not self.shared:  # nobody else is in: every claim left is a dead run's
            for path in self.claims.glob("*.json"):
                path.unlink(missing_ok=True)

    def waiting_line(self) -> str:
        owners = [o for o in map(read_owner, sorted(self.holder.parent.glob("*.json"))) if o and o != self.me]
        live = [o for o in owners if o.alive(self.timeout)] or owners
        who = "; ".join(o.describe() for o in live) or "another process"
        hint = "" if self.shared else ", or run with --shared to divide the cells between the runs"
        return f"results directory {self.folder.parent} is in use by {who}: waiting for it (Ctrl-C to stop{hint})"

    def release(self) -> None:
        """Drop every claim of this run and the lock (also after an interruption: a ``finally``)."""
        for cell_id in list(self.mine):
            self.unclaim(cell_id)
        self.holder.unlink(missing_ok=True)
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    # ------------------------------------------------------------ claims
    def claim_path(self, cell_id: str) -> Path:
        return self.claims / f"{cell_id}.json"

    def blocked(self, cell_id: str) -> bool:
        """True where this run is not to compute ``cell_id`` now: another live run claimed it, or this run
        already computed it. (Always False outside ``--shared``: the lock is exclusive.)"""
        if not self.shared or cell_id in self.mine:
            return False
        if cell_id in self.finished:
            return True
        owner = read_owner(self.claim_path(cell_id))
        return owner is not None and owner != self.me and owner.alive(self.timeout)

    def claim(self, cell_id: str) -> bool:
        """Claim ``cell_id`` for this run; False where another live run has it or its result is in by now."""
        if not self.shared or cell_id in self.mine:
            return True
        if cell_id in self.finished:
            return False
        self.claims.mkdir(parents=True, exist_ok=True)
        with self.mutex():
            if self.settled(cell_id):
                return False
            path = self.claim_path(cell_id)
            if not self.create(path):
                owner = read_owner(path)
                if owner is not None and owner.alive(self.timeout):
                    return False
                what = owner.describe() if owner else "an unreadable claim"
                log(f"claim of {cell_id} by {what} is stale (its process is gone): taking it over")
                path.unlink(missing_ok=True)
                if not self.create(path):
                    return False
        self.mine.add(cell_id)
        return True

    def create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(owner_json(self.me))
            stream.flush()
            os.fsync(stream.fileno())
        return True

    def unclaim(self, cell_id: str, finished: bool = False) -> None:
        if finished:
            self.finished.add(cell_id)
        if cell_id in self.mine:
            self.mine.discard(cell_id)
            self.claim_path(cell_id).unlink(missing_ok=True)

    def elsewhere(self, cell_ids: list[str]) -> list[Owner]:
        """The live owners of those of ``cell_ids`` that other runs claimed (for the waiting message)."""
        owners = {read_owner(self.claim_path(c)) for c in cell_ids}
        return sorted((o for o in owners if o is not None and o != self.me), key=lambda o: o.started)

    @contextlib.contextmanager
    def mutex(self) -> Iterator[None]:
        fd = os.open(self.folder / "claims.mutex", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock
