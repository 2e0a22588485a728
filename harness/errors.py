"""The one user-facing exception.

`HarnessError` is raised for anything the user can fix (bad suite, missing
file, unknown plugin name). The CLI prints it as one line and exits with
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """An error the user can fix; the CLI prints it on one line, exit 2."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def where(file: str | None, key: str) -> str:
    """'file: key' prefix for validation messages."""
    return f"{file}: {key}" if file else key


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, the line cut at ``limit`` characters (for one-line reports)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"
