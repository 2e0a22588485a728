"""Reports: paired significance, hardware-split leaderboards, Pareto plots,
report.html (rendered in headless Chromium where it is installed), `harness
compare` and `harness report`, and a run that writes them at its end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.report import leaderboard
from harness.report.significance import (
    FEW,
    MARK,
    against_baseline,
    mcnemar_exact,
    paired_bootstrap,
    resolvable_difference,
)
from harness.run.record import SCHEMA_VERSION, CellRecord
from harness.store import atomic_write_json
from tests.conftest import write_suite

CPU = {"device": "cpu", "cpu": "Test CPU", "cpu_count": 2, "torch": "2", "gpu_count": 0}
GPU = {"device": "cuda", "cpu": "Test CPU", "cpu_count": 16, "torch": "2", "gpu": "Test GPU", "gpu_count": 1}


def outcomes(correct: int, n: int = 40, flip: set[int] = frozenset()) -> dict:
    """lm-eval's per-example record: the first ``correct`` docs right, docs in ``flip`` inverted."""
    return {str(i): {"acc": float((i < correct) != (i in flip))} for i in range(n)}


def cell(
    method: str | None,
    keep: float | None,
    per_example: dict | None = None,
    hw: dict = CPU,
    latency: float | None = None,
    model: str = "m",
    allocator: str = "uniform",
) -> CellRecord:
    per_example = per_example or outcomes(30)
    acc = sum(o["acc"] for o in per_example.values()) / len(per_example)
    metrics = {"piqa/acc": acc, "perplexity": 20.0 / (keep or 1), "kept_fraction": keep or 1.0}
    metrics |= {"params_kept": 1000 * (keep or 1), "bytes_kept": 2000 * (keep or 1)}
    hardware_metrics = []
    if latency is not None:
        metrics["decode_ms_p50_b1"] = latency
        hardware_metrics = ["decode_ms_p50_b1"]
    label = f"keep={keep}"
    return CellRecord.from_json(
        {
            "schema": SCHEMA_VERSION,
            "suite": "t",
            "cell_id": f"{model}-{method}-{allocator}-{keep}-{hw['device']}".replace("/", "_"),
            "status": "ok",
            "model": {"id": model, "note": "test model"},
            "method": None if method is None else {"name": method, "label": method},
            "allocator": None if method is None else {"name": allocator, "label": allocator},
            "target": None if method is None else {"kind": "params", "value": keep, "label": label},
            "metrics": metrics,
            "higher_is_better": {"piqa/acc": True, "perplexity": False, "decode_ms_p50_b1": False},
            "hardware_metrics": hardware_metrics,
            "sizes": {"model_params": 5000 * (keep or 1), "model_bytes": 10000 * (keep or 1)},
            "evaluations": {"lm-eval": {"data": "piqa validation", "tasks": {"piqa": {"per_example": per_example}}}},
            "provenance": {"hardware": hw, "seed": 0, "limit": None, "harness": "0", "libraries": {}, "created": "now"},
        }
    )


def suite_results(**kwargs) -> list[CellRecord]:
    base = outcomes(30)
    return [
        cell(None, None, base, **kwargs),
        cell("svd", 0.9, outcomes(30, flip={0}), **kwargs),  # one discordant pair: p = 1
        cell("svd", 0.5, outcomes(10), **kwargs),  # 20 right -> wrong: p ~ 2e-6
    ]


def store(results: list[CellRecord], directory: Path) -> Path:
    for result in results:
        atomic_write_json(directory / "cells" / f"{result.cell_id}.json", result.to_json())
    return directory


# ---------------------------------------------------------------- significance
def test_mcnemar_exact_known_answers():
    assert mcnemar_exact([1] * 5, [0] * 5)["p_value"] == pytest.approx(2 / 32)
    a, b = [1] * 9 + [0] + [1] * 5, [0] * 9 + [1] + [1] * 5  # 9 vs 1 discordant, 5 concordant
    assert mcnemar_exact(a, b) == {"only_a": 9, "only_b": 1, "p_value": pytest.approx(2 * 11 / 1024)}
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0


