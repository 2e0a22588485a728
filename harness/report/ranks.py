"""Per-layer rank reports of one cell: rows, a CSV file and a heat map.

``rank_rows`` turns the layers and the ranks a cell chose (layer name -> rank,
None: dense, as the runner records them) into one row per layer;
``write_rank_csv`` writes them; ``rank_heatmap`` draws layer index x projection
kind, coloured by the kept fraction of rank, dense cells marked "D".

A rank is per group: where a method decomposes several layers jointly, each
layer of the group shows the group's rank, and its kept parameters are the
layer's own k (m + n), an estimate for such methods.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.api import LayerInfo
from harness.factorization import lowrank_params
from harness.store import atomic_savefig, atomic_write_text

COLUMNS = (
    "layer",  # dotted module name
    "kind",  # projection kind, e.g. q_proj
    "index",  # transformer block index ("" where none)
    "shape",  # out x in
    "rank",  # kept rank ("" where the layer stays dense)
    "full_rank",  # min(out, in)
    "kept_rank_fraction",  # rank / full_rank (1 where dense)
    "kept_params",  # rank (out + in), or out x in where dense
    "dense_params",  # out x in
    "dense",  # true where the layer keeps its original weight
)


def rank_rows(layers: dict[str, LayerInfo], ranks: dict[str, int | None]) -> list[dict[str, Any]]:
    """One row per layer (in ``layers`` order); a layer missing from ``ranks`` counts as dense."""
    rows = []
    for name, layer in layers.items():
        m, n = layer.shape
        rank = ranks.get(name)
        full = min(m, n)
        rows.append(
            {
                "layer": name,
                "kind": layer.kind,
                "index": layer.index,
                "shape": (m, n),
                "rank": rank,
                "full_rank": full,
                "kept_rank_fraction": 1.0 if rank is None else (rank / full if full else 0.0),
                "kept_params": m * n if rank is None else lowrank_params(m, n, rank),
                "dense_params": m * n,
                "dense": rank is None,
            }
        )
    return rows


def _cell(key: str, value: Any) -> Any:
    if value is None:
        return ""
    if key == "shape":
        return "x".join(str(v) for v in value)
    if key == "kept_rank_fraction":
        return f"{value:.6g}"
    if isinstance(value, bool):
        return str(value).lower()
    return value


def write_rank_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` (from ``rank_rows``) as CSV with a header; returns the path."""
    path = Path(path)
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(key, row.get(key)) for key in COLUMNS})
    atomic_write_text(path, handle.getvalue())  # a full disk leaves the old file or none, never half of one
    return path


def heatmap_grid(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], list[list[dict | None]]]:
    """(row labels, kind labels, cells): one row per layer index (or per name where there is none)."""
    kinds: list[str] = []
    keys: list[Any] = []
    for row in rows:
        if row["kind"] not in kinds:
            kinds.append(row["kind"])
        key = row["index"] if row["index"] is not None else row["layer"]
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: (isinstance(k, str), k))
    where = {key: i for i, key in enumerate(keys)}
    column = {kind: j for j, kind in enumerate(kinds)}
    cells: list[list[dict | None]] = [[None] * len(kinds) for _ in keys]
    for row in rows:
        key = row["index"] if row["index"] is not None else row["layer"]
        cells[where[key]][column[row["kind"]]] = row
    return [str(k) for k in keys], kinds, cells


def rank_heatmap(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """A PNG heat map: layers (rows) x projection kinds (columns), colour = kept fraction of rank.

    Dense cells are drawn at 1 and marked "D"; cells with no such layer stay
    blank. Renders with the Agg canvas on a Figure of its own (no pyplot, so the
    process's backend is left alone); returns the path.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, kinds, cells = heatmap_grid(rows)
    values = np.array([[np.nan if row is None else row["kept_rank_fraction"] for row in line] for line in cells])
    fig = Figure(figsize=(2 + 1.1 * max(len(kinds), 1), min(2 + 0.25 * len(labels), 40)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(values.reshape(len(labels), len(kinds))), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0
    )
    for i, line in enumerate(cells):
        for j, row in enumerate(line):
            if row is not None and row["dense"]:
                ax.text(j, i, "D", ha="center", va="center", color="black", fontsize=7, fontweight="bold")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    step = max(1, len(labels) // 40)
    ax.set_yticks(range(0, len(labels), step), labels[::step])
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="kept fraction of rank (D: dense)")
    fig.tight_layout()
    return atomic_savefig(fig, Path(path), dpi=100)
