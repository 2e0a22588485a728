"""`harness baseline` and `harness check` on hand-made results: tolerances
(absolute, relative, recovery against the run's own uncompressed row), missing
and new rows, failed cells, and the exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.report import check
from harness.store import atomic_write_json

HW = {"device": "cpu", "cpu": "Test CPU", "cpu_count": 2, "platform": "test"}


def result(cell_id: str, method: str | None, target: float | None, metrics: dict, status: str = "ok") -> dict:
    return {
        "schema": 1,
        "cell_id": cell_id,
        "suite": "unit",
        "status": status,
        "error": None if status == "ok" else {"type": "RuntimeError", "message": "boom", "traceback": []},
        "model": {"id": "tiny", "fingerprint": "f" * 64, "files": {}, "note": "test"},
        "method": None if method is None else {"name": method, "label": method, "options": {}},
        "allocator": None if method is None else {"name": "uniform", "label": "uniform", "options": {}},
        "target": None if target is None else {"kind": "params", "value": target, "label": f"keep={target:g}"},
        "metrics": metrics,
        "higher_is_better": {"acc": True, "perplexity": False},
        "sizes": {"model_params": 1000, "model_bytes": 4000},
        "provenance": {"seed": 0, "limit": None, "hardware": HW, "created": "2025-01-01T00:00:00+00:00"},
    }


def write_results(folder: Path, results: list[dict]) -> Path:
    for item in results:
        atomic_write_json(folder / "cells" / f"{item['cell_id']}.json", item)
    return folder


GOOD = [
    result("a0", None, None, {"acc": 0.80, "perplexity": 20.0, "kept_fraction": 1.0}),
    result("a1", "svd", 0.9, {"acc": 0.78, "perplexity": 24.0, "kept_fraction": 0.9}),
    result("a2", "svd", 0.5, {"acc": 0.60, "perplexity": 80.0, "kept_fraction": 0.5}),
]


@pytest.fixture
def baseline(tmp_path) -> Path:
    folder = write_results(tmp_path / "base", GOOD)
    out = tmp_path / "baseline.json"
    assert main(["baseline", str(folder), "-o", str(out)]) == 0
    return out


def rerun(tmp_path: Path, **changes) -> Path:
    """The GOOD results with ``changes``: {cell_id: {metric: value}} (None: drop the cell)."""
    results = []
    for item in GOOD:
        change = changes.get(item["cell_id"], {})
        if change is None:
            continue
        results.append({**item, "metrics": {**item["metrics"], **change}})
    return write_results(tmp_path / "new", results)


def set_rules(path: Path, rules: list[dict]) -> None:
    document = json.loads(path.read_text())
    document["tolerances"] = rules
    path.write_text(json.dumps(document))


def test_baseline_header_says_how_it_was_made(baseline):
    document = json.loads(baseline.read_text())
    header = document["header"]
    assert header["made_by"].startswith("harness baseline ")
    assert header["seed"] == [0] and header["hardware"] == ["CPU Test CPU (2 cores)"]
    assert "same commit" in header["update"]
    assert [(r["method"], r["target"]) for r in document["rows"]] == [
        ("baseline", "—"),
        ("svd", "keep=0.9"),
        ("svd", "keep=0.5"),
    ]
    assert document["rows"][1]["metrics"] == {
        "kept": 0.9,
        "params (M)": 0.001,
        "MB": 0.004,
        "acc": 0.78,
        "perplexity": 24.0,
    }


def test_an_identical_rerun_passes(baseline, tmp_path, capsys):
    assert main(["check", str(rerun(tmp_path)), "--baseline", str(baseline)]) == 0
    out = capsys.readouterr().out
    assert "check ok: 15 numbers in 3 rows" in out and "15 unchanged" in out
    assert "|" not in out  # nothing moved: no table


def test_absolute_and_relative_tolerances(baseline, tmp_path):
    set_rules(
        baseline, [{"metric": "*", "rel": 1e-6}, {"metric": "acc", "abs": 0.03}, {"metric": "perplexity", "rel": 0.1}]
    )
    report = check.check(rerun(tmp_path, a1={"acc": 0.76, "perplexity": 26.0}), baseline)
    moved = {(e.row, e.metric): e for e in report.entries if e.status != "ok"}
    assert {k: e.status for k, e in moved.items()} == {
        ("tiny svd uniform keep=0.9", "acc"): "moved",
        ("tiny svd uniform keep=0.9", "perplexity"): "moved",
    }
    assert report.ok
    report = check.check(rerun(tmp_path, a2={"acc": 0.55, "perplexity": 90.0}), baseline)
    statuses = {e.metric: e.status for e in report.entries if e.row.endswith("keep=0.5") and e.status != "ok"}
    assert statuses == {"acc": "FAIL", "perplexity": "FAIL"}
    assert not report.ok
    text = check.render(report)
    assert "check FAILED" in text and "| tiny svd uniform keep=0.5 | acc" in text


def test_recovery_is_measured_against_the_runs_own_uncompressed_row(baseline, tmp_path):
    set_rules(
        baseline, [{"metric": "*", "abs": 1.0, "rel": 1.0}, {"metric": "acc", "row": "* svd *", "recovery": 0.95}]
    )
    report = check.check(rerun(tmp_path), baseline)
    entries = {e.row: e for e in report.entries if e.metric == "acc"}
    assert entries["tiny svd uniform keep=0.9"].recovery == pytest.approx(0.78 / 0.80)
    assert entries["tiny svd uniform keep=0.9"].status == "ok"
    assert entries["tiny svd uniform keep=0.5"].status == "FAIL"  # 0.60 / 0.80 = 0.75 < 0.95
    assert "recovery 0.7500 < 0.95" in entries["tiny svd uniform keep=0.5"].note
    assert entries["tiny baseline"].recovery is None  # the uncompressed row itself
    # lower is better for perplexity: recovery = uncompressed / compressed
    set_rules(baseline, [{"metric": "*", "abs": 100.0}, {"metric": "perplexity", "row": "* svd *", "recovery": 0.8}])
    report = check.check(rerun(tmp_path), baseline)
    ppl = {e.row: e for e in report.entries if e.metric == "perplexity"}
    assert ppl["tiny svd uniform keep=0.9"].recovery == pytest.approx(20 / 24)
    assert ppl["tiny svd uniform keep=0.5"].status == "FAIL"


def test_missing_new_and_failed_rows(baseline, tmp_path, capsys):
    folder = rerun(tmp_path, a2=None)
    write_results(folder, [result("a3", "asvd", 0.5, {"acc": 0.7}), {**GOOD[1], "status": "failed", "metrics": {}}])
    # the failed cell is newer than nothing: give it a later timestamp so it is the one used
    failed = json.loads((folder / "cells" / "a1.json").read_text())
    failed["error"] = {"type": "RuntimeError", "message": "boom", "traceback": []}
    atomic_write_json(folder / "cells" / "a1.json", failed)
    assert main(["check", str(folder), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "row missing from the new run" in out
    assert "NEW" in out and "tiny asvd uniform keep=0.5" in out
    assert "cell failed: RuntimeError: boom" in out


def test_ignored_metrics_and_a_missing_metric(baseline, tmp_path):
    set_rules(baseline, [{"metric": "*", "rel": 1e-6}, {"metric": "perplexity", "ignore": True}])
    folder = rerun(tmp_path, a1={"perplexity": 1e9})
    report = check.check(folder, baseline)
    assert report.ok and report.count("ignored") == 3
    item = json.loads((folder / "cells" / "a2.json").read_text())
    del item["metrics"]["acc"]
    atomic_write_json(folder / "cells" / "a2.json", item)
    report = check.check(folder, baseline)
    assert not report.ok and [e.metric for e in report.entries if e.status == "MISSING"] == ["acc"]


def test_non_finite_numbers(baseline, tmp_path):
    report = check.check(rerun(tmp_path, a2={"perplexity": float("inf")}), baseline)
    (entry,) = [e for e in report.entries if e.status == "FAIL"]
    assert entry.metric == "perplexity" and entry.note == "non-finite value changed"


def test_rebaselining_keeps_the_tolerances(baseline, tmp_path):
    rules = [{"metric": "acc", "abs": 0.025, "why": "one of 40 examples"}]
    set_rules(baseline, rules)
    assert main(["baseline", str(rerun(tmp_path, a1={"acc": 0.7})), "-o", str(baseline)]) == 0
    document = json.loads(baseline.read_text())
    assert document["tolerances"] == rules
    assert document["rows"][1]["metrics"]["acc"] == 0.7


def test_a_baseline_of_another_suite_is_refused(baseline, tmp_path):
    folder = write_results(tmp_path / "other", [{**GOOD[0], "suite": "other"}])
    with pytest.raises(HarnessError, match=r"expected a baseline of suite other, got .* of suite unit"):
        check.check(folder, baseline)


def test_a_baseline_needs_every_cell_ok(tmp_path):
    folder = write_results(tmp_path / "f", [GOOD[0], {**GOOD[1], "status": "failed"}])
    with pytest.raises(
        HarnessError, match=r"expected every cell ok for a baseline, got failed cells: tiny svd uniform keep=0\.9"
    ):
        check.write_baseline(folder, tmp_path / "b.json", "test")