def test_mcnemar_matches_scipy_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for only_a, only_b in ((3, 12), (7, 7), (0, 9), (40, 25)):
        a = [1] * only_a + [0] * only_b
        b = [0] * only_a + [1] * only_b
        expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(a, b)["p_value"] == pytest.approx(expected)


def test_paired_bootstrap_is_seeded_and_brackets_the_difference():
    a = [1, 0] * 50
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p_value"] == 1.0
    b = [1, 1] * 50
    better = paired_bootstrap(a, b, seed=3)
    assert better == paired_bootstrap(a, b, seed=3)
    assert 0 < better["ci_low"] < better["diff"] == 0.5 < better["ci_high"] and better["p_value"] == 0.0


def test_against_baseline_pairs_the_same_documents():
    results = suite_results()
    results[2]["evaluations"]["lm-eval"]["tasks"]["piqa"]["per_example"].pop("39")
    tests = against_baseline(results)
    assert tests[0] == {}
    assert tests[1]["piqa/acc"]["significant"] is False and tests[1]["piqa/acc"]["n"] == 40
    assert tests[2]["piqa/acc"]["significant"] is True and tests[2]["piqa/acc"]["n"] == 39
    assert tests[2]["piqa/acc"]["diff"] == pytest.approx(-0.5, abs=0.02)


def test_leaderboard_marks_cells_not_significantly_different():
    board = leaderboard.build(suite_results())
    assert [r["target"] for r in board["rows"]] == ["—", "keep=0.9", "keep=0.5"]
    assert board["marks"] == [{}, {"piqa/acc": FEW}, {}]  # 40 examples cannot show 5 points
    text = leaderboard.render(board)
    assert f"0.725 {FEW}" in text and "McNemar's exact test" in text and "α = 0.05" in text
    assert "piqa/acc: n = 40 paired examples resolve differences of" in text


def test_enough_examples_turn_too_few_into_not_different():
    base = outcomes(1500, n=3000)
    close = outcomes(1500, n=3000, flip={0, 1, 2, 3, 1600, 1601, 1602})  # 4 right->wrong, 3 wrong->right
    results = [cell(None, None, base), cell("svd", 0.9, close)]
    board = leaderboard.build(results)
    test = board["significance"][1]["piqa/acc"]
    assert not test["significant"] and test["resolvable"] < 0.05
    assert board["marks"] == [{}, {"piqa/acc": MARK}]


def test_resolvable_difference_has_the_stated_power():
    """At the resolvable difference, scipy's exact binomial test (McNemar's) rejects in about 80 % of
    simulated paired samples: an oracle independent of the approximation inside."""
    stats = pytest.importorskip("scipy.stats")
    import numpy as np

    n, discordance = 400, 0.3
    delta = resolvable_difference(n, round(n * discordance))
    assert 0.05 < delta < discordance
    rng = np.random.default_rng(0)
    rejected = 0
    trials = 600
    for _ in range(trials):
        pairs = rng.multinomial(n, [(discordance + delta) / 2, (discordance - delta) / 2, 1 - discordance])
        only_cell, only_base = int(pairs[0]), int(pairs[1])
        if only_cell + only_base and stats.binomtest(only_cell, only_cell + only_base, 0.5).pvalue < 0.05:
            rejected += 1
    assert 0.72 < rejected / trials < 0.88
    # Connor's sample size at d = 0.05, p = 0.3: (1.96 sqrt(.3) + 0.8416 sqrt(.2975))^2 / .0025 = 939.6
    assert resolvable_difference(940, 282) == pytest.approx(0.05, abs=5e-4)
    # no discordance observed: a difference d needs d of the pairs discordant, all one way
    assert 6 / 40 < resolvable_difference(40, 0) < 0.25  # the exact test needs 6 such pairs at the least
    assert resolvable_difference(3000, 7) < 0.01  # few disagreements on many examples: 5 points would show
    assert resolvable_difference(2, 1) == 1.0


