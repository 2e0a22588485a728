"""Pareto plots of a suite: every metric against kept bytes and against kept parameters.

One PNG per size axis (``pareto_bytes.png``, ``pareto_params.png``) beside the
leaderboard, one panel per metric, one line per method x allocator (per model
where a suite has several; per hardware for hardware-bound metrics measured
on several machines), the baseline as a star and a dotted level, and the
suite's Pareto front (the points no other point beats on both size and the
metric) as a grey step line. The size axis is the decomposable weights' kept
bytes / parameters where every cell has them (the ``params`` profiler), else
the whole model's as evaluated. Drawn with matplotlib's Agg canvas (no display).

Calibration draws (``[calibration] draws = K``): the draws of one cell are one
point (``draws.group``), at the mean over the draws that finished, with an
error bar of ± their spread (sample standard deviation, ddof 1, as the
leaderboard's) on the metric axis; the legend and report.html's caption say
"mean ± spread over K draws". The size axis is the same for every draw where
the allocator does not use calibration data; where it does vary (an allocator
that does), the point sits at the mean size with a horizontal error bar of
its spread as well. A suite without draws is drawn as before: no error bars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.report import draws
from harness.report.leaderboard import SIZE_METRICS, hardware_of, metric_order
from harness.run.record import CellRecord
from harness.store import atomic_savefig

AXES = {
    # axis -> (metric with the decomposable layers' size, whole-model size key, scale, label, file)
    "bytes": ("bytes_kept", "model_bytes", 1e6, "MB", "pareto_bytes.png"),
    "params": ("params_kept", "model_params", 1e6, "M parameters", "pareto_params.png"),
}
SKIP = ("_p90", "_p99", "spread")
"""Metric name parts not plotted (tail percentiles and spreads: the p50 stands for latency)."""
MARKERS = "osD^vP<>Xh"
STYLES = ("-", "--", ":", "-.")


def plotted_metrics(results: Sequence[dict]) -> list[str]:
    names = {
        name
        for r in results
        for name, value in r.metrics.items()
        if isinstance(value, (int, float)) and math.isfinite(value)
    }
    return [n for n in metric_order(names) if not any(part in n for part in SKIP) and n not in SIZE_METRICS]


def size_of(result: CellRecord, axis: str, use_kept: bool) -> float | None:
    kept, whole, scale, _, _ = AXES[axis]
    value = result.metrics.get(kept) if use_kept else result.sizes.get(whole)
    return None if value is None else value / scale


def axis_label(axis: str, use_kept: bool) -> str:
    _, _, _, unit, _ = AXES[axis]
    what = "kept " + ("bytes" if axis == "bytes" else "parameters") + " of the decomposable weights"
    return (
        f"{what} ({unit})"
        if use_kept
        else f"model {'bytes' if axis == 'bytes' else 'parameters'} as evaluated ({unit})"
    )


def pareto_front(points: Sequence[tuple[float, float]], higher: bool) -> list[tuple[float, float]]:
    """Points not beaten on both axes: smaller x and better y (higher or lower per ``higher``)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher else p[1])):
        if not front or (y > front[-1][1] if higher else y < front[-1][1]):
            front.append((x, y))
    return front


def line_key(result: CellRecord, metric: str, split_hardware: bool, many_models: bool) -> tuple[str, ...]:
    key = [result.method_label, (result.allocator or {}).get("label", "")]
    key.append(result.model_id if many_models else "")
    key.append(hardware_of(result) if split_hardware and metric in (result.hardware_metrics) else "")
    return tuple(key)


def key_label(key: tuple[str, ...]) -> str:
    method, allocator, model, hardware = key
    text = method if method == "baseline" else f"{method} × {allocator}"
    extras = [e for e in (model, hardware) if e]
    return text + (f" [{', '.join(extras)}]" if extras else "")


@dataclass
class Point:
    """One plotted cell: its size and metric (the means over its draws), their spreads (None: one draw,
    or a size that does not vary) and ``n`` the draws averaged."""

    x: float
    y: float
    record: CellRecord
    n: int = 1
    xerr: float | None = None
    yerr: float | None = None
    bars: Any = None


def point_of(members: Sequence[CellRecord], metric: str, axis: str, use_kept: bool) -> Point | None:
    """The point of one record, or of one configuration's draws (``draws.group``); None without a size
    or a finite value."""
    pairs = [(size_of(r, axis, use_kept), r.metrics.get(metric)) for r in members]
    pairs = [(x, y) for x, y in pairs if y is not None and x is not None and math.isfinite(y)]
    if not pairs:
        return None
    if len(pairs) == 1:
        return Point(pairs[0][0], pairs[0][1], members[0])
    sx, sy = draws.spread([x for x, _ in pairs]), draws.spread([y for _, y in pairs])
    xerr = sx["std"] if sx["max"] != sx["min"] else None
    return Point(sx["mean"], sy["mean"], members[0], len(pairs), xerr, sy["std"])


