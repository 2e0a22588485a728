"""Leaderboard: a table of every cell, with the provenance of its numbers.

Printed in the terminal (tabulate), written as ``leaderboard.md`` and
``leaderboard.json`` beside the cell results. Each row says model, method,
allocator, target, kept fraction of the decomposable parameters, parameters
and bytes of the model as evaluated, and every metric; the footer says data
and splits, example counts, seed, hardware and versions. A NaN or infinite
metric is flagged, not ranked; failed cells are listed with their error.

Metrics of hardware-bound profilers (latency, memory, energy; listed per cell
in ``hardware_metrics``) never share a table across hardware: they leave the
main table for one table per hardware fingerprint. Accuracies of compressed
cells that are not significantly different from their model's baseline on
the same examples (harness/report/significance.py) carry a ``≈`` mark, or
``(few)`` where the examples were too few to show a 5-point difference.

A row computed over several calibration draws (``[calibration] draws = K``)
is one row still, keyed by (model, method, allocator, target): every number
is the mean over its draws, written ``mean ± std [min, max] n=N`` (sample
standard deviation, ddof 1; harness/report/draws.py); ``leaderboard.json``
holds the spread per row (``spread``) and the draws' cell ids (``draws``).
Its accuracies are tested against the baseline draw by draw, never pooled
(``draws.tests_over_draws``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.provenance import hardware_label
from harness.report import draws, significance
from harness.run.record import CellRecord
from harness.store import atomic_write_json, atomic_write_text

SIZE_METRICS = ("kept_fraction", "params_kept", "bytes_kept", "model_params", "model_bytes")
ID_COLUMNS = ("model", "method", "allocator", "target", "kept")


def metric_order(names: set[str]) -> list[str]:
    def key(name: str) -> tuple[int, str]:
        if "acc" in name:
            return 0, name
        if "perplexity" in name:
            return 1, name
        return 2, name

    return sorted((n for n in names if n not in SIZE_METRICS), key=key)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{value} (flagged)"
        if abs(value) >= 1000:
            return f"{value:.4g}" if abs(value) >= 1e6 else f"{value:.1f}"
        return f"{value:.{digits}g}"
    return str(value)


def row_of(result: CellRecord, metrics: list[str]) -> dict[str, Any]:
    values = result.metrics
    sizes = result.sizes
    model, method, allocator, target = result.row_key
    row = {
        "model": model,
        "method": method,
        "allocator": allocator,
        "target": target,
        "kept": values.get("kept_fraction"),
        "params (M)": None if "model_params" not in sizes else sizes["model_params"] / 1e6,
        "MB": None if "model_bytes" not in sizes else sizes["model_bytes"] / 1e6,
    }
    for name in metrics:
        row[name] = values.get(name)
    if not result.ok:
        error = result.error or {}
        row["status"] = f"FAILED: {error.get('type', '')}: {error.get('message', '')}"[:120]
    return row


def order_key(result: CellRecord) -> tuple:
    """Baseline first per model, then method, allocator, target kind, larger targets first."""
    return result.order_key()


def build(results: list[CellRecord], alpha: float = significance.ALPHA) -> dict[str, Any]:
    """Rows and footer for ``results`` (baseline first per model, then suite order).

    ``significance`` holds, per row, the paired tests of each accuracy against
    the model's baseline; ``marks`` the metrics marked ``≈`` (not significant at
    ``alpha``) or ``(few)`` (nor resolvable); ``hardware_tables`` the hardware-bound metrics, one table per hardware.
    """
    ordered = sorted(results, key=order_key)
    names = set()
    for result in ordered:
        names |= set(result.metrics)
    hardware_names = hardware_metric_names(ordered)
    metrics = metric_order(names - hardware_names)
    groups = draws.group(ordered)
    rows, spreads = [], []
    for members in groups:
        row, spread = group_row(members, metrics)
        rows.append(row)
        spreads.append(spread)
    by_record = dict(zip(map(id, ordered), significance.against_baseline(ordered, alpha), strict=True))
    tests = [draws.tests_over_draws([by_record[id(r)] for r in members], members) for members in groups]
    marks = [{m: mark for m, t in row.items() if (mark := significance.mark_of(t))} for row in tests]
    lines = footer(results)
    if any(tests):
        lines.append(significance.footer_line(alpha))
        lines.append("Resolution (80% power): " + "; ".join(significance.resolution_lines(tests)))
    board = {
        "columns": list(rows[0]) if rows else [],
        "metrics": metrics,
        "rows": rows,
        "cell_ids": [members[0].cell_id for members in groups],
        "marks": marks,
        "significance": tests,
        "alpha": alpha,
        "hardware_tables": hardware_tables(ordered, hardware_names),
        "footer": lines,
    }
    if any(len(members) > 1 for members in groups):  # calibration draws: absent otherwise, as before
        lines.append(draws.FOOTER)
        board["spread"] = spreads
        board["draws"] = [[{"draw": draws.draw_of(r), "cell_id": r.cell_id} for r in m] for m in groups]
    return board


def group_row(members: list[CellRecord], metrics: list[str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """The row of one record, or of one configuration's calibration draws (``draws.group``): the mean over
    the draws that finished and each number's spread; a status where any draw failed."""
    if len(members) == 1:
        return row_of(members[0], metrics), {}
    ok = [r for r in members if r.ok]
    if not ok:
        row, spread = row_of(members[-1], metrics), {}
    else:
        row, spread = draws.aggregate([row_of(r, metrics) for r in ok])
    failed = [r for r in members if not r.ok]
    if failed:
        error = failed[0].error or {}
        what = f"FAILED in {len(failed)} of {len(members)} draws (first: draw {draws.draw_of(failed[0])})"
        row["status"] = f"{what}: {error.get('type', '')}: {error.get('message', '')}"[:160]
    return row, spread


