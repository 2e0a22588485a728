"""Argument types and shared argument groups of the ``harness`` command line (one line per bad value)."""

from __future__ import annotations

import argparse


def positive_int(text: str, least: int = 1, what: str = "a positive integer") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def count(text: str) -> int:
    return positive_int(text, 0, "a non-negative integer")


def add_layers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layers",
        type=positive_int,
        metavar="N",
        help="keep the first N transformer blocks of every random:<shape> model (shape-only models only)",
    )


def add_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory",
        type=positive_float,
        metavar="GiB",
        help="memory of the chosen device for the plan, in GiB (default: the CUDA device's total memory; "
        "on the CPU the machine's RAM)",
    )


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_ray_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster: HOST:PORT of its head (ray start --head), ray://HOST:PORT or auto; "
        "default: a local Ray runtime on this machine",
    )
    group.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="cells at once on the local runtime (default: CPUs / --cpus-per-cell)",
    )
    group.add_argument(
        "--cpus-per-cell",
        type=positive_int,
        metavar="N",
        help="torch threads of every cell, and CPUs a CPU cell reserves (default: the threads of a sequential "
        "run here, so that the numbers are the same)",
    )
    group.add_argument(
        "--accelerator-type",
        metavar="KIND",
        help="the GPU kind every cell runs on, as Ray names it (e.g. H100); needed on a cluster with GPUs of "
        "several kinds",
    )
    group.add_argument("--retries", type=count, metavar="N", help="retries of a cell whose worker dies (default: 2)")
