"""The ``harness sync`` command (entry point ``harness.commands``: this module imports no mlflow)."""

from __future__ import annotations

import argparse
from pathlib import Path

import harness


class SyncCommand(harness.Command):
    name = "sync"
    help = "log to MLflow the cells of a results directory that it does not have yet"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("results_dir", help="e.g. results/smoke")
        parser.add_argument("--tracking-uri", help="default: the suite's mlflow options, else $MLFLOW_TRACKING_URI")
        parser.add_argument("--experiment", help="default: the suite's mlflow options, else the suite's name")

    def run(self, args: argparse.Namespace) -> int:
        from harness_mlflow.sync import sync

        summary = sync(Path(args.results_dir), args.tracking_uri, args.experiment)
        print(
            f"{summary.logged} cell(s) logged, {summary.present} already present in experiment "
            f"{summary.experiment!r} at {summary.tracking_uri or 'the default tracking store'}"
        )
        return 0


@harness.hookimpl
def register_commands(register):
    register(SyncCommand())
