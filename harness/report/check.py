"""Regression checks: a results directory against a committed baseline.

``harness baseline results/smoke -o suites/baselines/smoke.json`` writes every
leaderboard number of the suite (one row per model, method, allocator and
target; the columns of the leaderboard's main table: kept fraction, parameters,
bytes and every metric) with a header saying how it was made (command, seed,
limit, versions, hardware, git revision) and the tolerances to apply.
``harness check results/smoke --baseline suites/baselines/smoke.json``
compares the numbers of a new run with it, prints a table of what moved and
exits 0 when everything is within tolerance, 1 when not.

Tolerances are rules, applied in order; every rule whose ``metric`` and ``row``
patterns (shell globs; a row is "model method allocator target", e.g.
``embedded svd uniform keep=0.95``) match a number sets the keys it names:

- ``abs`` and ``rel``: a number passes when |current - baseline| <= abs + rel * |baseline|
  (numpy's ``isclose``); with neither set it must be equal.
- ``recovery``: the least recovery allowed for compressed rows, measured in the new
  run against the same run's uncompressed baseline row of the model (as
  llm-compressor's CI does with 0.95): current / uncompressed where higher is
  better, uncompressed / current where lower is better (perplexity).
- ``spread``: for rows computed over several calibration draws (``[calibration]
  draws = K``): the current value is the mean over the draws, and the allowance
  grows by ``spread`` x the sample standard deviation (ddof 1) of the draws:
  |mean - baseline| <= abs + rel * |baseline| + spread * std. ``spread = 1``
  passes a baseline within one standard deviation of the mean (``2``: about
  95 % of the draws' spread). A row of one draw has no spread: the rule adds
  nothing there, and the entry says so.
- ``ignore``: not compared (e.g. timings).

Every row is compared by its mean over the draws of its newest configuration
(one number per metric, however many draws); a draw that failed fails the row.
``harness baseline`` writes that mean, with ``draws`` (n) and ``std`` (per
metric) for rows of several draws.

A row may carry a ``source`` (a string: where its numbers come from, e.g. a
paper's table, for baselines that hold published figures rather than a run's,
suites/baselines/papers/); it is never compared, ``harness check`` prints it
under the table for the rows it shows, and ``harness baseline`` refuses to
overwrite a file whose rows have one. Baselines without it load as before.

Hardware-bound metrics (latency, memory, energy) are not in the main table and
are not compared. A compressed row whose cell failed, a missing row or metric
fails the check; a row the baseline does not have is listed and not checked.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.options import parse_options
from harness.provenance import hardware_label
from harness.report import draws, leaderboard
from harness.run.record import CellRecord, row_label
from harness.store import atomic_write_text, read_results, scan_results

FORMAT = "harness-baseline/1"
KEY = ("model", "method", "allocator", "target")
NOT_NUMBERS = (*KEY, "status")
DEFAULT_TOLERANCES: list[dict[str, Any]] = [
    {"metric": "*", "rel": 1e-6, "why": "reruns on one machine are bit-identical; allow float noise only"},
]
UPDATE_NOTE = (
    "rerun the suite, then `harness baseline <results dir> -o <this file>` (keeps these tolerances); "
    "commit the new file in the same commit as the change that moved the numbers, the reason in the message"
)


@dataclass(frozen=True)
class Rule:
    metric: str = "*"
    """Glob on the leaderboard column (e.g. "*acc*", "perplexity", "MB")."""
    row: str = "*"
    """Glob on "model method allocator target" (e.g. "* svd * keep=0.99")."""
    abs: float | None = None
    rel: float | None = None
    recovery: float | None = None
    spread: float | None = None
    """Multiples of the current run's standard deviation over its calibration draws added to the allowance."""
    ignore: bool = False
    why: str = ""


@dataclass
class Entry:
    row: str
    metric: str
    baseline: float | None
    current: float | None
    status: str
    """ok (equal), moved (within tolerance), FAIL, MISSING, NEW, ignored."""
    allowed: float | None = None
    recovery: float | None = None
    note: str = ""
    source: str = ""
    """The baseline row's ``source`` (published figures), if it has one."""
    spread: dict[str, float | int] | None = None
    """The current value's spread over calibration draws (n, mean, std, min, max), where it is a mean."""

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline


@dataclass
class CheckReport:
    baseline_file: Path
    results_dir: Path
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(e.status == status for e in self.entries)

    @property
    def ok(self) -> bool:
        return not any(e.status in ("FAIL", "MISSING") for e in self.entries)


