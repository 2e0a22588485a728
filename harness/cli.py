"""The ``harness`` command line.

Exit status: 0 success; 1 a cell failed (its error is in its result), or
``leaderboard``/``report`` left out a cell file that cannot be read (without
``--allow-missing``); 2 bad input (one line on stderr naming the file, the
key, what was expected and what was received), or a results file that cannot
be written (disk full, read-only directory: one line naming the directory;
every cell written before is intact). Any other exception is a bug and keeps
its traceback.
Heavy libraries are imported inside the commands, so ``--help``,
``validate`` and ``plugins`` load no torch. Plugins add commands
(``harness.Command``) through the ``register_commands`` hook of the light
entry-point group ``harness.commands`` (e.g. ``harness sync``, from the MLflow
plugin).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from harness.cliargs import (
    add_layers_argument,
    add_memory_argument,
    add_ray_arguments,
    positive_int,
)
from harness.commands import Command
from harness.errors import HarnessError
from harness.run.interrupt import Interrupted


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(commands: dict[str, Command] | None = None) -> Parser:
    """The core commands, then ``commands`` (plugin commands; default: those of ``plugin_commands()``)."""
    parser = Parser(prog="harness", description="Compare weight-decomposition methods for LLM compression.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="run a suite: every cell of its grid, then print the leaderboard")
    run.add_argument("suite", help="suite file (TOML)")
    run.add_argument(
        "--model",
        action="append",
        help="HF model id, local path, 'embedded' or 'random:<shape>' (repeatable); replaces the suite's models",
    )
    add_layers_argument(run)
    run.add_argument("--limit", type=positive_int, help="cap examples per evaluation task")
    run.add_argument("--results", default="results", help="results root directory (default: results)")
    run.add_argument("--force", action="store_true", help="recompute cells that are already done")
    run.add_argument("--device", help="override the suite's device (auto, cpu, cuda, cuda:1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--shared",
        action="store_true",
        help="share the results directory with other runs of the suite at the same time: each computes the cells "
        "nobody has claimed, then reuses the others' (default: a second run on a directory waits for the first)",
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' warnings and progress bars (default: appended to run.log in the results)",
    )
    run.add_argument(
        "--executor",
        choices=("sequential", "ray"),
        default="sequential",
        help="sequential: one cell after another in this process (default); ray: every cell a Ray task",
    )
    add_memory_argument(run)
    run.add_argument(
        "--no-plan-check",
        action="store_true",
        help="run even where the plan (harness plan) says the run exceeds the device's memory",
    )
    add_ray_arguments(run.add_argument_group("with --executor ray"))

    plan = sub.add_parser(
        "plan",
        help="what a run will need per stage (device memory, host memory, disk), from the models' configs; "
        "exit 1 where it does not fit",
        epilog='On the block path ([calibration] pipeline = "blocks") the calibration and factorization stages '
        "count what is alive when each block collects and each group factorizes: the factors kept for every "
        'group factorized before it (keep = "memory": they pile up block after block; keep = "disk": '
        "memory-mapped group files, counted on disk in the factor storage stage, not in host memory) and, where "
        "statistics are collected, the 0.25 GiB a run keeps of its calibration text (bench/README.md).",
    )
    plan.add_argument("suite", help="suite file (TOML)")
    plan.add_argument(
        "--model", action="append", help="model spec (repeatable); replaces the suite's models, as in harness run"
    )
    plan.add_argument("--device", help="override the suite's device (auto, cpu, cuda, cuda:1)")
    add_layers_argument(plan)
    add_memory_argument(plan)
    plan.add_argument(
        "--executor", choices=("sequential", "ray"), default="sequential", help="the executor the run will use"
    )

    validate = sub.add_parser("validate", help="check a suite without running it")
    validate.add_argument("suite")
    add_layers_argument(validate)

    plugins = sub.add_parser("plugins", help="list plugins with their versions and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    board = sub.add_parser(
        "leaderboard", help="reprint the leaderboard of a results directory; exit 1 where a cell file is unreadable"
    )
    board.add_argument("results_dir", help="e.g. results/smoke")
    add_allow_missing(board)

    report = sub.add_parser(
        "report",
        help="write the leaderboard, Pareto plots and report.html (one static file) of a results directory; "
        "exit 1 where a cell file is unreadable",
    )
    report.add_argument("results_dir", help="e.g. results/smoke")
    add_allow_missing(report)

    compare = sub.add_parser("compare", help="what changed between two runs of a suite, cell by cell")
    compare.add_argument("results_a", help="results directory of the earlier run, e.g. results/smoke")
    compare.add_argument("results_b", help="results directory of the later run")
    compare.add_argument("--only-changed", action="store_true", help="hide metrics whose value did not change")

    show = sub.add_parser("show", help="a cell's settings, metrics and provenance (data sha256, versions, hardware)")
    show.add_argument("cell", help="cell id or an unambiguous prefix of it")
    show.add_argument("--results", default="results", help="results root or one suite's directory (default: results)")
    show.add_argument("--json", action="store_true", help="print the stored result as it is")

    check = sub.add_parser(
        "check", help="compare a results directory with a committed baseline; exit 1 if a number moved too far"
    )
    check.add_argument("results_dir", help="e.g. results/smoke")
    check.add_argument("--baseline", required=True, help="baseline file, e.g. suites/baselines/smoke.json")

    baseline = sub.add_parser("baseline", help="write the baseline file of a results directory (for harness check)")
    baseline.add_argument("results_dir", help="e.g. results/smoke")
    baseline.add_argument("-o", "--output", required=True, help="baseline file to write (its tolerances are kept)")

    export = sub.add_parser(
        "export", help="write a computed cell's compressed model (factored safetensors or a dense checkpoint)"
    )
    export.add_argument("suite", help="the suite file the cell was computed from")
    export.add_argument("cell", help="cell id or an unambiguous prefix of it")
    export.add_argument("--out", required=True, help="directory to write the model to")
    export.add_argument(
        "--format",
        choices=("factored", "dense"),
        default="factored",
        help="factored: two factors per decomposed layer, loaded by harness.load_compressed (default); "
        "dense: the reconstructed weights as a plain checkpoint of the original architecture",
    )
    export.add_argument("--results", default="results", help="results root (default: results)")

    for name, command in (plugin_commands()[0] if commands is None else commands).items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def add_allow_missing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 even where a cell file cannot be read (it is warned about and left out of the table)",
    )


def apply_layers(suite, layers: int | None):
    """``suite`` with its random models cut to ``layers`` blocks (``--layers``); unchanged without the flag."""
    from harness.suite import with_layers

    return suite if layers is None else suite.with_models(list(with_layers(suite.models, layers)))


def plugin_commands() -> tuple[dict[str, Command], list[str]]:
    """(name -> command, one-line problems) of the plugins in the entry-point group ``harness.commands``.

    A plugin that fails to load is a problem line, not an error: the core
    commands keep working. A name used twice (by two plugins, or by a plugin
    and the core) raises HarnessError naming both.
    """
    from harness.plugins import command_plugins

    plugins = command_plugins()
    table = plugins.registry["command"]
    problems = [
        f"command plugin {name!r} failed to load: {(error.splitlines() or [''])[0]}"
        for name, error in plugins.failures.items()
    ]
    commands = {}
    for name, entry in sorted(table.items()):
        if name in COMMANDS:
            raise HarnessError(f"plugin {entry.plugin!r} registers command {name!r}, a core command of harness")
        commands[name] = entry.component
    return commands, problems


def main(argv: list[str] | None = None) -> int:
    try:
        commands, problems = plugin_commands()
    except HarnessError as exc:  # a command name registered twice
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"harness: warning: {problem}", file=sys.stderr)
    args = build_parser(commands).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command in COMMANDS:
            return COMMANDS[args.command](args)
        return commands[args.command].run(args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # SIGINT / SIGTERM during a run: its finally blocks ran (harness.run.interrupt)
        print(f"harness: {exc}; finished cells are saved, rerun to resume", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return 130


def suite_from_args(args: argparse.Namespace):
    """The suite file with the command line's --model, --layers and --device applied."""
    from dataclasses import replace

    from harness.suite import check_device, load_suite

    suite = load_suite(args.suite)
    if args.model:
        suite = suite.with_models(args.model)
    suite = apply_layers(suite, args.layers)
    if args.device:
        suite = replace(suite, device=check_device(args.device, "--device"))
    return suite


