"""The driver's side of the Ray tasks: declared once with their resources, submitted,
waited for, and cancelled together when a run ends early."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from harness.errors import HarnessError, first_line
from harness.ray.cluster import import_ray
from harness.ray.tasks import Refused
from harness.run.env import log
from harness.run.record import CellRecord


class Dispatch:
    def __init__(self) -> None:
        self.remotes: dict[Callable[..., Any], Any] = {}
        self.outstanding: set[Any] = set()

    def declare(self, tasks: Iterable[Callable[..., Any]], resources: dict[str, Any], retries: int) -> None:
        """Ray remote functions of ``tasks``; declared with the resources (not ``.options()``), so that Ray
        starts a fresh worker for each GPU task."""
        ray = import_ray()
        options = {**resources, "max_retries": retries, "retry_exceptions": False}
        self.remotes = {task: ray.remote(**options)(task) for task in tasks}

    def submit(self, task: Callable[..., Any], *args: Any) -> Any:
        ref = self.remotes[task].remote(*args)
        self.outstanding.add(ref)
        return ref

    def fetch(self, ref: Any, key: str) -> Any:
        """A planning task's value; its failure (after retries) or a Refused is a HarnessError."""
        ray = import_ray()
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as exc:
            reason = first_line(exc, 300)
            raise HarnessError(f"{key}: expected the Ray task loading the model to finish, got {reason}") from None
        finally:
            self.outstanding.discard(ref)
        return refused_or(value)

    def as_done(self, refs: Iterable[Any]) -> Iterator[Any]:
        """``refs`` in the order their tasks finish."""
        ray = import_ray()
        remaining = list(refs)
        while remaining:
            (ref,), remaining = ray.wait(remaining, num_returns=1)
            self.outstanding.discard(ref)
            yield ref

    def record(self, ref: Any, label: str, fallback: CellRecord, attempts: int) -> tuple[CellRecord, bool]:
        """A finished cell task's record, and whether it came back; where every attempt's worker died,
        ``fallback`` with the reason as its error (not yet saved)."""
        ray = import_ray()
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as exc:
            log(f"cell {label} FAILED: {first_line(exc, 300)} (tried {attempts} times)")
            error = {"type": type(exc).__name__, "message": str(exc), "traceback": []}
            return dataclasses.replace(fallback, error=error), False
        return refused_or(value), True

    def cancel_all(self) -> None:
        """After an error: nothing keeps computing for a run that ended."""
        ray = import_ray()
        for ref in self.outstanding:
            ray.cancel(ref, force=True)
        self.outstanding.clear()


def refused_or(value: Any) -> Any:
    if isinstance(value, Refused):
        raise HarnessError(value.message)
    return value
