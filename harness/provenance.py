"""What produced a number: versions, hardware, git revision, seeds."""

from __future__ import annotations

import platform
import random
import re
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "lm_eval", "datasets", "mlflow", "tensorly", "numpy", "pluggy", "gguf")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return versions


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device | str = "cpu") -> dict[str, object]:
    """A fingerprint of the machine a number was measured on."""
    import os

    info: dict[str, object] = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    info["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        index = torch.device(device).index if torch.device(device).type == "cuda" else None
        info.update(
            gpu=torch.cuda.get_device_name(index or 0),
            cuda=torch.version.cuda,
            driver=nvidia_driver(),
        )
    return info


@cache
def nvidia_driver() -> str | None:
    """The NVIDIA driver version: from NVML where its bindings are installed, else the kernel module."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no bindings, no library, no driver: try the kernel module's own file
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for [\w-]+)?\s+([\d.]+)", text)
    return match.group(1) if match else None


def hardware_label(hw: dict) -> str:
    """Short human label: the GPU where cells ran on one, else the CPU."""
    if str(hw.get("device", "cpu")).startswith("cuda") and hw.get("gpu"):
        return f"{hw['gpu_count']}x {hw['gpu']}"
    return f"CPU {hw.get('cpu')} ({hw.get('cpu_count')} cores)"


@cache
def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; deterministic algorithms where torch has them."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
