"""The typed cell record: its stored form, its identity, and options that reach every stage."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from harness.errors import HarnessError
from harness.run import record as record_module
from harness.run.env import RunOptions
from harness.run.record import SCHEMA_VERSION, CellRecord
from harness.run.runner import run_suite
from harness.store import ResultStore, read_results
from harness.suite import load_suite
from tests.conftest import write_suite


def stored(**changes) -> dict:
    data = {
        "schema": SCHEMA_VERSION,
        "cell_id": "ab12",
        "suite": "unit",
        "status": "ok",
        "model": {"id": "tiny"},
        "method": {"name": "svd", "label": "svd", "options": {}},
        "allocator": {"name": "uniform", "label": "uniform", "options": {}},
        "target": {"kind": "params", "value": 0.8, "label": "keep=0.8"},
        "metrics": {"perplexity": 31.5},
    }
    return {**data, **changes}


def test_schema_docstring_names_every_field_and_nothing_else():
    documented = set(re.findall(r"^    (\w+) +(?:int|str|dict|list) ", record_module.__doc__, flags=re.M))
    assert documented == {f.name for f in dataclasses.fields(CellRecord)}


def test_round_trip_through_the_store_keeps_every_value(tmp_path):
    store = ResultStore(tmp_path)
    record = CellRecord.from_json(stored(ranks={"l.q_proj": 3, "l.k_proj": None}, timing={"cell_s": 1.5}))
    path = store.save(record)
    assert json.loads(path.read_text()) == record.to_json()
    assert store.load("ab12") == record and store.done("ab12")
    assert read_results(tmp_path) == [record]


def test_another_schema_version_is_refused_naming_it():
    with pytest.raises(HarnessError, match=r"cells/x.json: schema: expected cell result schema version 1, got 2"):
        CellRecord.from_json(stored(schema=2), "cells/x.json")
    with pytest.raises(HarnessError, match="expected the keys model, status"):
        CellRecord.from_json({"schema": 1, "cell_id": "a", "suite": "s"}, "f")
    with pytest.raises(HarnessError, match="expected a JSON object"):
        CellRecord.from_json([1, 2], "f")


def test_row_key_and_label_of_a_method_and_a_baseline_cell():
    compressed = CellRecord.from_json(stored())
    baseline = CellRecord.from_json(stored(method=None, allocator=None, target=None))
    assert compressed.row_key == ("tiny", "svd", "uniform", "keep=0.8")
    assert compressed.label == "tiny svd uniform keep=0.8"
    assert baseline.row_key == ("tiny", "baseline", "—", "—") and baseline.label == "tiny baseline"
    assert sorted([compressed, baseline], key=CellRecord.order_key) == [baseline, compressed]


def test_dict_style_reads_still_work_for_hooks_written_against_the_dict():
    record = CellRecord.from_json(stored())
    assert record["metrics"] == {"perplexity": 31.5} and record.get("status") == "ok"
    assert record.get("nonsense", 7) == 7
    with pytest.raises(KeyError):
        record["nonsense"]


def calibrated_suite(tmp_path, model_dir):
    return load_suite(
        write_suite(
            tmp_path / "progress.toml",
            f"""
            name = "progress"
            device = "cpu"
            models = ["{model_dir}"]
            targets = [0.8]
            [calibration]
            samples = 2
            seqlen = 16
            [[methods]]
            name = "svd-llm"
            [[evaluators]]
            name = "perplexity"
            options = {{ seqlen = 16, max_windows = 1 }}
            """,
        )
    )


@pytest.mark.parametrize("progress", [False, True])
def test_no_progress_reaches_calibration_and_factorization(progress, tiny_model_dir, tmp_path, capfd):
    options = RunOptions(tmp_path / "r", progress=progress, calibration_cache=tmp_path / "cache")  # computed afresh
    summary = run_suite(calibrated_suite(tmp_path, tiny_model_dir), options)
    assert not summary.failed
    err = capfd.readouterr().err
    drawn = [bar for bar in ("calibration (blocks)", "factorize svd-llm") if bar in err]
    assert drawn == ([] if not progress else ["calibration (blocks)", "factorize svd-llm"])