def cmd_run(args: argparse.Namespace) -> int:
    if args.shared and args.force:
        raise HarnessError("--shared: not with --force (a shared run reuses what the other runs compute)")
    suite = suite_from_args(args)
    if args.executor == "ray" and suite.calibration.inputs == "propagated":
        raise HarnessError(
            f"{suite.file}: calibration.inputs: expected 'original' under --executor ray (its tasks factorize per "
            "method, not per cell), got 'propagated'; run this suite with the sequential executor"
        )
    if args.executor == "ray" and suite.calibration.draws > 1:
        raise HarnessError(
            f"{suite.file}: calibration.draws: expected 1 under --executor ray (its tasks calibrate once per "
            f"model), got {suite.calibration.draws}; run this suite with the sequential executor"
        )
    if not args.no_plan_check:  # from the models' configs, before anything heavy is imported or loaded
        from harness.plan import check_run

        check_run(suite, args.memory, args.executor)

    from harness.ray.executor import run_ray, settings_from
    from harness.report import leaderboard
    from harness.run.runner import RunOptions, run_suite
    from harness.store import StorageError

    settings = settings_from(args)
    options = RunOptions(
        results_root=Path(args.results),
        force=args.force,
        limit=args.limit,
        progress=not args.no_progress,
        verbose=args.verbose,
        command="harness " + shlex.join(args.argv),
        model_key="--model" if args.model else None,
        shared=args.shared,
    )
    try:
        summary = run_suite(suite, options) if settings is None else run_ray(suite, options, settings)
        text = summary.leaderboard  # written with the plots and report.html at the end of the run
        if text is None:
            text = leaderboard.write(summary.results, summary.results_dir, f"Leaderboard: {suite.name}")
    except StorageError as exc:  # disk full or read-only mid-run: one line, the finished cells are kept
        raise StorageError(f"{exc}; rerun to resume", exc.errno) from None
    print(text)
    print(f"{summary.computed} cells computed, {summary.skipped} reused; results in {summary.results_dir}")
    if summary.failed:
        print(f"{len(summary.failed)} cell(s) failed; see their results for the error", file=sys.stderr)
        return 1
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.plan import plan_suite

    suite = suite_from_args(args)
    plans = plan_suite(suite, memory_gib=args.memory, executor=args.executor)
    print("\n\n".join(plan.table() for plan in plans))
    return 0 if all(plan.fits() for plan in plans) else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from harness.modelcheck import validate_models
    from harness.suite import load_suite

    suite = apply_layers(load_suite(args.suite), args.layers)
    notes = validate_models(suite)
    cells = 1 + sum(len(m.targets) * len(m.allocators) for m in suite.methods)
    draws = suite.calibration.draws
    print(
        f"{args.suite}: ok — suite {suite.name!r}, {len(suite.models)} model(s), {len(suite.methods)} method(s), "
        f"{cells} cell(s) per model" + (f", the calibrated ones x {draws} calibration draws" if draws > 1 else "")
    )
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    import json

    from harness.plugins import PLURAL, command_plugins, get_plugins

    plugins = get_plugins()
    infos = plugins.infos()
    by_name = {info.name: info for info in infos}
    commands = command_plugins()  # the same entry-point names, in the group harness.commands
    for name, entry in commands.registry["command"].items():
        if entry.plugin in by_name:
            by_name[entry.plugin].registered.setdefault("command", []).append(name)
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
    for name, error in commands.failures.items():
        print(f"FAILED to load command plugin {name!r}: {error}")
    return 0