# ---------------------------------------------------------------- rows of a results directory
def higher_is_better(results: list[CellRecord]) -> dict[str, bool]:
    higher: dict[str, bool] = {}
    for result in results:
        higher.update(result.higher_is_better)
    return higher


def latest_by_row(results: list[CellRecord]) -> tuple[dict[tuple, list[CellRecord]], list[str]]:
    """Per leaderboard row its records: one, or one configuration's calibration draws (``draws.group``);
    the newest where a directory holds several; and notes saying so."""
    groups: dict[tuple, list[list[CellRecord]]] = {}
    for members in draws.group(results):
        groups.setdefault(members[0].row_key, []).append(members)
    chosen, notes = {}, []
    for key, group in groups.items():
        group.sort(key=lambda m: (max(r.created for r in m), all(r.ok for r in m)))
        chosen[key] = group[-1]
        if len(group) > 1:
            what = "cells" if all(len(m) == 1 for m in group) else "cells or series of calibration draws"
            notes.append(f"{row_label(key)}: {len(group)} {what} in the directory, the newest is used")
    return chosen, notes


def row_numbers(members: list[CellRecord]) -> tuple[dict[str, float], dict[str, dict]]:
    """A row's numbers (``numbers``): its record's, or the mean over its calibration draws with the
    spread of each (``draws.aggregate``)."""
    if len(members) == 1:
        return numbers(members[0]), {}
    return draws.aggregate([numbers(r) for r in members])


def first_failure(members: list[CellRecord]) -> CellRecord | None:
    return next((r for r in members if not r.ok), None)