def hardware_metric_names(results: list[CellRecord]) -> set[str]:
    """Metrics that any result says come from a hardware-bound profiler."""
    return {name for result in results for name in result.hardware_metrics}


def hardware_of(result: CellRecord) -> str:
    hw = result.hardware
    return hardware_label(hw) if hw else "unknown hardware"


def hardware_tables(ordered: list[CellRecord], names: set[str]) -> list[dict[str, Any]]:
    """One table per hardware label holding the hardware-bound metrics of the cells measured there."""
    groups: dict[str, list[CellRecord]] = {}
    for result in ordered:
        if names & set(result.metrics):
            groups.setdefault(hardware_of(result), []).append(result)
    tables = []
    for label, group in sorted(groups.items()):
        metrics = metric_order({n for r in group for n in r.metrics if n in names})
        rows, spreads = [], []
        for members in draws.group(group):  # a configuration's calibration draws: their mean, one row
            per_draw = []
            for result in [r for r in members if r.ok] or members[-1:]:
                row = row_of(result, [])
                per_draw.append({**{c: row[c] for c in ID_COLUMNS}, **{n: result.metrics.get(n) for n in metrics}})
            row, spread = draws.aggregate(per_draw) if len(per_draw) > 1 else (per_draw[0], {})
            rows.append(row)
            spreads.append(spread)
        table = {"hardware": label, "columns": [*ID_COLUMNS, *metrics], "metrics": metrics, "rows": rows}
        if any(spreads):
            table["spread"] = spreads
        tables.append(table)
    return tables


def footer(results: list[CellRecord]) -> list[str]:
    if not results:
        return []
    lines = []
    for note in sorted({r.model.get("note", "") for r in results if r.model}):
        lines.append(f"Model: {note}")
    data_lines = set()
    for result in results:
        for label, info in result.evaluations.items():
            if isinstance(info, dict) and info.get("data"):
                data_lines.add(f"Data ({label}): {info['data']}")
    lines.extend(sorted(data_lines))
    provenance = [r.provenance for r in results]
    limits = {p.get("limit") for p in provenance}
    seeds = {p.get("seed") for p in provenance}
    hardware = {hardware_label(p["hardware"]) for p in provenance if p.get("hardware")}
    given = ", ".join(str(v) for v in sorted(limits, key=str)) if limits - {None} else "none (each evaluator's own)"
    lines.append(f"Examples per task from --limit: {given}; seed: {', '.join(str(s) for s in sorted(seeds, key=str))}")
    lines.append(f"Hardware: {'; '.join(sorted(hardware))}")
    if len(hardware) > 1:
        lines.append(
            "Cells ran on different hardware: latency, memory and energy are shown in one table per hardware, "
            "never compared across; timing columns of other metrics are not comparable"
        )
    libraries = provenance[-1].get("libraries", {})
    versions = {"harness": provenance[-1].get("harness"), **libraries}
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    flagged = [
        f"{row_label(r)}: {name}"
        for r in results
        for name, value in r.metrics.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]
    if flagged:
        lines.append("Flagged non-finite metrics (not ranked): " + "; ".join(flagged))
    return lines


def row_label(result: CellRecord) -> str:
    return f"{result.method_label} {(result.target or {}).get('label', '')}".strip()


def render(board: dict[str, Any], tablefmt: str = "github") -> str:
    columns = board["columns"] + (["status"] if any("status" in r for r in board["rows"]) else [])
    marks = board.get("marks") or [{} for _ in board["rows"]]
    spreads = draws.shown(board.get("spread") or [{} for _ in board["rows"]], board["metrics"])
    rows = [
        [marked(row.get(c), mark.get(c), spread.get(c)) for c in columns]
        for row, mark, spread in zip(board["rows"], marks, spreads, strict=True)
    ]
    text = tabulate(rows, headers=columns, tablefmt=tablefmt, disable_numparse=True)
    for table in board.get("hardware_tables", []):
        spreads = draws.shown(table.get("spread") or [{} for _ in table["rows"]], table["metrics"])
        body = [
            [marked(row.get(c), None, spread.get(c)) for c in table["columns"]]
            for row, spread in zip(table["rows"], spreads, strict=True)
        ]
        text += f"\n\n### Hardware-bound metrics on {table['hardware']}\n\n"
        text += tabulate(body, headers=table["columns"], tablefmt=tablefmt, disable_numparse=True)
    return text + "\n\n" + "\n".join(f"- {line}" for line in board["footer"]) + "\n"


def marked(value: Any, mark: str | None, spread: dict | None = None) -> str:
    """``value`` as the tables write it: with its significance mark, and its spread over calibration
    draws (``mean ± std [min, max] n=N``) where it is a mean of several."""
    text = fmt(value) if not spread else f"{fmt(value)} {draws.describe(spread, fmt)}"
    return text if not mark else f"{text} {mark}"


def write(results: list[CellRecord], directory: Path, title: str, board: dict[str, Any] | None = None) -> str:
    """Write leaderboard.md and leaderboard.json under ``directory``; return the markdown.
    ``board``: ``build(results)`` where the caller has it already."""
    board = build(results) if board is None else board
    text = f"# {title}\n\n" + render(board)
    atomic_write_text(Path(directory) / "leaderboard.md", text)
    atomic_write_json(Path(directory) / "leaderboard.json", board)
    return text
