"""Calibration draws in `harness compare`, the Pareto plots, report.html and `harness show`.

Records written here (as tests/test_draws.py does): a cell's draws are one
compare row per metric whose A and B, spreads and tests equal the mean,
sample standard deviation and t-test computed by hand from the per-draw
records; one Pareto point per cell at the draws' mean with an error bar of
their standard deviation; a suite without draws compares and plots as
before.
"""

from __future__ import annotations

import math
import statistics
from math import comb
from pathlib import Path

import pytest

from harness.report import compare, html, pareto, show
from harness.run.cells import content_hash
from harness.run.record import CellRecord
from harness.store import ResultStore

BASE = [1] * 40 + [0] * 10


def record(method, draw, ppl, acc=None, kept=0.9, bytes_kept=None, seed=0, tag="a"):
    """A finished cell of ``method`` (None: the baseline) at calibration draw ``draw``."""
    calibration = {"samples": 4, **({"draw": draw} if draw else {})}
    config = {"method": method, "tag": tag, "keep": kept, "calibration": calibration}
    kept = 1.0 if method is None else kept
    metrics = {"perplexity": ppl, "kept_fraction": kept, "bytes_kept": bytes_kept or 2e6 * kept}
    metrics["params_kept"] = 1e6 * kept
    evaluations = {}
    if acc is not None:
        metrics["piqa/acc"] = sum(acc) / len(acc)
        per_example = {str(i): {"acc": v} for i, v in enumerate(acc)}
        evaluations = {"lm-eval": {"tasks": {"piqa": {"per_example": per_example}}}}
    return CellRecord(
        cell_id=content_hash({**config, "draw": draw}),
        suite="s",
        status="ok",
        model={"id": "m"},
        method=None if method is None else {"name": method, "label": method},
        allocator=None if method is None else {"name": "uniform", "label": "uniform"},
        target=None if method is None else {"kind": "params", "value": kept, "label": f"keep={kept}"},
        calibration=None if method is None else calibration,
        draw=draw,
        metrics=metrics,
        higher_is_better={"perplexity": False, "piqa/acc": True, "kept_fraction": True},
        evaluations=evaluations,
        sizes={"model_params": 5e6 * kept, "model_bytes": 1e7 * kept},
        provenance={"created": f"2026-01-0{draw + 1}T00:00:00", "seed": seed},
        config=config if method else {"method": None},
    )


def flipped(n_wrong: int) -> list[int]:
    """BASE with its first ``n_wrong`` right answers made wrong: ``n_wrong`` discordant pairs one way."""
    return [0 if i < n_wrong else v for i, v in enumerate(BASE)]


PPL_A, PPL_B = [170.0, 181.0, 176.5], [160.0, 178.0, 171.0]
WRONG_A, WRONG_B = [2, 3, 1], [9, 2, 6]


def run(ppl, wrong, draws=(0, 1, 2), seed=0) -> list[CellRecord]:
    cells = [record("svd-llm", d, ppl[i], flipped(wrong[i]), seed=seed) for i, d in enumerate(draws)]
    return [record(None, 0, 20.0, BASE), *cells]


def results_dir(path: Path, records: list[CellRecord]) -> Path:
    store = ResultStore(path)
    for r in records:
        store.save(r)
    return path


def mcnemar_by_hand(discordant_one_way: int) -> float:
    """Exact two-sided McNemar p with all ``n`` discordant pairs one way: 2 * 0.5**n (capped at 1)."""
    n = discordant_one_way
    return 1.0 if n == 0 else min(1.0, 2 * comb(n, 0) / 2**n)


