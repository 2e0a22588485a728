"""Connecting to Ray and choosing what each cell's task asks for.

``connect`` starts a local Ray runtime (offline, no dashboard) or joins a
running cluster at ``--address``; an address that does not answer is a
one-line error at once instead of Ray's long wait. ``task_resources`` turns
the suite's device into a task's request: CPUs for a CPU suite, one GPU of
one accelerator type for a GPU suite, so that every cell of a suite runs on
the same kind of hardware across nodes.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError, first_line

ACCELERATOR = "accelerator_type:"
ADDRESS = re.compile(r"^(?:ray://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
FORWARDED_ENV = ("HARNESS_LOAD_PLUGINS", "HARNESS_DISABLE_PLUGINS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
"""Variables of this process that workers of a remote cluster get too (which plugins load, offline switches)."""
PROBE_TIMEOUT_S = 5.0
AUTH_HINT = " (a cluster with token authentication also needs RAY_AUTH_MODE=token and its token here)"


@dataclass(frozen=True)
class RaySettings:
    """The ``--executor ray`` options of ``harness run``."""

    address: str | None = None
    workers: int | None = None
    cpus_per_cell: int | None = None
    accelerator_type: str | None = None
    retries: int = 2


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HarnessError(
            "--executor ray: expected Ray to be installed, got no module 'ray': pip install 'harness[ray]'"
        ) from None
    return ray


def connect(settings: RaySettings, threads: int) -> bool:
    """Join ``settings.address`` or start a local runtime; False where Ray was already initialized (kept as is)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # worker lines forwarded without colour codes
    if settings.address:
        check_address(settings.address)
    try:
        start(ray, settings, threads)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise HarnessError(init_error(settings, exc)) from None
    return True


def start(ray: Any, settings: RaySettings, threads: int) -> None:
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if settings.address:
        ray.init(address=settings.address, runtime_env={"env_vars": forwarded_env()}, **quiet)
    else:
        workers = settings.workers or max(1, (os.cpu_count() or 1) // threads)
        # "local": a new runtime even where `ray start` left one running on this machine
        ray.init(address="local", num_cpus=workers * threads, include_dashboard=False, **quiet)


def init_error(settings: RaySettings, exc: BaseException) -> str:
    where = f"--address {settings.address}" if settings.address else "--executor ray"
    hint = AUTH_HINT if settings.address and "RAY_AUTH_MODE" not in os.environ else ""
    return f"{where}: expected a Ray runtime to join, got {first_line(exc, 10_000)}{hint}"


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def check_address(address: str) -> None:
    """HOST:PORT, ray://HOST:PORT or auto; a HOST:PORT must accept a TCP connection within a few seconds."""
    if address == "auto":
        return
    match = ADDRESS.match(address)
    if not match:
        raise HarnessError(f"--address: expected HOST:PORT, ray://HOST:PORT or auto, got {address!r}")
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HarnessError(
            f"--address {address}: expected a running Ray cluster (started with `ray start --head`), "
            f"got no answer: {reason}"
        ) from None


# ---------------------------------------------------------------- resources
def accelerator_kinds(cluster: dict[str, float]) -> list[str]:
    """GPU kinds the cluster reports (``accelerator_type:H100`` resources)."""
    return sorted(key.removeprefix(ACCELERATOR) for key in cluster if key.startswith(ACCELERATOR))


def uses_gpu(device: str, cluster: dict[str, float]) -> bool:
    """Whether the suite's cells are GPU tasks: device cuda, or auto on a cluster with GPUs."""
    if device == "cpu":
        return False
    if device.startswith("cuda") and not cluster.get("GPU"):
        raise HarnessError(f"device: the suite asks for {device!r}, but the Ray cluster has no GPUs")
    return bool(cluster.get("GPU"))


def task_resources(device: str, cluster: dict[str, float], accelerator: str | None, threads: int) -> dict[str, Any]:
    """Ray task options of every cell: ``threads`` CPUs, or one GPU pinned to one accelerator type."""
    if not uses_gpu(device, cluster):
        if accelerator:
            raise HarnessError(f"--accelerator-type: only for cells on GPUs, got the suite's device {device!r}")
        return {"num_cpus": threads}
    return {"num_cpus": 1, "num_gpus": 1, **accelerator_pin(cluster, accelerator)}


def accelerator_pin(cluster: dict[str, float], requested: str | None) -> dict[str, str]:
    kinds = accelerator_kinds(cluster)
    if requested:
        if requested not in kinds:
            known = ", ".join(kinds) or "none reported"
            raise HarnessError(f"--accelerator-type: expected a GPU kind of the cluster ({known}), got {requested!r}")
        return {"accelerator_type": requested}
    if len(kinds) > 1:
        raise HarnessError(
            f"--executor ray: expected GPUs of one kind (every cell of a suite runs on the same hardware), "
            f"got a cluster with {', '.join(kinds)}: name one with --accelerator-type"
        )
    return {"accelerator_type": kinds[0]} if kinds else {}
