"""Calibration draws (``[calibration] draws = K``): a number with its spread.

End to end on the tiny random Llama (slow): draw 0 is the run without the
option (same ids, same numbers), K = 2 gives two records per calibrated cell
on different calibration windows and one baseline and one plain-svd cell,
and deleting one draw's record recomputes only it. Fast, on records written
here: the leaderboard's mean and spread against the formulas, ``harness
check`` with a ``spread`` rule, the paired tests kept per draw, the MLflow
table's spread columns, and the suite option's validation.
"""

from __future__ import annotations

import json
import math
import statistics
import weakref
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.report import check, leaderboard, significance
from harness.run.cells import content_hash
from harness.run.prepare import Prepared
from harness.run.record import CellRecord
from harness.store import ResultStore, read_results
from harness.suite import load_suite
from tests.conftest import write_suite

SUITE = """
name = "draws"
device = "cpu"
models = ["{model}"]
targets = [0.9]
allocators = ["uniform"]
[calibration]
samples = 4
seqlen = 32
{draws}
[[methods]]
name = "svd"
[[methods]]
name = "svd-llm"
[[evaluators]]
name = "perplexity"
options = {{ seqlen = 16, max_windows = 1 }}
"""


def draws_suite(folder: Path, model: Path, draws: int | None):
    line = "" if draws is None else f"draws = {draws}"
    return load_suite(write_suite(folder / f"draws-{draws}.toml", SUITE.format(model=model, draws=line)))


