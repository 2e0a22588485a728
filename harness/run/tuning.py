"""A cell's weight optimization after surgery (``Decomposer.after_surgery``): the core's side of the hook.

Called inside ``harness.surgery.replaced``, after the cell's replacements are in at their final ranks and
before any evaluator (``harness.run.measure``; ``harness export`` calls it too, so that a tuned cell exports
its tuned factors). The replacement modules are built from the method's kept factorizations, which every
cell of the method shares: their parameters are first given storage of their own (``own_storage``), so that
an in-place update (a merged LoRA branch) cannot reach the factorization, and the next cell starts from the
dense originals and fresh replacements as if no cell had been tuned before it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from harness.api import SurgeryContext
from harness.provenance import seed_everything
from harness.run.env import log

if TYPE_CHECKING:
    from harness.run.cells import Cell
    from harness.run.env import RunEnv
    from harness.run.prepare import Prepared


def tunes(env: RunEnv, cell: Cell) -> bool:
    """Whether ``cell``'s method optimizes weights after surgery (``Decomposer.tunes``); False for the baseline."""
    if cell.method is None:
        return False
    return bool(env.plugins.get("decomposer", cell.method.name).tunes(cell.method.options))


def after_surgery(env: RunEnv, prepared: Prepared, cell: Cell, names: Sequence[str]) -> dict[str, Any] | None:
    """Run the cell's method's ``after_surgery`` on the model as it stands (the cell's layers ``names``
    replaced); its summary with ``seconds`` added, or None where the method does not tune."""
    if not names or not tunes(env, cell):
        return None
    model = prepared.loaded.model
    decomposer = env.plugins.get("decomposer", cell.method.name)
    suite = env.suite
    ctx = SurgeryContext(seed=suite.seed, device=env.device, batch_size=suite.calibration.batch_size, log=log)
    windows = prepared.batches()
    log(f"  weight optimization ({cell.method.label}): {len(names)} layers, {windows.shape[0]} windows")
    seed_everything(suite.seed)
    started = time.perf_counter()
    with trainable(model, names), torch.enable_grad():
        summary = decomposer.after_surgery(model, list(names), windows, cell.method.options, ctx)
    seconds = time.perf_counter() - started
    return {**(summary or {}), "seconds": seconds}


def own_storage(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Each named module's parameters copied into storage of their own (they may be views of kept factors)."""
    for name in names:
        for param in model.get_submodule(name).parameters():
            param.data = param.data.clone()


@contextmanager
def trainable(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """The named modules' parameters (own storage) require grad, every other parameter does not; the flags and
    the train/eval mode come back on exit."""
    own_storage(model, names)
    mine = {id(p) for name in names for p in model.get_submodule(name).parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in mine)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
