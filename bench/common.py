"""What every benchmark script shares: the machine it ran on, and printing and saving its figures."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from harness.provenance import cpu_model, library_versions


def machine() -> dict:
    """Threads, CPU, platform and library versions: what a figure needs to say about where it was measured."""
    return {
        "threads": torch.get_num_threads(),
        "hardware": f"CPU {cpu_model()}",
        "platform": platform.platform(),
        "libraries": library_versions(),
    }


def report(args: argparse.Namespace, outcome: dict, render: Callable[[dict], str]) -> int:
    """Print the table; with ``--json FILE``, write the figures and their configuration there."""
    if args.json:  # first: a rendering error must not lose the figures
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(outcome, indent=2) + "\n")
    print(render(outcome))
    return 0


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int | None = None) -> None:
    """``--threads`` and ``--json``, and ``--repeats`` where the script repeats, the same in every script."""
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the figures and configuration here")


def new_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def script_main(parse: Callable[[], argparse.Namespace], run: Callable, render: Callable[[dict], str]) -> int:
    """Parse the command line, run, then save and print the figures (``report``)."""
    args = parse()
    return report(args, run(args), render)
