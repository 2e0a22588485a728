"""A decoder block's stages for sequential statistics within a block (``harness.run.propagated``): its
target layers in the order its forward reaches them, grouped by input, and one stage's statistics with
the block's earlier stages compressed, each forward cut short once the stage's layers have run."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

import torch
from torch import nn

from harness.api import LayerStats
from harness.run.blocks import Batch, move_tensors, on_all
from harness.run.pipeline import LiveStats, _BlockCollector, _hooks


def block_stages(block: nn.Module, model: nn.Module, names: Sequence[str], batch: Batch, device) -> list[list[str]]:
    """``names`` (the block's target layers) in the order the block's forward on ``batch`` reaches them,
    grouped by input: layers that receive the very same tensor form one stage (q/k/v, gate/up). Layers the
    forward never calls form a last stage."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    reached: set[str] = set()

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in reached:
                return
            reached.add(name)
            stage = next((s for x, s in seen if x is args[0]), None)
            if stage is None:
                seen.append((args[0], [name]))
            else:
                stage.append(name)

        return record

    with _hooks(model, names, hook), on_all([block], device):
        block(batch.hidden, *batch.args, **batch.kwargs)
    stages = [stage for _, stage in seen]
    missing = [n for n in names if n not in reached]
    return [*stages, missing] if missing else stages


class _StageDone(Exception):
    """Raised once a stage's layers have run on a batch: the rest of the block's forward is not needed."""


class _StopAfter:
    """Forward hooks (``hook``, for ``pipeline._hooks``) that end a block's forward once every layer of ``names``
    has run (``run``)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names, self.ran = set(names), set()

    def hook(self, name: str) -> Callable:
        def after(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.ran.add(name)
            if self.ran >= self.names:
                raise _StageDone

        return after

    def run(self, block: nn.Module, batch: Batch) -> None:
        self.ran = set()
        with suppress(_StageDone):
            block(batch.hidden, *batch.args, **batch.kwargs)


def stage_stats(
    model: nn.Module,
    block: nn.Module,
    names: Sequence[str],
    inputs: list,
    replacements: dict,
    kinds: frozenset[str],
    shapes: dict[str, tuple[int, int]],
    device: torch.device,
    tracker: LiveStats | None,
    anchor: list | None,
    dense: bool,
) -> dict[str, LayerStats]:
    """The statistics of ``names`` (one stage of ``block``) over the batches ``inputs``, with ``replacements``
    (the block's earlier stages, compressed) in place; each forward stops once the stage's
    layers have run. ``anchor``: the original model's batches, paired for ``anchor_cross``: each goes first
    through the uncompressed block (its originals put back for it), its layers' inputs stashed."""
    from harness.surgery import replaced

    paired = anchor is not None and "anchor_cross" in kinds
    collector = _BlockCollector({n: shapes[n] for n in names}, kinds, device, tracker, paired=paired)
    stop = _StopAfter(names)
    originals = {n: model.get_submodule(n) for n in replacements}
    moved = {n: move_tensors(r, device) for n, r in replacements.items()}
    # the collector's hooks first: a layer's statistics are in before its stop hook ends the forward
    with (
        _hooks(model, names, collector.hook),
        _hooks(model, names, stop.hook),
        on_all([block], device),
        replaced(model, moved, dense, False),
    ):
        for i, batch in enumerate(inputs):
            if paired:
                collector.stashing = True
                collector.start_batch()
                with _put_back(model, originals):
                    stop.run(block, anchor[i])
                collector.stashing = False
            collector.start_batch()
            stop.run(block, batch)
    return collector.finish()


@contextmanager
def _put_back(model: nn.Module, originals: dict[str, nn.Module]) -> Iterator[None]:
    """``originals`` in their places for a moment (whatever replaced them back on exit)."""
    from harness.surgery import _parent

    current = {}
    for name, module in originals.items():
        parent, child = _parent(model, name)
        current[name] = getattr(parent, child)
        setattr(parent, child, module)
    try:
        yield
    finally:
        for name, module in current.items():
            parent, child = _parent(model, name)
            setattr(parent, child, module)
