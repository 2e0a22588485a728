"""Commands that plugins add to the ``harness`` command line (``harness.Command``).

A plugin adds a command by registering an instance from its
``register_commands`` hook, in the module its ``harness.commands`` entry point
names. That module must import nothing heavy at import time (no torch,
transformers, mlflow, ...): the CLI loads every command plugin to build
``harness --help``. Import the heavy libraries inside ``run``.
"""

from __future__ import annotations

import argparse
from typing import ClassVar


class Command:
    """A subcommand of ``harness``: ``harness NAME [arguments]``.

    Subclasses set ``name`` (the subcommand, e.g. ``"sync"``) and ``help`` (one
    line, shown by ``harness --help``), declare their arguments in
    ``add_arguments`` and do the work in ``run``, which returns the exit
    status (0 success, 1 a check failed, 2 bad input). Raise
    ``harness.HarnessError`` for bad input: the CLI prints it as one line
    (``harness: error: ...``) and exits 2.
    """

    name: ClassVar[str]
    help: ClassVar[str] = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's arguments on its own subparser (default: none)."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the work with the parsed ``args``; return the exit status."""
        raise NotImplementedError
