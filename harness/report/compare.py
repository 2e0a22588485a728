"""What changed between two runs of a suite, cell by cell.

Cells are matched by their labels (model, method, allocator, target), not by
cell id: a new harness version or data file changes every id while the
question is still "what did this cell score before and now". For every
matched cell and metric: the value in A, in B, B - A and the relative
change; cells found in only one run are listed; a cell whose id changed says
so (its configuration, versions or data differ). Hardware-bound metrics of
cells measured on different hardware are compared but flagged.

Calibration draws (``[calibration] draws = K``): the records of one cell that
differ only by draw are one cell here, as in the leaderboard
(``draws.group``): A and B are the means over the draws that finished,
written ``mean ± std [min, max] n=N`` (``draws.describe``), and B - A the
difference of the means. Two tests say whether a change is more than noise:

- over draws: where both runs have the same draws (two or more), draw d of
  A is paired with draw d of B (the same calibration windows where the seed
  is the same) in a paired t-test of B - A (``scipy.stats.ttest_rel``); where
  they share fewer than two, Welch's t-test of the two sets of draws
  (unpaired), and none where a side has a single draw. A note names the
  draws each side has where they differ, and the seeds where those differ.
- per example: accuracies with per-example outcomes in both runs get
  McNemar's exact test and the paired bootstrap (``significance.compare``)
  of B's record against A's of the same draw, one test per draw both have,
  never pooled; a cell of several draws shows the smallest p-value
  (``draws.tests_over_draws``). A single-draw cell gets its one test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.errors import HarnessError
from harness.report import draws, significance
from harness.report.leaderboard import SIZE_METRICS, fmt, hardware_of, marked, metric_order, order_key
from harness.run.record import CellRecord, row_label
from harness.store import read_results

Key = tuple[str, str, str, str]
Group = list[CellRecord]


def key_of(result: CellRecord) -> Key:
    return result.row_key


def load(directory: Path) -> dict[Key, Group]:
    """Row key -> the records of that cell: one record, or one configuration's draws (``draws.group``);
    where stale records of another configuration share the row key, the last in report order wins."""
    results = read_results(Path(directory))
    if not results:
        raise HarnessError(f"{directory}: no cell results")
    return {key_of(members[0]): members for members in draws.group(sorted(results, key=order_key))}


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
    """Rows (cell, metric, A, B, delta, relative; with ``A spread``/``B spread``, ``draws test`` and
    ``per example`` where they apply), and notes about unmatched, re-identified or re-drawn cells."""
    a, b = load(a_dir), load(b_dir)
    rows, notes = [], []
    for key in [k for k in a if k in b]:
        ga, gb = a[key], b[key]
        label = label_of(key)
        notes += identity_notes(label, ga, gb)
        rows += cell_rows(label, ga, gb, only_changed)
    notes += [f"only in A: {label_of(k)}" for k in a if k not in b]
    notes += [f"only in B: {label_of(k)}" for k in b if k not in a]
    drawn = any(len(a[k]) > 1 or len(b[k]) > 1 for k in a if k in b)
    out = {"a": str(a_dir), "b": str(b_dir), "matched": sum(k in b for k in a), "rows": rows, "notes": notes}
    if drawn:
        out["draws"] = True
    return out


def cell_rows(label: str, ga: Group, gb: Group, only_changed: bool) -> list[dict[str, Any]]:
    """One row per metric of a matched cell (``ga`` in A, ``gb`` in B)."""
    (means_a, spread_a), (means_b, spread_b) = draws.metric_means(ga), draws.metric_means(gb)
    hardware = {n for r in (*ga, *gb) for n in (r.get("hardware_metrics") or ())}
    other_hardware = {hardware_of(r) for r in ga} != {hardware_of(r) for r in gb}
    names = set(means_a) | set(means_b)
    plain = metric_order(names)
    ordered = [n for n in ("kept_fraction",) if n in names] + plain
    shown_a, shown_b = draws.shown([spread_a, spread_b], plain)
    examples = per_example_tests(ga, gb)
    rows = []
    for name in ordered:
        va, vb = means_a.get(name), means_b.get(name)
        diff, rel = delta(va, vb)
        if only_changed and va == vb:
            continue
        flag = " (different hardware)" if name in hardware and other_hardware else ""
        row = {"cell": label, "metric": name + flag, "A": va, "B": vb, "B - A": diff, "relative": rel}
        for column, shown in (("A spread", shown_a), ("B spread", shown_b)):
            if name in shown:
                row[column] = shown[name]
        constant_size = name in SIZE_METRICS and name not in shown_a and name not in shown_b
        if not constant_size and (over := draws_test(ga, gb, name)) is not None:
            row["draws test"] = over
        if name in examples:
            row["per example"] = examples[name]
        rows.append(row)
    return rows


def identity_notes(label: str, ga: Group, gb: Group) -> list[str]:
    """Changed cell ids, statuses, draws and seeds of one matched cell."""
    notes = []
    ids_a, ids_b = [r.get("cell_id") for r in ga], [r.get("cell_id") for r in gb]
    if len(ga) == len(gb) == 1:
        if ids_a != ids_b:
            notes.append(f"{label}: cell id {ids_a[0]} -> {ids_b[0]} (config, versions or data changed)")
    else:
        by_draw = {draws.draw_of(r): r.get("cell_id") for r in gb}
        changed = [r for r in ga if by_draw.get(draws.draw_of(r), r.get("cell_id")) != r.get("cell_id")]
        if changed:
            which = ", ".join(str(draws.draw_of(r)) for r in changed)
            notes.append(f"{label}: cell id of draw {which} changed (config, versions or data changed)")
    if status_of(ga) != status_of(gb):
        notes.append(f"{label}: status {status_of(ga)} -> {status_of(gb)}")
    da, db = [draws.draw_of(r) for r in ga], [draws.draw_of(r) for r in gb]
    if da != db:
        notes.append(f"{label}: draws {listed(da)} in A, {listed(db)} in B; {draws_plan(da, db)}")
    seeds_a, seeds_b = {r.provenance.get("seed") for r in ga}, {r.provenance.get("seed") for r in gb}
    if (len(ga) > 1 or len(gb) > 1) and seeds_a != seeds_b:
        notes.append(
            f"{label}: seed {listed(seeds_a)} in A, {listed(seeds_b)} in B: draw d of A and of B were drawn on "
            "other windows, paired by draw number only"
        )
    return notes


def status_of(group: Group) -> str:
    if len(group) == 1:
        return str(group[0].get("status"))
    failed = [draws.draw_of(r) for r in group if not r.ok]
    return "ok" if not failed else f"failed in {len(failed)} of {len(group)} draws ({listed(failed)})"


def listed(values: Sequence | set) -> str:
    return ", ".join(str(v) for v in sorted(values, key=str))


def draws_plan(da: Sequence[int], db: Sequence[int]) -> str:
    """What the tests do with draws that differ between the runs (``draws_test``)."""
    common = sorted(set(da) & set(db))
    if len(common) >= 2:
        return f"the test over draws pairs draws {listed(common)} only"
    if len(da) >= 2 and len(db) >= 2:
        return "fewer than 2 draws in common: Welch's t-test of the two sets of draws (unpaired)"
    tail = f"; per-example tests on draw {listed(common)}" if common else ""
    return "a single draw on one side: no test over draws" + tail


def draws_test(ga: Group, gb: Group, name: str) -> dict[str, Any] | None:
    """The test of ``name`` over calibration draws (module docstring); None where neither run has draws
    or a side has fewer than two finite values."""
    if len(ga) == 1 and len(gb) == 1:
        return None
    va, vb = finite_by_draw(ga, name), finite_by_draw(gb, name)
    common = sorted(set(va) & set(vb))
    if len(common) >= 2:
        a, b = [va[d] for d in common], [vb[d] for d in common]
        return {"test": "paired t", "draws": common, "n": len(common), "p": paired_t(a, b)}
    if len(va) >= 2 and len(vb) >= 2:
        p = welch_t(list(va.values()), list(vb.values()))
        return {"test": "Welch t", "n_a": len(va), "n_b": len(vb), "p": p}
    return None


def finite_by_draw(group: Group, name: str) -> dict[int, float]:
    values = {draws.draw_of(r): r.metrics.get(name) for r in group if r.ok}
    return {d: float(v) for d, v in values.items() if draws.is_number(v) and math.isfinite(v)}


def paired_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``b - a``; 1.0 where every difference is 0 (the test's 0/0),
    0.0 where they are all one nonzero value (no spread: the difference is the same on every draw)."""
    if all(x == y for x, y in zip(a, b, strict=True)):
        return 1.0
    from scipy import stats

    with warnings.catch_warnings():  # scipy warns of precision loss on a constant difference
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_rel(b, a).pvalue)


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) of ``b`` against ``a``."""
    if len(set(a)) == len(set(b)) == 1 and a[0] == b[0]:
        return 1.0
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(b, a, equal_var=False).pvalue)


def per_example_tests(ga: Group, gb: Group) -> dict[str, dict]:
    """McNemar and bootstrap of B against A (``significance.compare``) per draw both finished, summarised
    over the draws by ``draws.tests_over_draws`` (one draw: its test as it is)."""
    by_draw = {draws.draw_of(r): r for r in ga if r.ok}
    pairs = [(by_draw[draws.draw_of(r)], r) for r in gb if r.ok and draws.draw_of(r) in by_draw]
    if not pairs:
        return {}
    tests = [significance.compare(ra, rb) for ra, rb in pairs]
    if not all(tests):
        return {}
    return draws.tests_over_draws(tests, [rb for _, rb in pairs])


def written(test: dict[str, Any] | None) -> str:
    """A ``draws test`` or ``per example`` entry as the table writes it."""
    if not test:
        return "—"
    if "mcnemar_p" in test:
        many = f" (smallest of {len(test['draws'])} draws)" if "draws" in test else ""
        return f"McNemar p={test['mcnemar_p']:.3g}{many}, n={test['n']}"
    if test["test"] == "paired t":
        p = f"{test['p']:.3g}" if test["p"] else "0 (the same difference on every draw)"
        return f"paired t p={p}, {test['n']} draws"
    return f"Welch t p={test['p']:.3g}, {test['n_a']} vs {test['n_b']} draws"


FOOTER = {
    "draws": "A, B: the mean over a cell's calibration draws ± their sample standard deviation (ddof 1) [min, max] "
    "n=N, as the leaderboard; B - A and relative: of the means",
    "draws test": "over draws: paired t-test of B's draw d against A's draw d over the draws both have "
    "(scipy.stats.ttest_rel, two-sided); Welch's t-test where they share fewer than 2",
    "per example": f"per example: {significance.TEST} of B against A on the same examples (and a paired bootstrap, "
    "in compare's JSON): one test per calibration draw both runs have, never pooled; a cell of several draws "
    "shows the smallest p",
}


def render(comparison: dict[str, Any]) -> str:
    def cell(column: str, row: dict[str, Any]) -> str:
        value = row.get(column)
        if column == "relative":
            return "—" if value is None else f"{value:+.2%}"
        if column == "B - A":
            return "—" if value is None else f"{value:+.4g}"
        if column in ("A", "B"):
            return marked(value, None, row.get(f"{column} spread"))
        if column in ("draws test", "per example"):
            return written(value)
        return fmt(value)

    tests = [c for c in ("draws test", "per example") if any(c in row for row in comparison["rows"])]
    columns = ["cell", "metric", "A", "B", "B - A", "relative", *tests]
    body = [[cell(c, row) for c in columns] for row in comparison["rows"]]
    head = f"A: {comparison['a']}\nB: {comparison['b']}\n{comparison['matched']} cell(s) matched\n\n"
    table = tabulate(body, headers=columns, tablefmt="github", disable_numparse=True)
    text = head + (table if body else "no metric changed")
    notes = comparison["notes"] + [FOOTER[k] for k in ("draws", *tests) if k in tests or comparison.get(k)]
    if notes:
        text += "\n\n" + "\n".join(f"- {note}" for note in notes)
    return text + "\n"
