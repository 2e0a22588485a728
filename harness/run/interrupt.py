"""SIGINT and SIGTERM stop a run cleanly: the cell in flight is abandoned (its result is not written, its
partial work stays for nothing), the ``finally`` blocks run (claims released, trackers told the run was
killed, MLflow runs ended as KILLED), and ``harness`` exits 128 + the signal's number (130, 143).

Python turns SIGINT into ``KeyboardInterrupt`` by itself but leaves SIGTERM to the default action (the
process dies at once, no ``finally`` runs). Inside ``interruptible()`` both raise ``Interrupted``, a
``BaseException``: the runner's ``except Exception`` (a plugin's failure costs one cell) does not catch it.
A second signal while the run is already stopping is ignored, so the cleanup is not cut short.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from harness.run.env import log


class Interrupted(BaseException):
    """The run got SIGINT or SIGTERM; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interruptible() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise ``Interrupted`` (once); the previous handlers come back after.
    A no-op outside the main thread (where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if stopping:
            log(f"{signal.Signals(signum).name} again: already stopping, finishing the clean-up")
            return
        stopping.append(signum)
        log(f"{signal.Signals(signum).name}: stopping; the cell in flight is abandoned, finished cells are kept")
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
