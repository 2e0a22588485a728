"""A decoder's blocks for the layer-sequential pipeline (harness/run/pipeline.py):
which blocks hold which target layers, moving a block (and what it receives) to
the collection device and back, and capturing what the first block receives."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.api import LayerInfo
from harness.offload import is_offloaded
from harness.surgery import _LAYER_INDEX

FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f")
"""Attribute names under which decoders keep the norm between the last block and the LM head."""


# ---------------------------------------------------------------- the model's blocks
@dataclass
class BlockPlan:
    blocks: list[nn.Module]
    """The blocks to run, in order (up to the last with a target, or all where the head is one)."""
    members: list[list[str]]
    """Target layer names per block."""
    head: list[str]
    """Target layers after the blocks (the LM head)."""
    final_norm: nn.Module | None


def block_plan(model: nn.Module, layers: Sequence[LayerInfo]) -> BlockPlan | str:
    """The blocks the pipeline runs and their target layers, or why the model is not supported."""
    containers, head, by_index = set(), [], {}
    for layer in layers:
        match = _LAYER_INDEX.search(f".{layer.name}.")
        if match is None:
            head.append(layer.name)
            continue
        containers.add(layer.name[: match.start() - 1] if match.start() else "")
        by_index.setdefault(int(match.group(1)), []).append(layer.name)
    if len(containers) > 1:
        return f"target layers lie in more than one list of blocks ({', '.join(sorted(containers))})"
    if not containers:
        return "no target layer inside a block"
    (container_name,) = containers
    container = model.get_submodule(container_name) if container_name else model
    if not isinstance(container, nn.ModuleList):
        return f"{container_name} is a {type(container).__name__}, not a torch.nn.ModuleList of blocks"
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        return f"its blocks differ in attention type ({', '.join(sorted(set(layer_types)))})"
    final_norm = None
    if head:
        parent_name = container_name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        norms = [getattr(parent, a, None) for a in FINAL_NORMS]
        final_norm = next((n for n in norms if isinstance(n, nn.Module)), None)
        if final_norm is None:
            return f"no final norm found beside {container_name} (looked for {', '.join(FINAL_NORMS)})"
    last = len(container) - 1 if head else max(by_index)
    if last >= len(container):
        return f"layer index {last} beyond the {len(container)} blocks of {container_name}"
    blocks = [container[i] for i in range(last + 1)]
    return BlockPlan(blocks, [by_index.get(i, []) for i in range(last + 1)], head, final_norm)


# ---------------------------------------------------------------- device moves
def move_tensors(obj: Any, device: torch.device, _depth: int = 0) -> Any:
    """``obj`` with its tensors on ``device``: tensors, modules, lists, tuples, dicts, dataclasses and
    plain objects' attributes (moved in place), a few levels deep."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, nn.Module):
        return obj.to(device)
    if _depth > 4 or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
        return obj
    if isinstance(obj, list):
        return [move_tensors(v, device, _depth + 1) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move_tensors(v, device, _depth + 1) for v in obj)
    if isinstance(obj, dict):
        return {k: move_tensors(v, device, _depth + 1) for k, v in obj.items()}
    if hasattr(obj, "__dict__"):
        for key, value in list(vars(obj).items()):
            moved = move_tensors(value, device, _depth + 1)
            if moved is not value:
                vars(obj)[key] = moved
    return obj


def device_of(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """``module`` on ``device`` inside (moved there and back where it lives elsewhere)."""
    home = device_of(module)
    if home is None or home == device or is_offloaded(module):  # accelerate's hooks place offloaded blocks
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


# ---------------------------------------------------------------- capture
class _Captured(Exception):
    """Raised by block 0's pre-hook: the rest of the forward is not needed."""


@dataclass
class Batch:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def capture_inputs(
    model: nn.Module, first_block: nn.Module, batches: torch.Tensor, batch_size: int, device: torch.device
) -> list[Batch]:
    """What ``first_block`` receives for each batch of ``batches`` (samples, seqlen), on ``device``."""
    captured: list[Batch] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        captured.append(Batch(hidden.detach(), rest, kwargs))
        raise _Captured

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    ids_device = (device_of(embeddings) if embeddings is not None else None) or device
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for chunk in batches.split(max(1, batch_size)):
                try:
                    model(input_ids=chunk.to(ids_device), use_cache=False)
                except _Captured:
                    pass
                else:
                    raise RuntimeError(f"the forward never reached {type(first_block).__name__} 0")
    finally:
        handle.remove()
    return [move_tensors(dataclasses.replace(b), device) if ids_device != device else b for b in captured]


@contextmanager
def on_all(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    if not modules:
        yield
        return
    with on_device(modules[0], device), on_all(modules[1:], device):
        yield
