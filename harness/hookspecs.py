"""Hook specifications: the lifecycle manual of a harness plugin.

A plugin is a module (or object) with functions decorated by
``harness.hookimpl`` whose names match the specs below. Built-in plugins under
``plugins/`` and third-party ones are found the same way, through entry points
in the group ``harness`` (and, for commands only, ``harness.commands``).
pluggy passes an implementation only the arguments it names, so specs can gain
arguments later: always call hooks with keywords, and name in an
implementation only the arguments it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # annotations only
    from pathlib import Path

    from harness.commands import Command
    from harness.run.cells import Cell
    from harness.run.record import CellRecord
    from harness.suite import Suite

hookspec = pluggy.HookspecMarker("harness")
hookimpl = pluggy.HookimplMarker("harness")
"""Decorate a plugin's hook functions with this (exported as ``harness.hookimpl``)."""

# ---------------------------------------------------------------- registration
# Registration hooks are called lazily: the first time the registry is read
# (a suite is validated, a component is looked up, `harness plugins` lists
# them), and again after every `Plugins.register` / `Plugins.unregister`, when
# the whole registry is rebuilt from every loaded plugin. So an implementation
# may run more than once per process: it must only call `register`, with no
# other side effects. Each receives a `register` callable: call it once per
# component. Components are instances, kept in the registry and shared by
# every suite run of the process (keep per-run state out of them, or reset it
# in the method that starts the work). The core rejects a component without a
# `name` and a name registered twice (naming both plugins), and remembers
# which plugin registered what. Return values are ignored.


@hookspec
def register_decomposers(register: Callable[[Any], None]) -> None:
    """Register weight decomposers: ``register(harness.Decomposer instance)``.

    A decomposer turns a group of weights plus calibration statistics into a
    ``harness.Factorization`` that can be truncated to any supported rank.
    """


@hookspec
def register_rank_allocators(register: Callable[[Any], None]) -> None:
    """Register rank allocators: ``register(harness.RankAllocator instance)``.

    An allocator chooses each group's rank from the factorizations' cost and
    error curves so that the model meets a global ``harness.Target``.
    """


@hookspec
def register_evaluators(register: Callable[[Any], None]) -> None:
    """Register evaluators: ``register(harness.Evaluator instance)`` (model -> metrics)."""


@hookspec
def register_profilers(register: Callable[[Any], None]) -> None:
    """Register profilers: ``register(harness.Profiler instance)`` (model -> hardware metrics)."""


@hookspec
def register_trackers(register: Callable[[Any], None]) -> None:
    """Register trackers: ``register(harness.Tracker instance)``.

    The registered instance is itself the tracker: it is shared by every run
    of the process (its ``start`` is called at the beginning of each suite run
    a suite names it in, with that suite's options for it, and should reset
    any state of an earlier run). It receives the suite and cell events
    through its methods (see ``harness.Tracker``).
    """


@hookspec
def register_commands(register: Callable[[Command], None]) -> None:
    """Register subcommands of ``harness``: ``register(harness.Command instance)``.

    The CLI reads commands only from the plugins of the entry-point group
    ``harness.commands`` (a light module per plugin, e.g.
    ``sync = "harness_mlflow.commands"``), never from the heavier ``harness``
    group, so that ``harness --help`` stays fast: that module must not import
    torch, transformers, mlflow, ... at import time. A command name that a
    core command or another plugin already uses is an error naming both; a
    command plugin that fails to load is reported in one line on stderr and
    the other commands keep working.
    """


# ---------------------------------------------------------------- lifecycle
# Called on every loaded plugin, in pluggy's order (the last registered
# first), by `harness run`; return values are ignored. An exception raised by
# an implementation propagates (it stops the run): catch your own errors.
# Trackers named in a suite receive the same events through their methods
# (`start`, `log_cell`, `end`), which are guarded: a failing tracker is
# switched off for the rest of the run and the results stay in the store.


@hookspec
def harness_suite_start(suite: Suite, results_dir: Path) -> None:
    """A suite run begins, before any model is loaded.

    ``suite`` is the validated ``harness.Suite`` (with the command line's
    ``--model`` / ``--device`` applied); ``results_dir`` is the suite's
    results directory (``<results root>/<suite name>``), which holds
    ``cells/<cell id>.json`` once cells finish.
    """


@hookspec
def harness_cell_start(cell: Cell) -> None:
    """A cell (``harness.Cell``: its id, label, model, method, allocator, target) is about to be computed.

    Called only for cells that are computed: a cell whose result is already in
    the store is reused (skipped) and gets neither ``harness_cell_start`` nor
    ``harness_cell_end``.
    """


@hookspec
def harness_cell_end(cell: Cell, result: CellRecord) -> None:
    """A computed cell finished and its result is saved in the store.

    ``result`` is the cell's ``harness.CellRecord`` (``result.to_json()`` is the
    dict stored in ``cells/<cell id>.json``); its status is ``"ok"`` or
    ``"failed"`` (a failed cell carries its error and the run goes on). Never
    called for reused cells.
    """


@hookspec
def harness_suite_end(suite: Suite, results: list[CellRecord]) -> None:
    """A suite run ends: ``results`` holds every cell's ``harness.CellRecord``, reused ones included.

    Called in a ``finally``: also when the run stopped early (a model failed
    to load, an interruption, a bug), then ``results`` holds the cells
    finished so far. Called after the leaderboard and report files are
    written (when the run got that far) and before the trackers' ``end``.
    """