def paired_t_df2(a: list[float], b: list[float]) -> float:
    """Two-sided p of the paired t-test on 3 pairs: Student's t with 2 degrees of freedom has the closed
    form P(|T| > t) = 1 - t / sqrt(t^2 + 2)."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    t = abs(statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d))))
    return 1 - t / math.sqrt(t * t + 2)


def rows_of(comparison, cell_part: str) -> dict[str, dict]:
    return {r["metric"]: r for r in comparison["rows"] if cell_part in r["cell"]}


# ---------------------------------------------------------------- compare
def test_compare_groups_draws_into_mean_spread_and_paired_tests(tmp_path, capsys):
    results_dir(tmp_path / "a", run(PPL_A, WRONG_A))
    results_dir(tmp_path / "b", run(PPL_B, WRONG_B))
    comparison = compare.compare(tmp_path / "a", tmp_path / "b")
    assert comparison["matched"] == 2 and comparison.get("draws") is True
    cells = [r["cell"] for r in comparison["rows"]]
    assert cells.count("m svd-llm uniform keep=0.9") == 3  # kept_fraction, acc, perplexity: one row each
    rows = rows_of(comparison, "svd-llm")
    ppl = rows["perplexity"]
    assert ppl["A"] == pytest.approx(sum(PPL_A) / 3, rel=1e-12)
    assert ppl["B"] == pytest.approx(sum(PPL_B) / 3, rel=1e-12)
    assert ppl["B - A"] == pytest.approx((sum(PPL_B) - sum(PPL_A)) / 3, rel=1e-12)
    mean_a = sum(PPL_A) / 3
    std_a = math.sqrt(sum((p - mean_a) ** 2 for p in PPL_A) / 2)
    assert ppl["A spread"]["std"] == pytest.approx(std_a, rel=1e-12)
    assert (ppl["A spread"]["n"], ppl["A spread"]["min"], ppl["A spread"]["max"]) == (3, 170.0, 181.0)
    assert ppl["B spread"]["std"] == pytest.approx(statistics.stdev(PPL_B), rel=1e-12)
    test = ppl["draws test"]
    assert (test["test"], test["draws"]) == ("paired t", [0, 1, 2])
    assert test["p"] == pytest.approx(paired_t_df2(PPL_A, PPL_B), rel=1e-9)
    acc = rows["piqa/acc"]
    accs_a = [sum(flipped(w)) / 50 for w in WRONG_A]
    assert acc["A"] == pytest.approx(sum(accs_a) / 3, rel=1e-12)
    # per example: draw d of B against draw d of A on the same 50 examples; discordant pairs |wa - wb|,
    # all one way: never pooled over draws (n stays 50), the smallest p over the draws summarised
    examples = acc["per example"]
    by_hand = [mcnemar_by_hand(abs(wa - wb)) for wa, wb in zip(WRONG_A, WRONG_B, strict=True)]
    assert [t["mcnemar_p"] for t in examples["draws"]] == pytest.approx(by_hand, rel=1e-12)
    assert [t["draw"] for t in examples["draws"]] == [0, 1, 2] and examples["n"] == 50
    assert examples["mcnemar_p"] == pytest.approx(min(by_hand), rel=1e-12)
    assert "draws test" not in rows["kept_fraction"]  # a size that does not vary: no test, no spread
    assert "A spread" not in rows["kept_fraction"]

    from harness.cli import main

    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    from harness.report.leaderboard import fmt

    assert f"{fmt(mean_a)} ± {fmt(std_a)} [170, 181] n=3" in out
    assert f"paired t p={paired_t_df2(PPL_A, PPL_B):.3g}, 3 draws" in out
    assert "paired t-test of B's draw d against A's draw d" in out


def test_compare_pairs_the_draws_both_runs_have_and_says_so(tmp_path):
    results_dir(tmp_path / "a", run(PPL_A, WRONG_A))
    results_dir(tmp_path / "b", run(PPL_B[:2], WRONG_B[:2], draws=(0, 1)))
    comparison = compare.compare(tmp_path / "a", tmp_path / "b")
    test = rows_of(comparison, "svd-llm")["perplexity"]["draws test"]
    assert test["draws"] == [0, 1]
    # two pairs: t with 1 degree of freedom, P(|T| > t) = 1 - 2 atan(t) / pi
    d = [b - a for a, b in zip(PPL_A[:2], PPL_B[:2], strict=True)]
    t = abs(statistics.mean(d) / (statistics.stdev(d) / math.sqrt(2)))
    assert test["p"] == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)
    note = "draws 0, 1, 2 in A, 0, 1 in B; the test over draws pairs draws 0, 1 only"
    assert any(note in n for n in comparison["notes"])


def test_compare_without_common_draws_uses_welch_and_a_single_draw_gets_none(tmp_path):
    results_dir(tmp_path / "a", run(PPL_A[:2], WRONG_A[:2], draws=(0, 1)))
    results_dir(tmp_path / "b", run(PPL_B, WRONG_B, draws=(2, 3, 4), seed=5))
    comparison = compare.compare(tmp_path / "a", tmp_path / "b")
    test = rows_of(comparison, "svd-llm")["perplexity"]["draws test"]
    a, b = PPL_A[:2], PPL_B
    va, vb = statistics.variance(a) / 2, statistics.variance(b) / 3
    t = (statistics.mean(b) - statistics.mean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2)  # Welch-Satterthwaite
    from scipy import stats

    assert test["test"] == "Welch t" and test["p"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    notes = " ".join(comparison["notes"])
    assert "Welch's t-test" in notes and "seed 0 in A, 5 in B" in notes
    assert "per example" not in rows_of(comparison, "svd-llm")["piqa/acc"]  # no draw in common

    results_dir(tmp_path / "one", run(PPL_A[:1], WRONG_A[:1], draws=(0,)))
    single = compare.compare(tmp_path / "one", tmp_path / "b")
    assert "draws test" not in rows_of(single, "svd-llm")["perplexity"]
    assert any("a single draw on one side: no test over draws" in n for n in single["notes"])


def test_compare_of_single_draw_runs_is_as_before(tmp_path):
    a = [record(None, 0, 20.0), record("svd", 0, 30.0)]
    b = [record(None, 0, 20.0), record("svd", 0, 33.0)]
    results_dir(tmp_path / "a", a)
    results_dir(tmp_path / "b", b)
    comparison = compare.compare(tmp_path / "a", tmp_path / "b")
    assert "draws" not in comparison and not comparison["notes"]
    columns = ["cell", "metric", "A", "B", "B - A", "relative"]
    assert all(list(row) == columns for row in comparison["rows"])
    row = rows_of(comparison, "svd")["perplexity"]
    assert (row["A"], row["B"], row["B - A"]) == (30.0, 33.0, 3.0)
    text = compare.render(comparison)
    assert "±" not in text and "draws test" not in text and "per example" not in text


# ---------------------------------------------------------------- Pareto plots
def panels(results, axis="bytes"):
    ok = [r for r in results if r.ok]
    metrics = pareto.plotted_metrics(ok)
    use_kept = all(pareto.AXES[axis][0] in r.metrics for r in ok)
    fig = pareto.figure(ok, metrics, axis, use_kept, "t")
    return fig, dict(zip(metrics, fig.axes, strict=True))


def test_pareto_draws_one_point_per_cell_at_the_mean_with_the_spread_as_error_bar():
    second = [record("svd-llm", d, p, kept=0.5) for d, p in enumerate([300.0, 330.0, 320.0])]
    results = [*run(PPL_A, WRONG_A), *second]
    fig, axes = panels(results)
    ax = axes["perplexity"]
    # the svd-llm line: not the baseline's star or level, an error bar's cap or the front's steps
    (line,) = [
        line
        for line in ax.get_lines()
        if line.get_marker() not in ("*", "None", "_", "|") and line.get_drawstyle() == "default"
    ]
    assert list(line.get_xdata()) == pytest.approx([1.0, 1.8])  # bytes_kept / 1e6, the same for each draw
    means = [sum([300.0, 330.0, 320.0]) / 3, sum(PPL_A) / 3]
    assert list(line.get_ydata()) == pytest.approx(means, rel=1e-12)
    bars = sorted(
        (seg for c in ax.containers for col in c.lines[2] for seg in col.get_segments()), key=lambda s: s[0][0]
    )
    assert len(bars) == 2  # one vertical bar per cell of draws, none for the baseline, no size bars
    for segment, values in zip(bars, ([300.0, 330.0, 320.0], PPL_A), strict=True):
        (x0, low), (x1, high) = segment
        mean, std = sum(values) / 3, math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)
        assert x0 == x1 and (low, high) == (pytest.approx(mean - std), pytest.approx(mean + std))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "mean ± spread over 3 draws" in labels
    assert pareto.caption(results).startswith("cells with calibration draws: mean ± spread over 3 draws")


def test_pareto_size_that_varies_over_draws_gets_a_horizontal_bar_too():
    sizes = [1.7e6, 1.8e6, 1.9e6]
    results = [record(None, 0, 20.0), *(record("svd-llm", d, PPL_A[d], bytes_kept=sizes[d]) for d in range(3))]
    _, axes = panels(results)
    ax = axes["perplexity"]
    (container,) = ax.containers
    segments = [seg for col in container.lines[2] for seg in col.get_segments()]
    horizontal = [s for s in segments if s[0][1] == s[1][1]]
    assert len(segments) == 2 and len(horizontal) == 1
    (x0, _), (x1, _) = horizontal[0]
    assert (x0, x1) == (pytest.approx(1.8 - 0.1), pytest.approx(1.8 + 0.1))  # mean ± std of 1.7/1.8/1.9 MB


def test_pareto_of_a_single_draw_suite_plots_each_record_as_before():
    results = [record(None, 0, 20.0), record("svd", 0, 30.0, kept=0.9), record("svd", 0, 50.0, kept=0.5)]
    fig, axes = panels(results)
    ax = axes["perplexity"]
    assert not ax.containers and pareto.caption(results) == ""
    data = sorted(tuple(map(tuple, line.get_xydata().tolist())) for line in ax.get_lines())
    expected = [
        ((0.0, 20.0), (1.0, 20.0)),  # the baseline's dotted level (axes coordinates in x)
        ((1.0, 50.0), (1.8, 30.0)),  # svd, sorted by size
        ((2.0, 20.0),),  # the baseline's star at 2 MB
        ((1.0, 50.0), (1.8, 30.0), (2.0, 20.0)),  # the Pareto front (lower is better)
    ]
    assert data == sorted(expected)
    assert all("draws" not in t.get_text() for t in fig.legends[0].get_texts())


# ---------------------------------------------------------------- report.html and harness show
def test_report_html_lists_a_cells_draws_in_one_provenance_row(tmp_path):
    records = run(PPL_A, WRONG_A)
    page = html.provenance_html(records)
    assert page.count("draws=0,1,2") == 1 and "draw=1" not in page
    assert all(r.cell_id in page for r in records)
    path = html.write_report(records, tmp_path, "t")
    text = path.read_text()
    assert "pareto_bytes.png: cells with calibration draws: mean ± spread over 3 draws" in text
    single = html.write_report([record(None, 0, 20.0), record("svd", 0, 30.0)], tmp_path / "s", "t").read_text()
    assert "<figcaption>pareto_bytes.png</figcaption>" in single


def test_show_names_the_configurations_draws_and_their_spread(tmp_path):
    records = run(PPL_A, WRONG_A)
    directory = results_dir(tmp_path / "r", records)
    path = show.find_cell(records[2].cell_id, directory)
    text = show.describe(show.load_cell(path), path)
    assert "1 of the configuration's 3 draws" in text and records[3].cell_id[:12] in text
    assert f"perplexity {sum(PPL_A) / 3:.6g} ± {statistics.stdev(PPL_A):.4g} [170, 181] n=3" in text
    plain = show.find_cell(records[0].cell_id, directory)
    assert "draws" not in show.describe(show.load_cell(plain), plain)
