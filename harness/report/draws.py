"""Calibration draws in the reports: the records of one row's draws, their mean and their spread.

With ``[calibration] draws = K`` a calibrated cell is computed K times (draw
0 .. K-1, ``CellRecord.draw``), each on its own calibration windows. The
records of one configuration's draws (same row key, same config but for
the draw) make one leaderboard row and one ``harness check`` row: its
numbers are the mean over the draws that finished, its spread the sample
standard deviation (``ddof = 1``) and the min-max range, with ``n`` the
number of draws averaged. A record of a single draw (every record written
without the option) is a row of its own, as before.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from harness.run.cells import content_hash
from harness.run.record import CellRecord


def draw_of(record: CellRecord) -> int:
    return int(getattr(record, "draw", 0) or 0)


def series_key(record: CellRecord) -> tuple:
    """What the draws of one configuration share: the row key and the config less the draw."""
    config = dict(record.config or {})
    if isinstance(config.get("calibration"), dict):
        config["calibration"] = {k: v for k, v in config["calibration"].items() if k != "draw"}
    return (*record.row_key, content_hash(config))


def group(records: Sequence[CellRecord]) -> list[list[CellRecord]]:
    """``records`` in their order, the draws of one configuration gathered into one list (at the place of
    its first record, in draw order, the newest record per draw); every other record a list of its own."""
    series: dict[tuple, list[CellRecord]] = {}
    for record in records:
        series.setdefault(series_key(record), []).append(record)
    drawn = {key for key, members in series.items() if any(draw_of(r) for r in members)}
    out, placed = [], set()
    for record in records:
        key = series_key(record)
        if key not in drawn:
            out.append([record])
        elif key not in placed:
            placed.add(key)
            out.append(newest_per_draw(series[key]))
    return out


def newest_per_draw(records: Sequence[CellRecord]) -> list[CellRecord]:
    """One record per draw (the newest, an ok one before a failed one of the same time), in draw order."""
    chosen: dict[int, CellRecord] = {}
    for record in sorted(records, key=lambda r: (r.created, r.ok)):
        chosen[draw_of(record)] = record
    return [chosen[d] for d in sorted(chosen)]


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """n, mean, sample standard deviation (ddof = 1; NaN for one value), min and max of ``values``."""
    n = len(values)
    mean = math.fsum(values) / n
    std = statistics.stdev(values) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, float | int]]]:
    """One row from the rows of one configuration's draws (``rows``, one per draw that finished): each
    numeric column the mean over the draws that have it, the other columns the first row's; and, per
    numeric column, its ``spread`` (left out where a single draw has it)."""
    out = dict(rows[0])
    spreads = {}
    for column in rows[0]:
        values = [float(row[column]) for row in rows if is_number(row.get(column))]
        if not values or not all(math.isfinite(v) for v in values):
            continue
        summary = spread(values)
        out[column] = summary["mean"]
        if summary["n"] > 1:
            spreads[column] = summary
    return out, spreads


def describe(summary: dict[str, float | int], number: Callable[[float], str] = "{:.4g}".format) -> str:
    """``± std [min, max] n=N``: how a row's spread is written beside its mean (``number`` writes each)."""
    std, low, high = (number(summary[k]) for k in ("std", "min", "max"))
    return f"± {std} [{low}, {high}] n={summary['n']}"


def shown(spreads: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """The spreads a table writes: every metric's, and a size column's (kept, MB) only where it varies
    over the draws (an allocator that uses calibration data); the rest stay in ``leaderboard.json``."""
    return [{c: s for c, s in row.items() if c in metrics or s["max"] != s["min"]} for row in spreads]


def tests_over_draws(tests: Sequence[dict[str, dict]], members: Sequence[CellRecord]) -> dict[str, dict]:
    """The paired tests of a row against its baseline (``significance.compare``) where the row is one
    configuration's draws (``members``, ``tests`` one per draw): never pooled as if the draws were more
    examples (they are the same examples, evaluated K times). Each draw is tested on its own, and per
    metric the row holds every draw's test (``draws``, each with its ``draw``) and a summary: significant
    where any draw is (so ``≈`` claims that no draw differs), ``resolvable`` the largest of the draws',
    ``diff`` the mean of their differences, ``ci_low``/``ci_high`` the widest bounds, ``mcnemar_p`` and
    ``bootstrap_p`` the smallest p-values, ``n`` the fewest examples."""
    if len(tests) == 1:
        return tests[0]
    out = {}
    names = set.intersection(*(set(t) for t in tests))
    for name in sorted(names):
        per = [{**t[name], "draw": draw_of(r)} for t, r in zip(tests, members, strict=True)]
        out[name] = {
            "n": min(t["n"] for t in per),
            "diff": math.fsum(t["diff"] for t in per) / len(per),
            "ci_low": min(t["ci_low"] for t in per),
            "ci_high": max(t["ci_high"] for t in per),
            "bootstrap_p": min(t["bootstrap_p"] for t in per),
            "mcnemar_p": min(t["mcnemar_p"] for t in per),
            "significant": any(t["significant"] for t in per),
            "resolvable": max(t.get("resolvable", 0.0) for t in per),
            "draws": per,
        }
    return out


FOOTER = (
    "Calibration draws: a row computed over n > 1 calibration draws ([calibration] draws; windows drawn with "
    "seed + draw) shows the mean over its draws, ± their sample standard deviation (ddof 1) and [min, max]; "
    "its accuracies are tested against the baseline per draw, marked ≈ only where no draw differs significantly"
)


def metric_means(members: Sequence[CellRecord]) -> tuple[dict[str, Any], dict[str, dict[str, float | int]]]:
    """A group's metrics (``group``): the record's own for one record; for one configuration's draws the
    mean over the draws that finished (the last draw's where none did) and each metric's ``spread``, as
    the leaderboard's row of them (``aggregate``)."""
    if len(members) == 1:
        return dict(members[0].metrics), {}
    ok = [r for r in members if r.ok] or list(members[-1:])
    return aggregate([r.metrics for r in ok]) if len(ok) > 1 else (dict(ok[0].metrics), {})


def counted(counts: Sequence[int]) -> str:
    """``K draws`` (or ``K1-K2 draws`` where the groups have different numbers of them)."""
    low, high = min(counts), max(counts)
    return f"{low} draws" if low == high else f"{low}-{high} draws"
