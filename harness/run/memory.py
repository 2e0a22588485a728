"""Out-of-memory errors turned into one line that names the setting to lower."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class OutOfMemory(RuntimeError):
    """A step ran out of memory; the message names the setting to lower."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def out_of_memory_as(message: Callable[[BaseException], str]) -> Iterator[None]:
    """Inside: an out-of-memory error frees what it can and becomes ``OutOfMemory(message(exc))``."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        free_memory()
        raise OutOfMemory(message(exc)) from exc
