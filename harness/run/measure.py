"""One cell's measurements: every evaluator and profiler of the suite run on the
model as the cell compressed it (the baseline: as loaded)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.api import RunContext
from harness.errors import first_line
from harness.provenance import seed_everything
from harness.run.env import log
from harness.run.memory import out_of_memory_as
from harness.run.tuning import after_surgery
from harness.surgery import count_model, replaced

if TYPE_CHECKING:
    from harness.run.cells import Cell
    from harness.run.env import RunEnv
    from harness.run.prepare import Prepared
    from harness.suite import Component


@dataclass
class Measured:
    metrics: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    evaluations: dict[str, Any] = field(default_factory=dict)
    hardware_metrics: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    model_params: int = 0
    model_bytes: int = 0
    weight_optimization: dict[str, Any] | None = None
    """The method's ``after_surgery`` summary (with ``seconds``) where it tuned this cell, else None."""


def metric_name(component: Component, metric: str) -> str:
    return metric if component.label == component.name else f"{component.label}/{metric}"


def run_context(env: RunEnv, prepared: Prepared, cell: Cell, dense: tuple[int, int]) -> RunContext:
    return RunContext(
        seed=env.suite.seed,
        device=env.device,
        model_id=prepared.loaded.model_id,
        limit=env.options.limit,
        work_dir=env.store.work_dir(cell.id),
        dense_params=dense[0],
        decomposable=[layer.name for layer in prepared.layers],
        log=log,
        extra={"dense_bytes": dense[1], "progress": env.options.progress},
    )


def measure(env: RunEnv, prepared: Prepared, cell: Cell, replacements: dict, dense: tuple[int, int]) -> Measured:
    """Evaluators then profilers, each seeded and timed, on the model with ``replacements`` in place."""
    model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer
    ctx = run_context(env, prepared, cell, dense)
    measured = Measured()
    suite = env.suite
    with replaced(model, replacements, suite.surgery.mode == "dense", suite.surgery.offload_originals):
        if cell.method is not None:  # the method's per-cell step (a no-op unless it tunes): before any evaluator
            with (
                out_of_memory_as(lambda exc: tuning_oom_message(env, cell, exc)),
                env.captured(f"cell {cell.label} [{cell.id}]: weight optimization"),
            ):
                measured.weight_optimization = after_surgery(env, prepared, cell, list(replacements))
            if measured.weight_optimization is not None:
                measured.timing["weight_optimization_s"] = measured.weight_optimization["seconds"]
        for kind, components in (("evaluator", suite.evaluators), ("profiler", suite.profilers)):
            for component in components:
                plugin = env.plugins.get(kind, component.name)
                run = plugin.evaluate if kind == "evaluator" else plugin.profile
                seed_everything(suite.seed)
                started = time.perf_counter()
                with (
                    out_of_memory_as(lambda exc, k=kind, c=component: oom_message(env, k, c, exc)),
                    env.captured(f"cell {cell.label} [{cell.id}]: {kind} {component.label}"),
                ):
                    outcome = run(model, tokenizer, component.options, ctx)
                measured.timing[f"{component.label}_s"] = time.perf_counter() - started
                if env.runlog is not None and env.runlog.path is not None:  # its own output went to run.log
                    log(f"  {kind} {component.label}: {measured.timing[f'{component.label}_s']:.1f} s")
                hardware_bound = kind == "profiler" and getattr(plugin, "hardware_bound", False)
                add_outcome(measured, component, outcome, hardware_bound)
        measured.model_params, measured.model_bytes = count_model(model)
    measured.hardware_metrics.sort()
    return measured


def add_outcome(measured: Measured, component: Component, outcome: Any, hardware_bound: bool) -> None:
    for name, value in outcome.metrics.items():
        measured.metrics[metric_name(component, name)] = float(value)
    for name, value in outcome.higher_is_better.items():
        measured.higher_is_better[metric_name(component, name)] = value
    measured.evaluations[component.label] = outcome.info
    if hardware_bound:
        measured.hardware_metrics += [metric_name(component, name) for name in outcome.metrics]


def oom_message(env: RunEnv, kind: str, component: Component, exc: BaseException) -> str:
    suite = env.suite
    items = suite.evaluators if kind == "evaluator" else suite.profilers
    key = f"{kind}s[{items.index(component)}].options"
    has_batch = hasattr(component.options, "batch_size")
    lower = f"lower {key}.batch_size (now {component.options.batch_size})" if has_batch else "lower its options"
    return (
        f"{kind} {component.label!r} ran out of memory on {env.device}: {lower} or cap examples "
        f"with --limit, in {suite.file} [{first_line(exc)}]"
    )


def tuning_oom_message(env: RunEnv, cell: Cell, exc: BaseException) -> str:
    suite = env.suite
    return (
        f"weight optimization of {cell.method.label!r} (after surgery) ran out of memory on {env.device}: lower "
        f"calibration.batch_size (now {suite.calibration.batch_size}) or calibration.seqlen "
        f"({suite.calibration.seqlen}) in {suite.file} [{first_line(exc)}]"
    )
