"""End to end through the CLI on the embedded model, with tiny limits.

One suite run (baseline + SVD at two kept fractions, HellaSwag and PIQA through
lm-eval, perplexity, params, MLflow on a SQLite file) is shared by the tests
of this module; a second run must reuse every cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, write_suite

LIMIT = 6
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    suite = write_suite(
        tmp / "e2e.toml",
        f"""
        name = "e2e"
        device = "cpu"
        models = ["embedded"]
        targets = [0.95, 0.9]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "lm-eval"
        options = {{ tasks = ["hellaswag", "piqa"], batch_size = 8 }}
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 128, max_windows = 4 }}
        [[profilers]]
        name = "params"
        [[trackers]]
        name = "mlflow"
        options = {{ tracking_uri = "sqlite:///{tmp}/mlflow.db", experiment = "e2e" }}
    """,
    )
    results = tmp / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        str(suite),
        "--results",
        str(results),
        "--limit",
        str(LIMIT),
        "--no-progress",
    ]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"tmp": tmp, "results": results / "e2e", "first": first, "second": second}


def cells(run) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run["results"] / "cells").glob("*.json"))]


def test_leaderboard_has_baseline_and_svd_rows(suite_run):
    board = json.loads((suite_run["results"] / "leaderboard.json").read_text())
    rows = {(r["method"], r["target"]) for r in board["rows"]}
    assert rows == {("baseline", "—"), ("svd", "keep=0.95"), ("svd", "keep=0.9")}
    assert {"hellaswag/acc", "piqa/acc", "perplexity"} <= set(board["metrics"])
    text = suite_run["first"].stdout
    assert "| baseline" in text and "keep=0.9 " in text
    assert "de-quantized" in text and "hellaswag validation" in text and "seed: 0" in text


def test_kept_fractions_and_sizes_are_exact(suite_run):
    for cell in cells(suite_run):
        metrics, sizes = cell["metrics"], cell["sizes"]
        if cell["method"] is None:
            assert metrics["kept_fraction"] == 1.0
            continue
        target = cell["target"]["value"]
        assert target - 0.01 < metrics["kept_fraction"] <= target
        kept = sum(r * (576 + 576) for n, r in cell["ranks"].items() if n.endswith(("q_proj", "o_proj")))
        assert kept > 0
        assert metrics["params_kept"] == sum(
            r * sum(shape) for r, shape in ((cell["ranks"][n], _shape(n)) for n in cell["ranks"])
        )
        total = 134515008  # SmolLM2-135M, tied embeddings counted once
        assert sizes["model_params"] == total - sizes["dense_decomposable_params"] + metrics["params_kept"]


def _shape(name: str) -> tuple[int, int]:
    kind = name.rsplit(".", 1)[-1]
    return {
        "q_proj": (576, 576),
        "o_proj": (576, 576),
        "k_proj": (192, 576),
        "v_proj": (192, 576),
        "gate_proj": (1536, 576),
        "up_proj": (1536, 576),
        "down_proj": (576, 1536),
    }[kind]


def test_baseline_accuracy_equals_lm_eval_run_directly(suite_run, embedded):
    import lm_eval
    from harness_lmeval import task_config
    from lm_eval.models.huggingface import HFLM

    baseline = next(c for c in cells(suite_run) if c["method"] is None)
    lm = HFLM(pretrained=embedded.model, tokenizer=embedded.tokenizer, batch_size=8, device="cpu")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task_config("hellaswag", "embedded"), task_config("piqa", "embedded")],
        limit=LIMIT,
        # simple_evaluate builds its own TaskManager when given none
        bootstrap_iters=0,
    )
    for task in ("hellaswag", "piqa"):
        assert baseline["metrics"][f"{task}/acc"] == pytest.approx(out["results"][task]["acc,none"], abs=1e-12)
        assert baseline["metrics"][f"{task}/acc_norm"] == pytest.approx(out["results"][task]["acc_norm,none"])
        assert baseline["evaluations"]["lm-eval"]["tasks"][task]["examples"] == LIMIT


def test_mlflow_holds_a_parent_and_one_nested_run_per_cell(suite_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{suite_run['tmp']}/mlflow.db")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2  # one per suite run; the second run computed nothing
    assert len(children) == 3
    by_cell = {r.data.tags["harness.cell_id"]: r for r in children}
    for cell in cells(suite_run):
        run = by_cell[cell["cell_id"]]
        assert run.data.metrics["hellaswag/acc"] == pytest.approx(cell["metrics"]["hellaswag/acc"])
        assert run.data.metrics["perplexity"] == pytest.approx(cell["metrics"]["perplexity"])
        assert run.data.params["method.name"] == (cell["method"] or {}).get("name", "none")
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert f"{cell['cell_id']}.json" in artifacts
        if cell["method"] is not None:
            ranks = [a.path for a in client.list_artifacts(run.info.run_id, "ranks")]
            assert ranks == [f"ranks/{cell['cell_id']}.csv", f"ranks/{cell['cell_id']}.png"]


def test_every_cell_records_the_rank_of_every_matrix(suite_run):
    import csv

    for cell in cells(suite_run):
        if cell["method"] is None:
            continue
        assert len(cell["ranks"]) == 30 * 7
        with open(suite_run["results"] / cell["artifacts"][0]) as handle:
            rows = list(csv.DictReader(handle))
        assert {row["layer"]: int(row["rank"]) for row in rows} == cell["ranks"]
        assert (suite_run["results"] / cell["artifacts"][1]).stat().st_size > 1000


def test_a_second_run_reuses_every_cell(suite_run):
    assert "3 cells computed, 0 reused" in suite_run["first"].stdout
    assert "0 cells computed, 3 reused" in suite_run["second"].stdout
    assert (
        suite_run["first"].stdout.split("# Leaderboard")[1].split("- Model")[0]
        == suite_run["second"].stdout.split("# Leaderboard")[1].split("- Model")[0]
    )


def test_leaderboard_command_reprints_the_table(suite_run):
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "leaderboard", str(suite_run["results"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0
    assert proc.stdout.count("| embedded") == 3


def test_library_output_goes_to_run_log_and_the_leaderboard_comes_last(suite_run):
    first = suite_run["first"]
    for noise in ("`pretrained` model kwarg", "Running loglikelihood requests", "Passed an already-initialized"):
        assert noise not in first.stderr and noise not in first.stdout
    log = (suite_run["results"] / "run.log").read_text()
    assert "`pretrained` model kwarg" in log and "evaluator lm-eval" in log
    assert "[harness]   evaluator lm-eval:" in first.stderr  # one line per evaluator instead
    *_, footer, summary = [line for line in first.stdout.splitlines() if line.strip()]
    assert footer.startswith("- ") and summary.startswith("3 cells computed")  # the leaderboard, then one line
