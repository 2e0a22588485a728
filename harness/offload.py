"""Block-wise offload (issue 16, point 3): a decoder's blocks kept in host memory or
on disk, each brought to the run device only for its own forward.

``offload = "cpu"`` or ``"disk"`` in a suite hands the model to accelerate's
``dispatch_model`` with a device map at block granularity: every decoder
block on ``"cpu"`` (or ``"disk"``: memory-mapped files under the offload
folder), everything else (embeddings, rotary buffers, final norm, LM head) on
the run device. How it gets there (``harness.models.load_model``): under
``"disk"`` the load itself is bounded, the host holding one block at a time
beside the non-block modules, never the whole model: a ``random:`` model is
materialized block by block, each block written to the folder
(``write_block``) and put back on the meta device before the next; a local
directory or hub id is loaded by transformers with the device map
(``device_map_for`` of the model built on the meta device) and the folder, so
the blocks go from the checkpoint to disk. ``"cpu"`` keeps the blocks in host
memory by definition (the whole model is there either way) and the embedded
GGUF model (135M parameters) is small: both load the model whole on the host
(``low_cpu_mem_usage``), then dispatch it (``offload_blocks``).
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


def offload_blocks(model: nn.Module, mode: str, device: torch.device | str, folder: Path | None) -> nn.Module:
    """``model`` (on the host) dispatched with its blocks on ``mode`` and the rest on ``device``.

    Under ``"disk"``, where ``folder`` already holds accelerate's ``index.json``
    (every block written by ``write_block``), the blocks' weights are read from
    there and their parameters may be on the meta device; otherwise they are
    written to ``folder`` now (from host memory).
    """
    from accelerate import dispatch_model

    device = torch.device(device)
    placement = device_map_for(model, mode, device)
    if mode == "disk":
        folder.mkdir(parents=True, exist_ok=True)
    main = "cpu" if device.type == "cpu" else str(device)
    with quiet_dispatch():
        return dispatch_model(
            model, device_map=placement, main_device=main, offload_dir=str(folder) if mode == "disk" else None
        )


@contextmanager
def quiet_dispatch() -> Iterator[None]:
    """accelerate's "parameters on the meta device" warning silenced: it is what offloading means (the
    harness's own log line says it once)."""
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def write_block(block: nn.Module, prefix: str, folder: Path) -> None:
    """``block``'s tensors (on the host) written to ``folder`` in accelerate's offload format, then its
    parameters put back on the meta device.

    The tensors are those ``offload_blocks`` writes for it (its state dict: parameters and persistent
    buffers), named as in the whole model (``prefix``: the block's name there, e.g. ``model.layers.3``):
    one memory-mappable ``.dat`` file each and their entries merged into ``index.json``
    (``accelerate.utils.offload_state_dict``). Its buffers stay (the hooks bring them to the device).
    """
    from accelerate.utils import offload_state_dict, set_module_tensor_to_device

    offload_state_dict(str(folder), {f"{prefix}.{name}": t for name, t in block.state_dict().items()})
    for name, _ in list(block.named_parameters()):
        set_module_tensor_to_device(block, name, "meta")


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
