"""Per-layer rank reports: rows, CSV (one row per layer) and the heat map PNG."""

from __future__ import annotations

import csv

from harness.api import LayerInfo
from harness.report.ranks import heatmap_grid, rank_heatmap, rank_rows, write_rank_csv

SHAPES = {"q_proj": (32, 32), "k_proj": (16, 32), "o_proj": (32, 32), "down_proj": (32, 48)}


def layers(n_layers: int = 3) -> dict[str, LayerInfo]:
    out = {}
    for i in range(n_layers):
        for kind, shape in SHAPES.items():
            name = f"model.layers.{i}.{kind}"
            out[name] = LayerInfo(name, kind, i, shape)
    out["lm_head"] = LayerInfo("lm_head", "lm_head", None, (64, 32))
    return out


def ranks_for(info: dict[str, LayerInfo]) -> dict[str, int | None]:
    ranks: dict[str, int | None] = {}
    for j, name in enumerate(info):
        ranks[name] = None if j % 4 == 3 else 4 + j
    del ranks["lm_head"]  # not decomposed: counts as dense
    return ranks


def test_rows_describe_each_layer():
    info = layers()
    rows = rank_rows(info, ranks_for(info))
    assert [row["layer"] for row in rows] == list(info)
    first = rows[0]
    assert first == {
        "layer": "model.layers.0.q_proj",
        "kind": "q_proj",
        "index": 0,
        "shape": (32, 32),
        "rank": 4,
        "full_rank": 32,
        "kept_rank_fraction": 4 / 32,
        "kept_params": 4 * 64,
        "dense_params": 1024,
        "dense": False,
    }
    dense = rows[3]
    assert dense["dense"] and dense["rank"] is None
    assert dense["kept_rank_fraction"] == 1.0 and dense["kept_params"] == dense["dense_params"]
    assert rows[-1]["dense"] and rows[-1]["index"] is None


def test_csv_has_one_row_per_layer(tmp_path):
    info = layers()
    path = write_rank_csv(rank_rows(info, ranks_for(info)), tmp_path / "sub" / "ranks.csv")
    with path.open(encoding="utf-8") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(info)
    assert read[0]["shape"] == "32x32" and read[0]["rank"] == "4" and read[0]["dense"] == "false"
    assert read[3]["rank"] == "" and read[3]["dense"] == "true"
    assert read[-1]["index"] == ""


def test_heatmap_grid_is_layers_by_kind():
    info = layers()
    labels, kinds, cells = heatmap_grid(rank_rows(info, ranks_for(info)))
    assert labels == ["0", "1", "2", "lm_head"]
    assert kinds == [*SHAPES, "lm_head"]
    assert cells[1][0]["layer"] == "model.layers.1.q_proj"
    assert cells[0][-1] is None and cells[-1][-1]["dense"]


def test_heatmap_png_is_written(tmp_path):
    info = layers(30)
    path = rank_heatmap(rank_rows(info, ranks_for(info)), tmp_path / "plots" / "ranks.png", "svd / global-greedy")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
