"""Quiet runs: what libraries print goes to a log file, the harness's own lines to the terminal.

By default (``harness run`` without ``--verbose``) a run's terminal shows the
harness's lines (``[harness] ...``), its progress bars and, last, the
leaderboard. What the libraries under a plugin print while it evaluates or
profiles (lm-eval's warnings and its per-request progress bars,
transformers' and datasets' messages, Python warnings) is appended to
``run.log`` in the suite's results directory instead, each stretch headed by
the cell and the plugin it came from:

- ``logging`` records of the libraries' loggers (``LIBRARY_LOGGERS``) and
  Python warnings (``logging.captureWarnings``) go to the file for the
  whole run;
- while an evaluator or a profiler runs, ``sys.stdout`` and ``sys.stderr``
  are the file too (what a library writes there directly: its tqdm bars,
  its prints). ``harness.run.env.log`` keeps writing to the terminal.

``--verbose`` leaves all of it on the terminal, as before.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from harness.run import env as env_mod

LIBRARY_LOGGERS = (
    "lm_eval",
    "lm-eval",
    "transformers",
    "datasets",
    "accelerate",
    "huggingface_hub",
    "mlflow",
    "urllib3",
    "filelock",
    "py.warnings",
)
LOG_NAME = "run.log"


class RunLog:
    """The run's library log: ``open`` for the whole run, ``capture`` around each plugin call."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        """None: verbose (nothing is routed)."""
        self._file: TextIO | None = None
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []

    @contextlib.contextmanager
    def open(self) -> Iterator[RunLog]:
        if self.path is None:
            yield self
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8", errors="replace")
        self._file.write(f"==== harness run, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handler = logging.StreamHandler(self._file)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, list(logger.handlers), logger.propagate))
            logger.handlers = [handler]
            logger.propagate = False
        logging.captureWarnings(True)
        failing = False
        try:
            yield self
        except BaseException:
            failing = True
            raise
        finally:
            logging.captureWarnings(False)
            for logger, handlers, propagate in self._saved:
                logger.handlers, logger.propagate = handlers, propagate
            self._saved.clear()
            self._close(failing)

    def _close(self, failing: bool) -> None:
        """Close the file; its last flush failing (a full disk) is a StorageError naming it, unless an error
        is already on its way out (the run's own: it must not be replaced by a traceback of this one)."""
        from harness.store import storage_error

        file, self._file = self._file, None
        try:
            file.close()
        except OSError as exc:
            if not failing:
                raise storage_error(exc, self.path) from None

    @contextlib.contextmanager
    def capture(self, what: str) -> Iterator[None]:
        """Inside, stdout and stderr are the log file (headed by ``what``); the harness's log stays put."""
        if self._file is None:
            yield
            return
        self._write(f"---- {what}\n")
        terminal = sys.stderr
        with env_mod.terminal(terminal), contextlib.redirect_stdout(self._file), contextlib.redirect_stderr(self._file):
            yield
        self._write("")

    def _write(self, text: str) -> None:
        """``text`` appended and flushed; a full disk or a read-only directory is a StorageError naming it."""
        from harness.store import storage_error

        try:
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            raise storage_error(exc, self.path) from None


def run_log(results_dir: Path, verbose: bool) -> RunLog:
    return RunLog(None if verbose else Path(results_dir) / LOG_NAME)
