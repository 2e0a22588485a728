"""Peak memory of a forward pass (or a generation) and the bytes of the weights on the device.

CUDA: the caching allocator's peak allocated and reserved bytes, after
``empty_cache`` and ``reset_peak_memory_stats``; ``activation_peak_mb`` is
the peak above what was allocated before the pass (weights and all).

CPU: the process's peak resident set during the pass, above its resident set
just before (after ``gc.collect`` and, with glibc, ``malloc_trim(0)``, so
that memory freed earlier is not counted as resident and reused unseen). Linux keeps a peak (VmHWM) that writing
"5" to ``/proc/self/clear_refs`` resets, which gives the pass's own peak;
where that is not possible, a thread samples RSS (psutil) every millisecond,
which can miss a short spike. Which method was used is in info.

``weights_mb``: bytes of the model's parameters and buffers on the device
(shared tensors counted once), whatever the method's own accounting says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
import threading
from pathlib import Path

import torch

import harness
from harness_profilers.options import MemoryOptions
from harness_profilers.timing import generate, is_cuda, model_device, prompt_ids, synchronize

MB = 1e6
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def weight_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the parameters and buffers on ``device``, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device != device or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss() -> int | None:
    """Resident set of this process in bytes."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (looked up once: ``find_library`` runs ``ldconfig``)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``); False where there is none.

    Without it, a pass can reuse pages freed by earlier work that are still
    resident, and its own peak above the resident set reads as zero.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # returns whether pages were released; either way the heap is trimmed now
    return True


def reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS counter (VmHWM); False where the kernel does not let us."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class RSSSampler:
    """Samples RSS on a thread while the block runs; ``peak`` is the largest sample."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak = current_rss() or 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss() or 0)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RSSSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss() or 0)


def profile(model, tokenizer, options: MemoryOptions, ctx):
    """``Memory.profile``: the measurement (this module imports torch)."""
    device = model_device(model, ctx.device)
    ids = prompt_ids(model, options.batch_size, options.prompt_len, ctx.seed, device)

    @torch.inference_mode()
    def work() -> None:
        if options.new_tokens:
            generate(model, ids, options.new_tokens)
        else:
            model(input_ids=ids, use_cache=options.new_tokens > 0)

    measure = cuda_peak if is_cuda(device) and torch.cuda.is_available() else cpu_peak
    metrics, info = measure(work, device)
    metrics["weights_mb"] = weight_bytes(model, device) / MB
    info |= {
        "units": {name: "MB (1e6 bytes)" for name in metrics},
        "device": str(device),
        "workload": (f"generate {options.new_tokens} tokens" if options.new_tokens else "one forward pass")
        + f" of {options.batch_size} x {options.prompt_len} seeded random token ids",
    }
    return harness.EvalResult(metrics, info, {name: False for name in metrics})


def cuda_peak(work, device: torch.device) -> tuple[dict[str, float], dict]:
    gc.collect()
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    synchronize(device)
    peak_allocated = torch.cuda.max_memory_allocated(device)
    metrics = {
        "peak_allocated_mb": peak_allocated / MB,
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / MB,
        "activation_peak_mb": (peak_allocated - before) / MB,
    }
    return metrics, {
        "method": "torch.cuda.max_memory_allocated/reserved after reset_peak_memory_stats",
        "allocated_before_bytes": before,
    }


def cpu_peak(work, device: torch.device) -> tuple[dict[str, float], dict]:
    work()  # first call allocates lazily-created state (caches, thread pools): not the pass's own
    gc.collect()
    trimmed = release_free_heap()
    before = current_rss()
    if before is None:
        return {}, {"method": "none", "note": "no way to read this process's RSS on this platform"}
    if reset_peak_rss():
        work()
        peak = (_status_kb("VmHWM") or 0) * 1024
        method = "Linux VmHWM reset through /proc/self/clear_refs"
    else:
        with RSSSampler() as sampler:
            work()
        peak, method = sampler.peak, "RSS sampled every 1 ms on a thread (may miss short spikes)"
    metrics = {"peak_rss_mb": peak / MB, "peak_rss_delta_mb": max(peak - before, 0) / MB}
    info = {"method": method, "heap_trimmed": trimmed, "rss_before_bytes": before, "peak_rss_bytes": peak}
    return metrics, info
