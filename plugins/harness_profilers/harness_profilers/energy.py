"""Energy per generated token from NVML's total-energy counter.

``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded;
Volta and newer) is read before and after greedy generations of
``new_tokens`` tokens, repeated for at least ``min_seconds`` because the
counter updates only every few tens of milliseconds. Joules per token is the
energy of the whole ``generate`` (prefill included) over the tokens it
generated; ``avg_power_w`` is that energy over the elapsed time. It is the
whole GPU's energy, idle power included, not the model's share.

Where there is no such counter (CPU, no NVML library, an older GPU) the
profiler reports no metric and says why in info: a missing number, never 0.
"""

from __future__ import annotations

import time

import torch

import harness
from harness_profilers.options import EnergyOptions
from harness_profilers.timing import generate, is_cuda, model_device, prompt_ids, synchronize


def nvml_handle(device: torch.device):
    """(pynvml module, handle) of the GPU behind ``device``, or (None, reason)."""
    try:
        import pynvml
    except ImportError:
        return None, "NVML bindings not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and OSError for a missing libnvidia-ml
        return None, f"NVML did not initialise: {exc}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        props = torch.cuda.get_device_properties(index)
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
    except Exception:  # older torch without PCI ids, or a bus-id format mismatch: fall back to the index
        try:
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            return None, f"NVML has no handle for CUDA device {index}: {exc}"


def energy_counter(device: torch.device):
    """A callable returning the GPU's total energy in joules, or (None, reason)."""
    if not is_cuda(device) or not torch.cuda.is_available():
        return None, f"no energy counter on {device}: NVML reports GPU energy only"
    nvml, handle = nvml_handle(device)
    if nvml is None:
        return None, handle
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as exc:
        return None, f"this GPU has no total-energy counter (nvmlDeviceGetTotalEnergyConsumption: {exc})"
    return (lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0), None


def profile(model, tokenizer, options: EnergyOptions, ctx):
    """``Energy.profile``: the measurement (this module imports torch)."""
    device = model_device(model, ctx.device)
    read, reason = energy_counter(device)
    if read is None:
        ctx.log(f"energy: not measured: {reason}")
        return harness.EvalResult({}, {"available": False, "reason": reason, "device": str(device)})
    ids = prompt_ids(model, options.batch_size, options.prompt_len, ctx.seed, device)
    with torch.inference_mode():
        outcome = measure(lambda: generate(model, ids, options.new_tokens), read, options, device)
    tokens = outcome["runs"] * options.batch_size * options.new_tokens
    metrics = {
        "joules_per_token": outcome["joules"] / tokens,
        "avg_power_w": outcome["joules"] / outcome["seconds"],
    }
    info = {
        "available": True,
        "counter": "nvmlDeviceGetTotalEnergyConsumption (whole GPU, mJ since driver load)",
        "device": str(device),
        "tokens": tokens,
        "units": {"joules_per_token": "J per generated token (prefill included)", "avg_power_w": "W"},
        **outcome,
    }
    return harness.EvalResult(metrics, info, {"joules_per_token": False, "avg_power_w": False})


def measure(work, read, options: EnergyOptions, device: torch.device) -> dict:
    for _ in range(options.warmup):
        work()
    synchronize(device)
    runs = 0
    joules0, started = read(), time.perf_counter()
    while runs < options.min_runs or time.perf_counter() - started < options.min_seconds:
        work()
        runs += 1
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"runs": runs, "joules": read() - joules0, "seconds": seconds}
