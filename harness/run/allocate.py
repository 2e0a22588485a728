"""A cell's compressed model: its allocator's rank per group, checked against the
target, materialized into replacement layers, and the per-matrix rank report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.api import AllocationContext
from harness.errors import HarnessError
from harness.provenance import seed_everything
from harness.run.env import log
from harness.run.prepare import materialize
from harness.targets import BytesTarget

if TYPE_CHECKING:
    from harness.api import LayerInfo
    from harness.factorization import Factorization
    from harness.run.cells import Cell
    from harness.run.env import RunEnv
    from harness.run.prepare import Prepared
    from harness.suite import Component, Method
    from harness.targets import Target


@dataclass
class Compressed:
    """What a cell replaces and what it records about the choice."""

    replacements: dict
    ranks: dict[str, int | None]
    timing: dict[str, float] = field(default_factory=dict)
    factorization_info: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)


def compress(
    env: RunEnv, prepared: Prepared, cell: Cell, factorizations: list[Factorization], factorize_s: float
) -> Compressed:
    dtype_bytes = prepared.loaded.model.dtype.itemsize
    check_reachable(env, prepared, cell, factorizations, dtype_bytes)
    loss = prepared.calibration_loss(factorizations) if uses_data(env, cell.method, cell.allocator) else None
    started = time.perf_counter()
    target = bound_target(prepared, cell.target)
    assignment = allocate_ranks(env, prepared.layers, cell.allocator, target, factorizations, loss, dtype_bytes)
    allocate_s = time.perf_counter() - started
    ranks = layer_ranks(factorizations, assignment)
    return Compressed(
        materialize(factorizations, assignment),
        ranks,
        timing={"factorize_s": factorize_s, "allocate_s": allocate_s},
        factorization_info={"+".join(f.names): info for f in factorizations if (info := recorded_info(f.info))},
        artifacts=rank_report(env, prepared, cell, ranks),
    )


def recorded_info(info: dict) -> dict:
    """What a cell records of a factorization's ``info``: every key but those starting with ``_``, which travel
    with the factorization for its allocator only (e.g. one score per singular value: too bulky to record)."""
    return {k: v for k, v in info.items() if not str(k).startswith("_")}


def uses_data(env: RunEnv, method: Method, allocator: Component) -> bool:
    """Whether the allocator is handed a calibration loss: the method needs statistics or it scores one."""
    decomposer, scorer = env.plugins.get("decomposer", method.name), env.plugins.get("allocator", allocator.name)
    return bool(decomposer.needs) or scorer.uses_calibration


def allocate_ranks(
    env: RunEnv,
    layers: Sequence[LayerInfo],
    allocator: Component,
    target: Target,
    factorizations: Sequence[Factorization],
    calibration_loss: Callable[[Sequence[int | None]], float] | None,
    dtype_bytes: int,
) -> list[int | None]:
    """``allocator``'s rank (None: dense) per factorization for ``target``, after ``seed_everything``: a
    cell's choice, and the pipeline's reference ranks for one block (``block_target``)."""
    suite = env.suite
    ctx = AllocationContext(
        seed=suite.seed,
        layers={layer.name: layer for layer in layers},
        calibration_loss=calibration_loss,
        dtype_bytes=dtype_bytes,
        log=log,
    )
    seed_everything(suite.seed)
    assignment = env.plugins.get("allocator", allocator.name).allocate(factorizations, target, allocator.options, ctx)
    if len(assignment) != len(factorizations):
        raise RuntimeError(f"allocator returned {len(assignment)} ranks for {len(factorizations)} groups")
    return list(assignment)


def block_target(target: Target, share: float) -> Target:
    """``target`` restricted to groups holding ``share`` of the model's decomposable parameters.

    Every built-in kind but ``bytes`` states its budget relative to the groups an allocator is given
    (params, bits: a fraction of their dense size; rank: of their full ranks), so it is itself; a bytes
    budget (absolute, for the whole model) is scaled by ``share``.
    """
    if isinstance(target, BytesTarget):  # a whole-model budget (scope = "model", bound) less the rest first
        return BytesTarget((target.value - target.other_bytes()) * share)
    return target


def layer_ranks(factorizations: Sequence[Factorization], assignment: Sequence[int | None]) -> dict[str, int | None]:
    return {name: rank for fact, rank in zip(factorizations, assignment, strict=True) for name in fact.names}


def target_key(env: RunEnv, cell: Cell) -> str:
    index = env.suite.methods.index(cell.method)
    return f"{env.suite.file}: methods[{index}].targets[{cell.method.targets.index(cell.target)}]"


def bound_target(prepared: Prepared, target: Target) -> Target:
    """``target`` bound to the loaded model (``Target.for_model``: a whole-model ``bytes`` budget counts the
    rest of the model; other kinds are themselves)."""
    return target.for_model(prepared.loaded.model, [layer.name for layer in prepared.layers])


def check_reachable(
    env: RunEnv, prepared: Prepared, cell: Cell, factorizations: Sequence[Factorization], dtype_bytes: int
) -> None:
    """A params, bytes or bits target below the smallest model (every matrix at rank 1, or at its smallest
    positive rank) is bad input: only removing whole matrices (rank 0) could meet it."""
    target = bound_target(prepared, cell.target)
    short = target.unreachable(factorizations, dtype_bytes)
    if short is not None:
        least, allowed = short
        raise HarnessError(
            f"{target_key(env, cell)}: expected a target of at least {least:,} {target.unit} of decomposable "
            f"weights (every matrix of {prepared.loaded.model_id} at its smallest rank under {cell.method.label}), "
            f"got {target.label} ({allowed:,.0f} {target.unit})"
        )


def rank_report(env: RunEnv, prepared: Prepared, cell: Cell, ranks: dict[str, int | None]) -> list[str]:
    """The rank chosen for every matrix: CSV and heat map under ranks/, paths relative to the results dir."""
    from harness.report.ranks import rank_heatmap, rank_rows, write_rank_csv

    root = env.store.root
    rows = rank_rows({layer.name: layer for layer in prepared.layers}, ranks)
    csv_path = write_rank_csv(rows, root / "ranks" / f"{cell.id}.csv")
    png_path = rank_heatmap(rows, root / "ranks" / f"{cell.id}.png", f"{cell.label}: kept rank fraction")
    return [str(p.relative_to(root)) for p in (csv_path, png_path)]
