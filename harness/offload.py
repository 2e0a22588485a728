"""Block-wise offload (issue 16, point 3): a decoder's blocks kept in host memory or
on disk, each brought to the run device only for its own forward.

``offload = "cpu"`` or ``"disk"`` in a suite loads the model on the host
(``low_cpu_mem_usage``), then hands it to accelerate's ``dispatch_model`` with
a device map at block granularity: every decoder block on ``"cpu"`` (or
``"disk"``: memory-mapped files under the offload folder), everything else
(embeddings, rotary buffers, final norm, LM head) on the run device.
accelerate's hooks then move one block's weights to the device for its forward
and drop them afterwards, so the device holds the non-block modules, one block
and the activations: what lets 70B calibrate on one GPU. Every forward pays
for moving all blocks' weights over the bus; evaluation of a model that fits
several GPUs is faster with ``device_map = "auto"``.

What changes for the harness (all of it through ``materialized``):
- an offloaded module's parameters are on the ``meta`` device outside its
  forward: code that reads weights (factorization, surgery's bias and dense
  copies) does so inside ``materialized(modules)``, which brings them to the
  execution device for the duration (accelerate's ``align_module_device``);
- the layer-sequential pipeline does not move offloaded blocks itself
  (``harness.run.blocks.on_device`` leaves modules with accelerate hooks
  where they are): their hooks do it;
- methods that need the ``fisher`` or ``grad`` statistic (gradients of the weights) are
  refused: their gradients would land on weights that exist only during a
  forward.

On a CPU run device ``"cpu"`` changes nothing (host and device are one) and
``"disk"`` keeps the blocks memory-mapped from disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

OFFLOADS = ("cpu", "disk")


def decoder_blocks(model: nn.Module) -> str:
    """The name of the ``nn.ModuleList`` holding the decoder's blocks: the one with the most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = name, params
    if best is None:
        raise ValueError(f"offload: no list of decoder blocks found in {type(model).__name__}")
    return best


def device_map_for(model: nn.Module, mode: str, device: torch.device) -> dict[str, str]:
    """A device map for ``dispatch_model``: each block on ``mode``, every other module on ``device``."""
    if mode not in OFFLOADS:
        raise ValueError(f"offload: expected one of {', '.join(OFFLOADS)}, got {mode!r}")
    container = decoder_blocks(model)
    blocks = model.get_submodule(container)
    placement = {f"{container}.{i}": mode for i in range(len(blocks))}
    inside = f"{container}."
    for name, module in model.named_modules():
        if not name or name == container or name.startswith(inside):
            continue
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own and not any(name.startswith(f"{other}.") for other in placement):
            placement[name] = str(device)
    return placement


def offload_blocks(model: nn.Module, mode: str, device: torch.device | str, folder: Path) -> nn.Module:
    """``model`` (on the host) dispatched with its blocks on ``mode`` and the rest on ``device``."""
    from accelerate import dispatch_model

    device = torch.device(device)
    placement = device_map_for(model, mode, device)
    if mode == "disk":
        folder.mkdir(parents=True, exist_ok=True)
    main = "cpu" if device.type == "cpu" else str(device)
    quiet = logging.getLogger("accelerate.big_modeling")  # its "parameters on the meta device" warning is
    level = quiet.level  # what offloading means: the harness's own log line says it once
    quiet.setLevel(logging.ERROR)
    try:
        return dispatch_model(
            model, device_map=placement, main_device=main, offload_dir=str(folder) if mode == "disk" else None
        )
    finally:
        quiet.setLevel(level)


def is_offloaded(module: nn.Module) -> bool:
    """True where accelerate's hooks manage where ``module`` (or a submodule) keeps its weights."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


@contextmanager
def materialized(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside, each offloaded module's parameters are real tensors on its execution device (read-only use)."""
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for module in modules:
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and getattr(hook, "offload", False):
                stack.enter_context(align_module_device(module, hook.execution_device))
        yield


def offload_like(module: nn.Module, original: nn.Module) -> nn.Module:
    """``module`` (a replacement of ``original``) offloaded as ``original`` is: its tensors kept in host
    memory, brought to the same execution device for each forward; unchanged where ``original`` is not."""
    hook = getattr(original, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        return module
    from accelerate import cpu_offload

    return cpu_offload(module.to("cpu"), execution_device=hook.execution_device)