# ---------------------------------------------------------------- end to end (the tiny Llama)
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The suite run without the option and with ``draws = 2``, each windows tensor drawn recorded."""
    from harness import data as data_mod
    from harness.run.runner import RunOptions, run_suite

    folder = tmp_path_factory.mktemp("draws")
    drawn: list[tuple[int, torch.Tensor]] = []
    real = data_mod.calibration_batches

    def spy(tokenizer, data, samples, seqlen, seed):
        batches = real(tokenizer, data, samples, seqlen, seed)
        drawn.append((seed, batches.clone()))
        return batches

    made: list[weakref.ref] = []
    alive_at_draw: dict[int, int] = {}
    init = Prepared.__init__

    def counting(self, env, *args):
        alive_at_draw[env.suite.draw] = sum(ref() is not None for ref in made)  # earlier draws' still alive
        init(self, env, *args)
        made.append(weakref.ref(self))

    options = {"progress": False, "calibration_cache": folder / "cache"}
    plain = run_suite(draws_suite(folder, tiny_model_dir, None), RunOptions(folder / "plain", **options))
    made.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_mod, "calibration_batches", spy)
        patch.setattr(Prepared, "__init__", counting)
        two = run_suite(draws_suite(folder, tiny_model_dir, 2), RunOptions(folder / "two", **options))
    return {"folder": folder, "plain": plain, "two": two, "drawn": drawn, "options": options, "alive": alive_at_draw}


def by_label(summary) -> dict[str, list[CellRecord]]:
    out: dict[str, list[CellRecord]] = {}
    for record in summary.results:
        out.setdefault(record.method_label, []).append(record)
    return {k: sorted(v, key=lambda r: r.draw) for k, v in out.items()}


@pytest.mark.slow
def test_draw_zero_is_the_run_without_the_option(runs):
    plain, two = runs["plain"], runs["two"]
    assert not plain.failed and not two.failed
    first = {r.cell_id: r.metrics for r in plain.results}
    zero = {r.cell_id: r.metrics for r in two.results if r.draw == 0}
    assert zero == first  # same ids, same numbers
    # a record of draw 0 is stored as before the option: no "draw" key
    stored = json.loads((runs["folder"] / "two" / "draws" / "cells" / f"{next(iter(zero))}.json").read_text())
    assert "draw" not in stored


@pytest.mark.slow
def test_two_draws_two_calibrated_records_on_different_windows_one_baseline(runs):
    cells = by_label(runs["two"])
    assert [r.draw for r in cells["baseline"]] == [0] and [r.draw for r in cells["svd"]] == [0]
    first, second = cells["svd-llm"]
    assert (first.draw, second.draw) == (0, 1) and first.cell_id != second.cell_id
    assert second.calibration["draw"] == 1 and "draw" not in first.calibration
    assert first.metrics["perplexity"] != second.metrics["perplexity"]
    # the windows: seed 0 for draw 0, seed 1 for draw 1, and they differ
    seeds = [seed for seed, _ in runs["drawn"]]
    assert seeds == [0, 1]
    (_, zero), (_, one) = runs["drawn"]
    assert zero.shape == one.shape and not torch.equal(zero, one)
    stored = json.loads((runs["folder"] / "two" / "draws" / "cells" / f"{second.cell_id}.json").read_text())
    assert stored["draw"] == 1 and CellRecord.from_json(stored).draw == 1
    # one draw's calibration data and factorizations at a time: draw 0's were let go of before draw 1's
    assert runs["alive"] == {0: 0, 1: 0}


@pytest.mark.slow
def test_the_leaderboard_row_of_two_draws_is_their_mean_with_spread(runs):
    records = read_results(runs["folder"] / "two" / "draws")
    board = leaderboard.build(records)
    assert len(board["rows"]) == 3  # baseline, svd, svd-llm (its two draws one row)
    i = [r["method"] for r in board["rows"]].index("svd-llm")
    a, b = (r.metrics["perplexity"] for r in sorted(records, key=lambda r: r.draw) if r.method_label == "svd-llm")
    assert board["rows"][i]["perplexity"] == pytest.approx((a + b) / 2, rel=1e-12)
    spread = board["spread"][i]["perplexity"]
    assert spread["std"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-12)  # ddof 1, n = 2
    assert (spread["n"], spread["min"], spread["max"]) == (2, min(a, b), max(a, b))
    assert "n=2" in leaderboard.render(board)


@pytest.mark.slow
def test_resume_after_deleting_one_draw_recomputes_only_it(runs, tiny_model_dir):
    from harness.run.runner import RunOptions, run_suite

    folder = runs["folder"]
    second = by_label(runs["two"])["svd-llm"][1]
    store = ResultStore(folder / "two" / "draws")
    kept = {p.name: p.stat().st_mtime_ns for p in (store.root / "cells").glob("*.json")}
    store.path(second.cell_id).unlink()
    again = run_suite(draws_suite(folder, tiny_model_dir, 2), RunOptions(folder / "two", **runs["options"]))
    assert (again.computed, again.skipped) == (1, 3)
    redone = next(r for r in again.results if r.cell_id == second.cell_id)
    assert redone.draw == 1 and redone.metrics == second.metrics
    after = {p.name: p.stat().st_mtime_ns for p in (store.root / "cells").glob("*.json")}
    assert {n: t for n, t in after.items() if n in kept and n != f"{second.cell_id}.json"} == {
        n: t for n, t in kept.items() if n != f"{second.cell_id}.json"
    }


# ---------------------------------------------------------------- reports on records written here
def record(method: str | None, draw: int, ppl: float, acc: list[int] | None = None, config_tag: str = "a"):
    """A finished cell: ``method`` (None: the baseline) at calibration draw ``draw``."""
    config = {"method": method, "tag": config_tag, "calibration": {"samples": 4, **({"draw": draw} if draw else {})}}
    metrics = {"perplexity": ppl, "kept_fraction": 1.0 if method is None else 0.9}
    evaluations = {}
    if acc is not None:
        metrics["piqa/acc"] = sum(acc) / len(acc)
        per_example = {str(i): {"acc": v} for i, v in enumerate(acc)}
        evaluations = {"lm-eval": {"tasks": {"piqa": {"per_example": per_example}}}}
    return CellRecord(
        cell_id=content_hash({"method": method, "tag": config_tag, "draw": draw}),
        suite="s",
        status="ok",
        model={"id": "m"},
        method=None if method is None else {"name": method, "label": method},
        allocator=None if method is None else {"name": "uniform", "label": "uniform"},
        target=None if method is None else {"kind": "params", "value": 0.9, "label": "keep=0.9"},
        calibration=None if method is None else config["calibration"],
        draw=draw,
        metrics=metrics,
        higher_is_better={"perplexity": False, "piqa/acc": True, "kept_fraction": True},
        evaluations=evaluations,
        provenance={"created": f"2026-01-0{draw + 1}T00:00:00", "seed": 0},
        config=config,
    )


PPL = [170.0, 181.0, 176.5]


def three_draws() -> list[CellRecord]:
    return [record(None, 0, 20.0), *(record("svd-llm", d, p) for d, p in enumerate(PPL))]


def test_leaderboard_mean_sample_std_and_range_over_three_draws():
    board = leaderboard.build(three_draws())
    assert [r["method"] for r in board["rows"]] == ["baseline", "svd-llm"]
    mean = sum(PPL) / 3
    std = math.sqrt(sum((p - mean) ** 2 for p in PPL) / 2)  # sample standard deviation, by hand
    assert board["rows"][1]["perplexity"] == pytest.approx(mean, rel=1e-12)
    spread = board["spread"][1]["perplexity"]
    assert spread["std"] == pytest.approx(std, rel=1e-12)
    assert (spread["n"], spread["min"], spread["max"]) == (3, 170.0, 181.0)
    assert [d["draw"] for d in board["draws"][1]] == [0, 1, 2] and board["spread"][0] == {}
    text = leaderboard.render(board)
    assert f"{leaderboard.fmt(mean)} ± {leaderboard.fmt(std)} [170, 181] n=3" in text
    assert "kept" in text and "0.9 ±" not in text  # a size column that does not vary shows no spread


def test_a_single_draw_directory_has_no_spread_and_stale_records_stay_rows():
    records = [record(None, 0, 20.0), record("svd", 0, 30.0, config_tag="old"), record("svd", 0, 31.0)]
    board = leaderboard.build(records)
    assert len(board["rows"]) == 3 and "spread" not in board and "draws" not in board


def test_draws_of_another_configuration_are_not_averaged_in():
    records = [*three_draws(), record("svd-llm", 0, 999.0, config_tag="other")]
    board = leaderboard.build(records)
    rows = [r["perplexity"] for r in board["rows"] if r["method"] == "svd-llm"]
    assert sorted(rows) == [pytest.approx(sum(PPL) / 3), 999.0]


def baseline_file(path: Path, ppl: float, tolerances: list[dict]) -> Path:
    rows = [
        {"model": "m", "method": "baseline", "allocator": "—", "target": "—", "metrics": {"perplexity": 20.0}},
        {
            "model": "m",
            "method": "svd-llm",
            "allocator": "uniform",
            "target": "keep=0.9",
            "metrics": {"perplexity": ppl},
        },
    ]
    rows[1]["metrics"] = {"perplexity": ppl}
    document = {"format": check.FORMAT, "header": {}, "tolerances": tolerances, "rows": rows}
    path.write_text(json.dumps(document))
    return path


def results_dir(path: Path, records: list[CellRecord]) -> Path:
    store = ResultStore(path)
    for r in records:
        store.save(r)
    return path


def test_check_with_the_spread_rule_compares_the_mean_within_its_standard_deviation(tmp_path):
    results = results_dir(tmp_path / "r", three_draws())
    mean, std = sum(PPL) / 3, statistics.stdev(PPL)
    rules = [{"metric": "*", "rel": 1e-9}, {"metric": "perplexity", "row": "* svd-llm *", "spread": 1.0}]
    inside = check.check(results, baseline_file(tmp_path / "in.json", mean + 0.8 * std, rules))
    outside = check.check(results, baseline_file(tmp_path / "out.json", mean - 1.2 * std, rules))
    strict = check.check(results, baseline_file(tmp_path / "strict.json", mean + 0.8 * std, rules[:1]))
    assert inside.ok and not outside.ok and not strict.ok
    moved = next(e for e in inside.entries if e.row.endswith("keep=0.9"))
    assert moved.status == "moved" and moved.current == pytest.approx(mean, rel=1e-12)
    assert moved.allowed == pytest.approx(std + 1e-9 * (mean + 0.8 * std), rel=1e-9)
    assert "mean of 3 draws" in check.render(outside)


def test_check_fails_a_row_whose_draw_failed(tmp_path):
    records = three_draws()
    records[2].status, records[2].error = "failed", {"type": "RuntimeError", "message": "boom"}
    results = results_dir(tmp_path / "r", records)
    report = check.check(results, baseline_file(tmp_path / "b.json", sum(PPL) / 3, check.DEFAULT_TOLERANCES))
    failed = next(e for e in report.entries if e.status == "FAIL")
    assert "calibration draw 1" in failed.note and "boom" in failed.note


def test_harness_baseline_writes_the_mean_and_the_draws_standard_deviation(tmp_path):
    results = results_dir(tmp_path / "r", three_draws())
    document = check.make_baseline(results, "test")
    row = next(r for r in document["rows"] if r["method"] == "svd-llm")
    assert row["metrics"]["perplexity"] == pytest.approx(sum(PPL) / 3, rel=1e-12)
    assert row["draws"] == 3 and row["std"]["perplexity"] == pytest.approx(statistics.stdev(PPL), rel=1e-12)


def test_paired_tests_are_kept_per_draw_never_pooled():
    base = [1] * 40 + [0] * 10
    near = [1] * 39 + [0] * 11  # one discordant pair: not significant
    far = [0] * 40 + [0] * 10  # 40 discordant pairs one way: significant
    records = [record(None, 0, 20.0, base), record("svd-llm", 0, 30.0, near), record("svd-llm", 1, 31.0, far)]
    board = leaderboard.build(records)
    test = board["significance"][1]["piqa/acc"]
    assert [t["draw"] for t in test["draws"]] == [0, 1]
    by_hand = [significance.mcnemar_exact(base, near)["p_value"], significance.mcnemar_exact(base, far)["p_value"]]
    assert [t["mcnemar_p"] for t in test["draws"]] == by_hand
    assert [t["n"] for t in test["draws"]] == [50, 50] and test["n"] == 50  # the same 50 examples, not 100
    assert test["significant"] and board["marks"][1] == {}  # one draw differs: no ≈ for the row
    from harness.report import html

    page = html.significance_html(board)
    assert "keep=0.9 draw=0" in page and "keep=0.9 draw=1" in page


def test_the_mlflow_leaderboard_table_has_the_spread_columns():
    from harness_mlflow import leaderboard_table

    table = leaderboard_table(leaderboard.build(three_draws()))
    assert table["draws"] == [1, 3]
    assert table["perplexity std"][0] is None
    assert table["perplexity std"][1] == pytest.approx(statistics.stdev(PPL), rel=1e-12)
    assert (table["perplexity min"][1], table["perplexity max"][1]) == (170.0, 181.0)


# ---------------------------------------------------------------- the suite option
def test_draws_must_be_a_positive_integer(tmp_path):
    for value, expected in (("0", "draws: expected a positive integer"), ('"2"', "expected an integer")):
        path = write_suite(tmp_path / "bad.toml", f"name = 'x'\n[calibration]\ndraws = {value}\n")
        with pytest.raises(HarnessError) as info:
            load_suite(path)
        assert str(path) in str(info.value) and "calibration" in str(info.value) and expected in str(info.value)


def test_the_cells_of_a_grid_with_draws(tmp_path):
    """Draws 1..K-1 repeat the calibrated cells only, each with its own id; draw 0's ids are those of K = 1."""
    from harness.run.cells import expand

    suite = load_suite(write_suite(tmp_path / "d.toml", SUITE.format(model="embedded", draws="draws = 3")))
    one = load_suite(write_suite(tmp_path / "o.toml", SUITE.format(model="embedded", draws="")))

    def calibrated(method, allocator):
        return method.name == "svd-llm"

    cells = expand(suite, "embedded", {}, {}, calibrated=calibrated)
    plain = expand(one, "embedded", {}, {}, calibrated=calibrated)
    assert [c.id for c in cells if c.draw == 0] == [c.id for c in plain]
    assert [(c.method and c.method.name, c.draw) for c in cells] == [
        (None, 0),
        ("svd", 0),
        ("svd-llm", 0),
        ("svd-llm", 1),
        ("svd-llm", 2),
    ]
    assert len({c.id for c in cells}) == 5 and cells[3].label.endswith("draw=1")


def test_the_ray_executor_refuses_draws(tmp_path, capsys):
    from harness.cli import main

    path = write_suite(tmp_path / "r.toml", SUITE.format(model="embedded", draws="draws = 2"))
    assert main(["run", str(path), "--executor", "ray", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "calibration.draws: expected 1 under --executor ray" in err and "got 2" in err
    assert not (tmp_path / "r").exists()
