"""Hook specifications: the lifecycle manual of a harness plugin.

A plugin is a module (or object) with functions decorated by
``harness.hookimpl`` whose names match the specs below. Built-in plugins under
``plugins/`` and third-party ones are found the same way, through entry points
in the group ``harness``. pluggy passes an implementation only the arguments it
names, so specs can gain arguments later: always call hooks with keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("harness")
hookimpl = pluggy.HookimplMarker("harness")
"""Decorate a plugin's hook functions with this (exported as ``harness.hookimpl``)."""

# ---------------------------------------------------------------- registration
# Called once, when the plugin manager is built, before any suite is read.
# Each receives a ``register`` callable; call it once per component. The core
# rejects duplicate names and remembers which plugin registered what.


@hookspec
def register_decomposers(register: Callable[[Any], None]) -> None:
    """Register weight decomposers (``harness.Decomposer`` instances).

    A decomposer turns a group of weights plus calibration statistics into a
    ``harness.Factorization`` that can be truncated to any supported rank.
    """


@hookspec
def register_rank_allocators(register: Callable[[Any], None]) -> None:
    """Register rank allocators (``harness.RankAllocator`` instances).

    An allocator chooses each group's rank from the factorizations' cost and
    error curves so that the model meets a global ``harness.Target``.
    """


@hookspec
def register_evaluators(register: Callable[[Any], None]) -> None:
    """Register evaluators (``harness.Evaluator`` instances): model -> metrics."""


@hookspec
def register_profilers(register: Callable[[Any], None]) -> None:
    """Register profilers (``harness.Profiler`` instances): model -> hardware metrics."""


@hookspec
def register_trackers(register: Callable[[Any], None]) -> None:
    """Register trackers (``harness.Tracker`` classes or factories).

    A tracker is built once per suite run with the suite's options for it and
    receives the suite and cell lifecycle events (see ``harness.Tracker``).
    """


# ---------------------------------------------------------------- lifecycle
# Called on every loaded plugin, in registration order; return values ignored.
# Trackers named in a suite receive the same events through their methods.


@hookspec
def harness_suite_start(suite: Any, results_dir: Any) -> None:
    """A suite run begins: ``suite`` is the validated ``harness.Suite``."""


@hookspec
def harness_cell_start(cell: Any) -> None:
    """A cell (``harness.Cell``) is about to be computed (not called for skipped cells)."""


@hookspec
def harness_cell_end(cell: Any, result: dict) -> None:
    """A cell finished (``result["status"]`` is ``"ok"`` or ``"failed"``)."""


@hookspec
def harness_suite_end(suite: Any, results: list[dict]) -> None:
    """A suite run ends: ``results`` holds every cell's result, skipped ones included."""