# ---------------------------------------------------------------- hardware
def test_hardware_bound_metrics_get_one_table_per_hardware():
    results = [
        *suite_results(latency=5.0),
        cell(None, None, hw=GPU, latency=1.0),
        cell("svd", 0.9, outcomes(30, flip={0}), hw=GPU, latency=0.9),
    ]
    board = leaderboard.build(results)
    assert "decode_ms_p50_b1" not in board["columns"]
    tables = {t["hardware"]: t for t in board["hardware_tables"]}
    assert set(tables) == {"1x Test GPU", "CPU Test CPU (2 cores)"}
    assert [r["decode_ms_p50_b1"] for r in tables["1x Test GPU"]["rows"]] == [1.0, 0.9]
    assert len(tables["CPU Test CPU (2 cores)"]["rows"]) == 3
    text = leaderboard.render(board)
    assert text.count("### Hardware-bound metrics on") == 2
    assert "never compared across" in text


def test_runner_records_hardware_metrics_and_writes_reports(tmp_path, tiny_model_dir, monkeypatch):
    from harness.run.runner import RunOptions, run_suite
    from harness.suite import load_suite

    monkeypatch.chdir(tmp_path)
    suite = write_suite(
        tmp_path / "hw.toml",
        f"""
        name = "hw"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.8]
        [[methods]]
        name = "svd"
        [[profilers]]
        name = "params"
        [[profilers]]
        name = "latency"
        options = {{ prompt_len = 8, new_tokens = 2, warmup = 0, min_runs = 1, min_seconds = 0.0 }}
        [[profilers]]
        name = "memory"
        options = {{ prompt_len = 8 }}
        [[profilers]]
        name = "energy"
        """,
    )
    summary = run_suite(load_suite(suite), RunOptions(results_root=tmp_path / "results", progress=False))
    assert not summary.failed
    for result in summary.results:
        hw = set(result["hardware_metrics"])
        assert "decode_ms_p50_b1" in hw and "weights_mb" in hw and "peak_rss_mb" in hw
        assert not hw & {"kept_fraction", "params_kept"}  # params is not hardware-bound
        assert result["evaluations"]["energy"]["available"] is False
    directory = summary.results_dir
    assert "### Hardware-bound metrics on CPU" in summary.leaderboard
    assert {p.name for p in directory.iterdir()} >= {"leaderboard.md", "report.html", "pareto_bytes.png"}


# ---------------------------------------------------------------- plots and html
def test_pareto_front_known_answer():
    from harness.report.pareto import pareto_front

    points = [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.9), (2, 0.4)]
    assert pareto_front(points, higher=True) == [(1, 0.5), (2, 0.7), (4, 0.9)]
    assert pareto_front(points, higher=False) == [(1, 0.5), (2, 0.4)]


def test_report_html_is_self_contained(tmp_path):
    from harness.report.html import write_all

    results = [*suite_results(latency=3.0), cell("svd", 0.7, outcomes(25), allocator="energy", latency=2.0)]
    text = write_all(results, tmp_path, "Leaderboard: t")
    assert text.startswith("# Leaderboard: t")
    for name in ("leaderboard.md", "leaderboard.json", "pareto_bytes.png", "pareto_params.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert '<table id="leaderboard">' in page and 'id="hardware-0"' in page and 'id="significance"' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("HARNESS_REQUIRE_CHROMIUM"),
    reason="no chromium installed (apt-get install -y chromium); CI sets HARNESS_REQUIRE_CHROMIUM=1",
)
def test_report_renders_in_headless_chromium(tmp_path):
    assert chromium() is not None, "HARNESS_REQUIRE_CHROMIUM is set but no chromium is installed"
    from harness.report.html import write_report

    results = suite_results(latency=3.0)
    page = write_report(results, tmp_path, "Leaderboard: chromium").read_text()
    # test-only probe: after load, write each image's decoded width into the title
    probe = "<script>addEventListener('load', () => { document.title = 'widths:' + "
    probe += "[...document.images].map(i => i.naturalWidth).join(','); });</script>"
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        (tmp_path / "probe.html").as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    table = re.search(r'<table id="leaderboard">.*?</table>', dom, re.S)
    assert table is not None, dom[:2000]
    assert table.group(0).count("<tr") == 1 + 3 and f"0.725 {FEW}" in table.group(0)
    widths = re.search(r"<title>widths:([\d,]*)</title>", dom)
    assert widths is not None, dom[:2000]
    assert [int(w) > 100 for w in widths.group(1).split(",")] == [True, True]


