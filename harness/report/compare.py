"""What changed between two runs of a suite, cell by cell.

Cells are matched by their labels (model, method, allocator, target), not by
cell id: a new harness version or data file changes every id while the
question is still "what did this cell score before and now". For every
matched cell and metric: the value in A, in B, B - A and the relative
change; cells found in only one run are listed; a cell whose id changed says
so (its configuration, versions or data differ). Hardware-bound metrics of
cells measured on different hardware are compared but flagged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.errors import HarnessError
from harness.report.leaderboard import fmt, hardware_of, metric_order, order_key
from harness.run.record import CellRecord, row_label
from harness.store import read_results

Key = tuple[str, str, str, str]


def key_of(result: CellRecord) -> Key:
    return result.row_key


def load(directory: Path) -> dict[Key, CellRecord]:
    results = read_results(Path(directory))
    if not results:
        raise HarnessError(f"{directory}: no cell results")
    return {key_of(r): r for r in sorted(results, key=order_key)}


def label_of(key: Key) -> str:
    return row_label(key)


def delta(a: Any, b: Any) -> tuple[float | None, float | None]:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None, None
    if not (math.isfinite(a) and math.isfinite(b)):
        return None, None
    diff = b - a
    return diff, (diff / abs(a) if a else None)


def compare(a_dir: Path, b_dir: Path, only_changed: bool = False) -> dict[str, Any]:
    """Rows (cell, metric, A, B, delta, relative), and notes about unmatched or re-identified cells."""
    a, b = load(a_dir), load(b_dir)
    rows, notes = [], []
    for key in [k for k in a if k in b]:
        ra, rb = a[key], b[key]
        label = label_of(key)
        if ra.get("cell_id") != rb.get("cell_id"):
            notes.append(
                f"{label}: cell id {ra.get('cell_id')} -> {rb.get('cell_id')} (config, versions or data changed)"
            )
        if ra.status != rb.status:
            notes.append(f"{label}: status {ra.get('status')} -> {rb.get('status')}")
        hardware = set(ra.get("hardware_metrics") or ()) | set(rb.get("hardware_metrics") or ())
        other_hardware = hardware_of(ra) != hardware_of(rb)
        names = set(ra.get("metrics", {})) | set(rb.get("metrics", {}))
        ordered = [n for n in ("kept_fraction",) if n in names] + metric_order(names)
        for name in ordered:
            va, vb = ra.get("metrics", {}).get(name), rb.get("metrics", {}).get(name)
            diff, rel = delta(va, vb)
            if only_changed and va == vb:
                continue
            flag = " (different hardware)" if name in hardware and other_hardware else ""
            rows.append({"cell": label, "metric": name + flag, "A": va, "B": vb, "B - A": diff, "relative": rel})
    notes += [f"only in A: {label_of(k)}" for k in a if k not in b]
    notes += [f"only in B: {label_of(k)}" for k in b if k not in a]
    return {"a": str(a_dir), "b": str(b_dir), "matched": sum(k in b for k in a), "rows": rows, "notes": notes}


def render(comparison: dict[str, Any]) -> str:
    def cell(column: str, value: Any) -> str:
        if column == "relative":
            return "—" if value is None else f"{value:+.2%}"
        if column == "B - A":
            return "—" if value is None else f"{value:+.4g}"
        return fmt(value)

    columns = ["cell", "metric", "A", "B", "B - A", "relative"]
    body = [[cell(c, row[c]) for c in columns] for row in comparison["rows"]]
    head = f"A: {comparison['a']}\nB: {comparison['b']}\n{comparison['matched']} cell(s) matched\n\n"
    table = tabulate(body, headers=columns, tablefmt="github", disable_numparse=True)
    text = head + (table if body else "no metric changed")
    if comparison["notes"]:
        text += "\n\n" + "\n".join(f"- {note}" for note in comparison["notes"])
    return text + "\n"