def stored_results(results_dir: str) -> tuple[Path, list, list]:
    """(directory, cell records, unreadable cell files) of a results directory, each unreadable file warned
    about on stderr; HarnessError where it holds no record."""
    from harness.store import scan_results, stderr_warning

    directory = Path(results_dir)
    scan = scan_results(directory)
    for bad in scan.unreadable:
        stderr_warning(bad.warning)
    if not scan.records:
        raise HarnessError(f"{directory}: no cell results" + (" that can be read" if scan.unreadable else ""))
    return directory, scan.records, scan.unreadable


def missing_status(unreadable: list, allow_missing: bool) -> int:
    """1 where cell files were left out (said on stderr), unless ``--allow-missing``; else 0."""
    if not unreadable or allow_missing:
        return 0
    print(
        f"harness: error: {len(unreadable)} cell file(s) could not be read and are missing from the table "
        "(see the warnings above); rerun the suite to recompute them, or pass --allow-missing",
        file=sys.stderr,
    )
    return 1


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.report import leaderboard

    directory, results, unreadable = stored_results(args.results_dir)
    print(leaderboard.write(results, directory, f"Leaderboard: {directory.name}"))
    return missing_status(unreadable, args.allow_missing)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import html as report

    directory, results, unreadable = stored_results(args.results_dir)
    report.write_all(results, directory, f"Leaderboard: {directory.name}")
    print(f"{directory / 'report.html'} (with leaderboard.md, leaderboard.json and Pareto plots beside it)")
    return missing_status(unreadable, args.allow_missing)


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.report import compare

    print(compare.render(compare.compare(Path(args.results_a), Path(args.results_b), args.only_changed)), end="")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from harness.report import show

    path = show.find_cell(args.cell, Path(args.results))
    result = show.load_cell(path)
    if args.json:
        import json

        print(json.dumps(result.to_json(), indent=2, allow_nan=True))
    else:
        print(show.describe(result, path), end="")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from harness.report import check

    report = check.check(Path(args.results_dir), Path(args.baseline))
    print(check.render(report), end="")
    return 0 if report.ok else 1


def cmd_baseline(args: argparse.Namespace) -> int:
    from harness.report import check

    document = check.write_baseline(Path(args.results_dir), Path(args.output), "harness " + shlex.join(args.argv))
    print(f"{args.output}: {len(document['rows'])} rows from {args.results_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from harness.export import export_cell
    from harness.suite import load_suite

    exported = export_cell(load_suite(args.suite), Path(args.results), args.cell, Path(args.out), args.format)
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in exported.files.items() if size > 1e5)
    print(f"{exported.directory}: cell {exported.cell_id} exported {exported.format} ({sizes})")
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "plan": cmd_plan,
    "plugins": cmd_plugins,
    "leaderboard": cmd_leaderboard,
    "report": cmd_report,
    "compare": cmd_compare,
    "show": cmd_show,
    "check": cmd_check,
    "baseline": cmd_baseline,
    "export": cmd_export,
}

if __name__ == "__main__":
    sys.exit(main())