# ---------------------------------------------------------------- commands
def test_compare_prints_deltas_cell_by_cell(tmp_path, capsys):
    from harness.cli import main

    before = suite_results()
    after = suite_results()
    after[1].metrics["perplexity"] = 33.0
    after[1].cell_id = "new-id"
    store(before, tmp_path / "a")
    store([*after[:2], cell("svd", 0.3)], tmp_path / "b")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--only-changed"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| m ")]
    assert len(lines) == 1 and "perplexity" in lines[0] and "+10.78" in lines[0] and "+48.50%" in lines[0]
    assert "2 cell(s) matched" in out
    assert "only in A: m svd uniform keep=0.5" in out and "only in B: m svd uniform keep=0.3" in out
    assert "cell id m-svd-uniform-0.9-cpu -> new-id" in out


def test_compare_flags_hardware_metrics_from_other_hardware(tmp_path):
    from harness.report.compare import compare

    store(suite_results(latency=5.0), tmp_path / "a")
    store(suite_results(latency=4.0, hw=GPU), tmp_path / "b")
    rows = compare(tmp_path / "a", tmp_path / "b")["rows"]
    assert {r["metric"] for r in rows if r["metric"].startswith("decode")} == {"decode_ms_p50_b1 (different hardware)"}


def test_report_command_writes_the_html(tmp_path, capsys):
    from harness.cli import main

    store(suite_results(), tmp_path / "r")
    assert main(["report", str(tmp_path / "r")]) == 0
    assert "report.html" in capsys.readouterr().out
    board = json.loads((tmp_path / "r" / "leaderboard.json").read_text())
    assert board["marks"][1] == {"piqa/acc": FEW}
    assert (tmp_path / "r" / "pareto_params.png").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_mlflow_parent_run_gets_the_reports_and_the_leaderboard_table(tmp_path, monkeypatch):
    """A real MLflow store (SQLite): the parent run holds the reports and the leaderboard as a table that
    MlflowClient reads back row by row; each cell run carries the row tag that lines it up across suites."""
    from types import SimpleNamespace

    from harness_mlflow import TABLE, MLflowOptions, MLflowTracker
    from mlflow.tracking import MlflowClient

    from harness.cli import main

    results = suite_results()
    for result in results:
        result.model["fingerprint"] = "f" * 64
    directory = store(results, tmp_path / "r")
    assert main(["report", str(directory)]) == 0  # leaderboard.md/.json, report.html, the plots
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches runs through the global URI
    tracker = MLflowTracker()
    tracker.start(SimpleNamespace(name="t", file="t.toml", models=["m"]), MLflowOptions(tracking_uri=uri), directory)
    for result in results:
        tracker.log_cell(None, result, directory / "cells" / f"{result.cell_id}.json")
    tracker.end(None, results, directory)

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(tracker.parent_id)
    assert parent.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(tracker.parent_id)}
    assert {"leaderboard.md", "report.html", "pareto_params.png", TABLE} <= logged
    table = client.load_table(tracker.experiment_id, TABLE, run_ids=[tracker.parent_id])
    assert list(table["cell_id"]) == [r.cell_id for r in sorted(results, key=lambda r: r.order_key())]
    assert list(table["target"]) == ["—", "keep=0.9", "keep=0.5"]
    assert list(table["piqa/acc"]) == pytest.approx([0.75, 0.725, 0.25])
    assert list(table["piqa/acc mark"]) == ["", FEW, ""]
    runs = client.search_runs(
        [tracker.experiment_id], filter_string="tags.`harness.row` = 'm | svd | uniform | keep=0.9'"
    )
    assert [r.data.tags["harness.cell_id"] for r in runs] == [results[1].cell_id]


def test_pareto_without_any_size_draws_empty_panels_instead_of_failing(tmp_path):
    from harness.report.pareto import write_pareto

    results = suite_results()
    for record in results:
        record.sizes = {}
        for key in ("params_kept", "bytes_kept", "kept_fraction"):
            record.metrics.pop(key, None)
    paths = write_pareto(results, tmp_path)
    assert paths and all(p.stat().st_size > 0 for p in paths)
