"""The ``harness`` command line.

Exit status: 0 success; 1 a cell failed (its error is in its result); 2 bad
input (one line on stderr naming the file, the key, what was expected and
what was received). Any other exception is a bug and keeps its traceback.
Heavy libraries are imported inside the commands, so ``--help`` and
``plugins`` answer at once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from harness.errors import HarnessError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> Parser:
    parser = Parser(prog="harness", description="Compare weight-decomposition methods for LLM compression.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="run a suite: every cell of its grid, then print the leaderboard")
    run.add_argument("suite", help="suite file (TOML)")
    run.add_argument(
        "--model",
        action="append",
        help="HF model id, local path or 'embedded' (repeatable); replaces the suite's models",
    )
    run.add_argument("--limit", type=positive_int, help="cap examples per evaluation task")
    run.add_argument("--results", default="results", help="results root directory (default: results)")
    run.add_argument("--force", action="store_true", help="recompute cells that are already done")
    run.add_argument("--device", help="override the suite's device (auto, cpu, cuda, cuda:1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    validate = sub.add_parser("validate", help="check a suite without running it")
    validate.add_argument("suite")

    plugins = sub.add_parser("plugins", help="list plugins with their versions and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    board = sub.add_parser("leaderboard", help="reprint the leaderboard of a results directory")
    board.add_argument("results_dir", help="e.g. results/smoke")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from harness import leaderboard
    from harness.runner import RunOptions, run_suite
    from harness.suite import load_suite

    suite = load_suite(args.suite)
    if args.model:
        suite = suite.with_models(args.model)
    if args.device:
        suite = replace(suite, device=args.device)
    options = RunOptions(
        results_root=Path(args.results),
        force=args.force,
        limit=args.limit,
        progress=not args.no_progress,
        command="harness " + shlex.join(sys.argv[1:]),
    )
    summary = run_suite(suite, options)
    text = leaderboard.write(summary.results, summary.results_dir, f"Leaderboard: {suite.name}")
    print(text)
    print(f"{summary.computed} cells computed, {summary.skipped} reused; results in {summary.results_dir}")
    if summary.failed:
        print(f"{len(summary.failed)} cell(s) failed; see their results for the error", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from harness.suite import load_suite

    suite = load_suite(args.suite)
    cells = 1 + sum(len(m.targets) * len(m.allocators) for m in suite.methods)
    print(
        f"{args.suite}: ok — suite {suite.name!r}, {len(suite.models)} model(s), {len(suite.methods)} method(s), "
        f"{cells} cell(s) per model"
    )
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    import json

    from harness.plugins import PLURAL, get_plugins

    plugins = get_plugins()
    infos = plugins.infos()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos] + [{"failed": plugins.failures}], indent=2))
        return 0
    from tabulate import tabulate

    rows = [
        [
            info.name,
            info.version,
            info.distribution or "—",
            "; ".join(f"{PLURAL[k]}: {', '.join(sorted(v))}" for k, v in sorted(info.registered.items())),
            ", ".join(info.hooks),
        ]
        for info in infos
    ]
    print(tabulate(rows, headers=["plugin", "version", "distribution", "registers", "hooks"]))
    for name, error in plugins.failures.items():
        print(f"FAILED to load plugin {name!r}: {error}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness import leaderboard
    from harness.store import read_results

    directory = Path(args.results_dir)
    results = read_results(directory)
    if not results:
        raise HarnessError(f"{directory}: no cell results")
    print(leaderboard.write(results, directory, f"Leaderboard: {directory.name}"))
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "plugins": cmd_plugins,
    "leaderboard": cmd_leaderboard,
}

if __name__ == "__main__":
    sys.exit(main())