def numbers(result: CellRecord) -> dict[str, float]:
    """The row's numbers as the leaderboard's main table shows them (hardware-bound metrics excluded)."""
    hardware = set(result.hardware_metrics)
    names = leaderboard.metric_order(set(result.metrics) - hardware)
    row = leaderboard.row_of(result, names)
    return {
        k: float(v)
        for k, v in row.items()
        if k not in NOT_NUMBERS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------- baseline files
def make_baseline(results_dir: Path, command: str, tolerances: list[dict] | None = None) -> dict[str, Any]:
    """The baseline document for every cell under ``results_dir`` (every cell must be ok)."""
    scan = scan_results(Path(results_dir))
    if scan.unreadable:  # a baseline without those rows would pass every later check that lacks them too
        raise HarnessError(
            f"{scan.unreadable[0]}: expected every cell file readable for a baseline, got "
            f"{len(scan.unreadable)} that cannot be read; rerun the suite to recompute them"
        )
    results = scan.records
    if not results:
        raise HarnessError(f"{results_dir}: expected cell results to make a baseline from, got none")
    chosen, notes = latest_by_row(results)
    failed = [row_label(k) for k, m in chosen.items() if first_failure(m) is not None]
    if failed:
        raise HarnessError(
            f"{results_dir}: expected every cell ok for a baseline, got failed cells: {'; '.join(failed)}"
        )
    provs = [r.provenance for m in chosen.values() for r in m]
    last = max(provs, key=lambda p: p.get("created") or "")
    header = {
        "made_by": command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "suite": sorted({r.suite for m in chosen.values() for r in m}),
        "suite_file": sorted({p.get("suite_file") for p in provs if p.get("suite_file")}),
        "run_commands": sorted({p.get("command") for p in provs if p.get("command")}),
        "seed": sorted({p.get("seed") for p in provs}, key=str),
        "limit": sorted({p.get("limit") for p in provs}, key=str),
        "git": sorted({p.get("git") or "unknown" for p in provs}),
        "hardware": sorted({hardware_label(p["hardware"]) for p in provs if p.get("hardware")}),
        "platform": (last.get("hardware") or {}).get("platform"),
        "harness": last.get("harness"),
        "plugins": last.get("plugins"),
        "libraries": last.get("libraries"),
        "notes": notes,
        "update": UPDATE_NOTE,
    }
    rows = []
    for key, members in sorted(chosen.items(), key=lambda item: leaderboard.order_key(item[1][0])):
        values, spreads = row_numbers(members)
        row = {**dict(zip(KEY, key, strict=True)), "cell_id": members[0].cell_id, "metrics": values}
        if len(members) > 1:  # the mean of calibration draws: how many, and their standard deviations
            row["draws"] = len(members)
            row["std"] = {name: spread["std"] for name, spread in spreads.items()}
        rows.append(row)
    return {"format": FORMAT, "header": header, "tolerances": tolerances or DEFAULT_TOLERANCES, "rows": rows}


def write_baseline(results_dir: Path, out: Path, command: str) -> dict[str, Any]:
    """Write the baseline of ``results_dir`` to ``out``, keeping the tolerances ``out`` already has.

    A file holding published figures (rows with a ``source``) is never overwritten by a run's numbers.
    """
    tolerances = None
    if Path(out).exists():
        try:
            existing = load_baseline(Path(out))
        except HarnessError:
            existing = None
        if existing is not None and any("source" in row for row in existing["rows"]):
            raise HarnessError(
                f"-o: expected a baseline of a run to overwrite, got {out}: it holds published figures "
                "(rows with a source); write the run's baseline to another file"
            )
        tolerances = existing["tolerances"] if existing is not None else None
    document = make_baseline(results_dir, command, tolerances)
    text = json.dumps(document, indent=2, allow_nan=True) + "\n"
    try:
        atomic_write_text(Path(out), text)
    except OSError as exc:
        raise HarnessError(f"-o: expected a writable file, got {str(out)!r}: {exc.strerror or exc}") from None
    return document


def load_baseline(path: Path) -> dict[str, Any]:
    """Read and validate a baseline file; HarnessError naming the file and key on any problem."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HarnessError(f"{path}: baseline file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path}: cannot read baseline file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{path}: expected a baseline file (JSON), got invalid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        got = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise HarnessError(f"{path}: format: expected {FORMAT!r}, got {got!r}")
    rules = document.get("tolerances", [])
    if not isinstance(rules, list):
        raise HarnessError(f"{path}: tolerances: expected a list of rules, got {rules!r}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise HarnessError(f"{path}: tolerances[{i}]: expected a rule (an object), got {rule!r}")
    document["rules"] = [parse_options(Rule, rule, f"tolerances[{i}]", str(path)) for i, rule in enumerate(rules)]
    rows = document.get("rows")
    if not isinstance(rows, list):
        raise HarnessError(f"{path}: rows: expected a list of rows, got {rows!r}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("metrics"), dict) or any(k not in row for k in KEY):
            raise HarnessError(f"{path}: rows[{i}]: expected {', '.join(KEY)} and metrics, got {row!r}")
        if "source" in row and not isinstance(row["source"], str):
            got = row["source"]
            raise HarnessError(f"{path}: rows[{i}].source: expected a string (the citation), got {got!r}")
    return document


# ---------------------------------------------------------------- comparison
def rule_for(rules: list[Rule], row: str, metric: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for rule in rules:
        if fnmatch.fnmatchcase(metric, rule.metric) and fnmatch.fnmatchcase(row, rule.row):
            for name in ("abs", "rel", "recovery", "spread"):
                if getattr(rule, name) is not None:
                    merged[name] = getattr(rule, name)
            if rule.ignore:
                merged["ignore"] = True
    return merged


def lower_is_better(metric: str, higher: dict[str, bool]) -> bool:
    if metric in higher:
        return not higher[metric]
    return any(word in metric for word in ("perplexity", "loss", "error", "MB", "params"))


def recovery_of(metric: str, current: float, reference: float | None, higher: dict[str, bool]) -> float | None:
    if reference is None or not all(math.isfinite(v) for v in (current, reference)):
        return None
    numerator, denominator = (reference, current) if lower_is_better(metric, higher) else (current, reference)
    return numerator / denominator if denominator else None


def compare_number(
    row: str, metric: str, base: float, current: float | None, rule: dict, recovery, spread: dict | None = None
) -> Entry:
    """One number against the baseline's under ``rule``; ``spread`` the current value's over its calibration
    draws (``current`` is then their mean), which the rule's ``spread`` turns into allowance."""
    if rule.get("ignore"):
        return Entry(row, metric, base, current, "ignored")
    if current is None:
        return Entry(row, metric, base, None, "MISSING", note="metric missing from the new run")
    allowed = rule.get("abs", 0.0) + rule.get("rel", 0.0) * abs(base) if math.isfinite(base) else 0.0
    widen = spread_allowance(rule.get("spread"), spread)
    if math.isfinite(base):
        allowed += widen
    entry = Entry(row, metric, base, current, "ok", allowed=allowed, recovery=recovery, spread=spread)
    if spread:
        entry.note = f"mean of {spread['n']} draws, std {spread['std']:.3g}"
    elif rule.get("spread") is not None:
        entry.note = "one calibration draw: no spread to allow"
    same = current == base or (math.isnan(current) and math.isnan(base))
    if not same:
        finite = math.isfinite(current) and math.isfinite(base)
        entry.status = "moved" if finite and abs(current - base) <= allowed else "FAIL"
        if entry.status == "FAIL":
            why = f"|delta| > {allowed:.3g}" if finite else "non-finite value changed"
            entry.note = f"{why}; {entry.note}" if entry.note else why
    floor = rule.get("recovery")
    if floor is not None and recovery is not None and recovery < floor:
        entry.status = "FAIL"
        entry.note = (entry.note + "; " if entry.note else "") + f"recovery {recovery:.4f} < {floor}"
    elif floor is not None and recovery is None:
        entry.note = "recovery not computable"
    return entry


def check(results_dir: Path, baseline_file: Path) -> CheckReport:
    results = read_results(Path(results_dir))
    document = load_baseline(baseline_file)
    report = CheckReport(Path(baseline_file), Path(results_dir))
    suites = {r.suite for r in results}
    expected = set(document.get("header", {}).get("suite") or [])
    if expected and suites and not suites & expected:
        raise HarnessError(
            f"--baseline: expected a baseline of suite {', '.join(sorted(map(str, suites)))}, "
            f"got {baseline_file} of suite {', '.join(sorted(expected))}"
        )
    chosen, report.notes = latest_by_row(results)
    higher = higher_is_better(results)
    current = {key: None if first_failure(m) else row_numbers(m) for key, m in chosen.items()}
    references = {key[0]: (current.get(key) or ({}, {}))[0] for key in chosen if key[1] == "baseline"}
    seen = set()
    for row in document["rows"]:
        key = tuple(row[k] for k in KEY)
        seen.add(key)
        label = row_label(key)
        if key not in chosen:
            report.entries.append(Entry(label, "*", None, None, "MISSING", note="row missing from the new run"))
            continue
        if current[key] is None:
            failure = first_failure(chosen[key])
            error = failure.get("error") or {}
            where = f" (calibration draw {failure.draw})" if len(chosen[key]) > 1 else ""
            note = f"cell failed{where}: {error.get('type')}: {error.get('message')}"[:200]
            report.entries.append(Entry(label, "*", None, None, "FAIL", note=note))
            continue
        reference = references.get(key[0]) or {}
        source = row.get("source", "")
        values, spreads = current[key]
        for metric, base in row["metrics"].items():
            value = values.get(metric)
            is_compressed = key[1] != "baseline"
            recovery = (
                recovery_of(metric, value, reference.get(metric), higher)
                if is_compressed and value is not None
                else None
            )
            rule = rule_for(document["rules"], label, metric)
            entry = compare_number(label, metric, float(base), value, rule, recovery, spreads.get(metric))
            entry.source = source
            report.entries.append(entry)
    for key in chosen:
        if key not in seen:
            report.entries.append(Entry(row_label(key), "*", None, None, "NEW", note="row not in the baseline"))
    return report


def _num(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}"


def render(report: CheckReport) -> str:
    from tabulate import tabulate

    shown = [e for e in report.entries if e.status not in ("ok", "ignored")]
    lines = []
    if shown:
        table = [
            [
                e.row,
                e.metric,
                _num(e.baseline),
                _num(e.current),
                _num(e.delta, 3),
                _num(e.delta / abs(e.baseline), 3) if e.delta is not None and e.baseline else "—",
                _num(e.recovery, 4),
                _num(e.allowed, 3),
                e.status,
                e.note,
            ]
            for e in shown
        ]
        headers = ["row", "metric", "baseline", "current", "delta", "rel", "recovery", "allowed", "status", "note"]
        lines.append(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
        lines.append("")
        sources = dict.fromkeys((e.row, e.source) for e in shown if e.source)
        lines += [f"source of {row}: {source}" for row, source in sources]
        if sources:
            lines.append("")
    lines += [f"note: {note}" for note in report.notes]
    compared = [e for e in report.entries if e.status in ("ok", "moved", "FAIL") and e.metric != "*"]
    rows = {e.row for e in report.entries if e.status != "NEW"}
    verdict = "ok" if report.ok else "FAILED"
    lines.append(
        f"check {verdict}: {len(compared)} numbers in {len(rows)} rows against {report.baseline_file}: "
        f"{report.count('ok')} unchanged, {report.count('moved')} moved within tolerance, "
        f"{report.count('FAIL')} out of tolerance, {report.count('MISSING')} missing, "
        f"{report.count('ignored')} ignored, {report.count('NEW')} new rows not checked"
    )
    return "\n".join(lines) + "\n"


def spread_allowance(multiple: float | None, spread: dict | None) -> float:
    """``multiple`` x the sample standard deviation over the draws; 0 without either (one draw)."""
    if multiple is None or not spread or not math.isfinite(spread["std"]):
        return 0.0
    return multiple * spread["std"]