def caption(results: Sequence[CellRecord]) -> str:
    """What the plots' error bars are, for report.html; "" where no cell has several draws."""
    counts = [len(m) for m in draws.group([r for r in results if r.ok]) if len(m) > 1]
    if not counts:
        return ""
    return f"cells with calibration draws: {spread_label(counts)} (sample standard deviation, ddof 1)"


def spread_label(counts: Sequence[int]) -> str:
    return f"mean ± spread over {draws.counted(counts)}"


def write_pareto(results: Sequence[dict], directory: Path, title: str = "") -> list[Path]:
    """Draw both PNGs under ``directory``; returns the paths written (none without plottable metrics)."""
    ok = [r for r in results if r.ok]
    metrics = plotted_metrics(ok)
    if not ok or not metrics:
        return []
    paths = []
    for axis in AXES:
        use_kept = all(AXES[axis][0] in r.metrics for r in ok)
        path = Path(directory) / AXES[axis][4]
        draw(ok, metrics, axis, use_kept, path, title)
        paths.append(path)
    return paths


def draw(results: list[CellRecord], metrics: list[str], axis: str, use_kept: bool, path: Path, title: str) -> None:
    atomic_savefig(figure(results, metrics, axis, use_kept, title), path, dpi=110)


def figure(results: list[CellRecord], metrics: list[str], axis: str, use_kept: bool, title: str):
    """The figure of one size axis (a matplotlib ``Figure`` on the Agg canvas), one panel per metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    styles = Styles(results)
    many_hardware = len({hardware_of(r) for r in results}) > 1
    many_models = len({r.model_id for r in results}) > 1
    handles: dict[str, Any] = {}
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        higher = next((r.higher_is_better[metric] for r in results if metric in r.higher_is_better), False)
        panel(ax, results, metric, axis, use_kept, higher, styles, handles, many_hardware, many_models)
        ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xlabel(axis_label(axis, use_kept), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if handles:  # none where no record has the axis's size metric: the panels say so, no legend to draw
        ncol = min(4, len(handles))
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


class Styles:
    """Colour per method, marker per allocator, line style per model."""

    def __init__(self, results: list[CellRecord]) -> None:
        from matplotlib import colormaps

        methods = sorted({r.method_label for r in results} - {"baseline"})
        allocators = sorted({(r.allocator or {}).get("label", "") for r in results})
        models = sorted({r.model_id for r in results})
        palette = colormaps["tab10" if len(methods) <= 10 else "tab20"]
        self.color = {m: palette(i % palette.N) for i, m in enumerate(methods)} | {"baseline": "black"}
        self.marker = {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(allocators)}
        self.style = {m: STYLES[i % len(STYLES)] for i, m in enumerate(models)}

    def of(self, result: CellRecord) -> dict[str, Any]:
        method, allocator = result.method_label, (result.allocator or {}).get("label", "")
        return {
            "color": self.color[method],
            "marker": self.marker.get(allocator, "o"),
            "linestyle": self.style[result.model_id],
        }


def panel(ax, results, metric, axis, use_kept, higher, styles, handles, many_hardware, many_models) -> None:
    lines: dict[tuple[str, ...], list[Point]] = {}
    for members in draws.group(results):
        point = point_of(members, metric, axis, use_kept)
        if point is not None:
            lines.setdefault(line_key(point.record, metric, many_hardware, many_models), []).append(point)
    points = [(p.x, p.y) for line in lines.values() for p in line]
    if not points:
        ax.text(0.5, 0.5, "no cell has this size", transform=ax.transAxes, ha="center", va="center", fontsize=8)
    spread = []
    for key, line in lines.items():
        line.sort(key=lambda p: p.x)
        style = styles.of(line[0].record)
        label = key_label(key)
        if key[0] == "baseline":
            for p in line:
                handle = ax.plot([p.x], [p.y], marker="*", markersize=13, color="black", linestyle="none")[0]
                ax.axhline(p.y, color="black", linestyle=":", linewidth=0.8, alpha=0.6)
            handles.setdefault(label, handle)
        else:
            handle = ax.plot([p.x for p in line], [p.y for p in line], markersize=5, linewidth=1.2, **style)[0]
            handles.setdefault(label, handle)
        spread += error_bars(ax, [p for p in line if p.n > 1], style["color"])
    if spread:
        handles.setdefault(spread_label([p.n for p in spread]), spread[0].bars)
    front = pareto_front(points, higher)
    if len(front) > 1:
        xs, ys = zip(*front, strict=True)
        handle = ax.step(xs, ys, where="post", color="grey", linewidth=3, alpha=0.25, zorder=0)[0]
        handles.setdefault("Pareto front", handle)
    values = [y for _, y in points]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")


def error_bars(ax, points: list[Point], color) -> list[Point]:
    """± the spread of each point of several draws (``Point.yerr``, and ``xerr`` where the size varies);
    each point keeps its bars (``Point.bars``) for the legend. Returns ``points``."""
    for p in points:
        xerr = None if p.xerr is None else [p.xerr]
        p.bars = ax.errorbar([p.x], [p.y], yerr=[p.yerr], xerr=xerr, fmt="none", ecolor=color, capsize=2.5)
    return points
