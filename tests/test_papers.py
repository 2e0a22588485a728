"""The papers' suites (suites/papers/) and their published-figure baselines (suites/baselines/papers/).

Fast tests: every suite that its plugins allow validates, every baseline loads, names its suite,
cites a source for every row and holds only rows its suite computes. The slow test runs the
SVD-LLM and benchmark suites end to end offline through the hub loaders: the suite's model id
(``jeffwan/llama-7b-hf``) resolves from a local Hugging Face cache holding a tiny random Llama,
and ``load_dataset("wikitext", "wikitext-2-raw-v1")`` from a local ``wikitext/`` folder in the
run's working directory holding WikiText-format text; only sizes (device, dtype, calibration and
window lengths) are rewritten. ``harness check`` against the published baseline must then
compare every published number (no row missing) and fail: a random model reproduces none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAPERS = ROOT / "suites" / "papers"
BASELINES = ROOT / "suites" / "baselines" / "papers"
PAIRS = {
    "svd_llm": "svd_llm",
    "lowrankarena": "lowrankarena",
    "lowrankarena_zs_svd": "lowrankarena_zs_svd",
    "lowrankarena_aa_svd": "lowrankarena_aa_svd",
}
NEEDS = {"lowrankarena_zs_svd": "zs-svd", "lowrankarena_aa_svd": "aa-svd"}
"""Suites whose decomposer is being built elsewhere (issue 18): skipped until it is installed."""


def load(stem: str):
    from harness.plugins import get_plugins
    from harness.suite import load_suite

    needed = NEEDS.get(stem)
    if needed and needed not in get_plugins().names("decomposer"):
        pytest.skip(f"plugin {needed!r} is not installed")
    return load_suite(PAPERS / f"{stem}.toml")


def test_every_suite_file_has_a_baseline():
    assert {p.stem for p in PAPERS.glob("*.toml")} == set(PAIRS)
    assert {p.stem for p in BASELINES.glob("*.json")} == set(PAIRS.values())


@pytest.mark.parametrize("stem", sorted(PAIRS))
def test_baseline_rows_are_cells_of_its_suite(stem):
    from harness.report.check import load_baseline

    suite = load(stem)
    document = load_baseline(BASELINES / f"{PAIRS[stem]}.json")
    assert document["header"]["suite"] == [suite.name]
    cells = {("baseline", "—", "—")}
    cells |= {(m.label, a.label, t.label) for m in suite.methods for a in m.allocators for t in m.targets}
    for row in document["rows"]:
        assert row["model"] in suite.models
        assert (row["method"], row["allocator"], row["target"]) in cells, row
        assert row["source"].strip(), row
        assert set(row["metrics"]) == {"perplexity"}
    assert all(rule.why for rule in document["rules"])


def test_suites_follow_the_papers_protocol():
    """SVD-LLM's protocol: 256 x 2048 WikiText-2 calibration, seed 3, every 2048-token test window,
    its model id, 20/40/60 % removed as keep targets, the head not decomposed."""
    for stem in ("svd_llm", "lowrankarena"):
        suite = load(stem)
        calibration = suite.calibration
        assert (calibration.source, calibration.samples, calibration.seqlen, suite.seed) == ("wikitext2", 256, 2048, 3)
        assert list(suite.models) == ["jeffwan/llama-7b-hf"]
        assert not suite.surgery.lm_head
        assert {t.label for m in suite.methods for t in m.targets} == {"keep=0.8", "keep=0.6", "keep=0.4"}
        (perplexity,) = [e for e in suite.evaluators if e.name == "perplexity"]
        assert (perplexity.options.source, perplexity.options.seqlen) == ("wikitext2", 2048)
        assert perplexity.options.max_windows > 338_000 // 2048  # WikiText-2 test: ~338k LLaMA tokens


def test_baseline_without_source_still_loads_and_a_bad_source_is_refused(tmp_path):
    from harness.errors import HarnessError
    from harness.report.check import load_baseline

    old = load_baseline(ROOT / "suites" / "baselines" / "smoke.json")
    assert all("source" not in row for row in old["rows"])
    document = json.loads((BASELINES / "svd_llm.json").read_text())
    document["rows"][0]["source"] = {"table": 1}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(HarnessError, match=r"rows\[0\]\.source: expected a string"):
        load_baseline(bad)


def test_harness_baseline_refuses_to_overwrite_published_figures(tmp_path, monkeypatch):
    from harness.errors import HarnessError
    from harness.report import check

    published = tmp_path / "published.json"
    shutil.copy(BASELINES / "lowrankarena.json", published)
    monkeypatch.setattr(check, "make_baseline", lambda *a, **k: pytest.fail("must refuse before reading results"))
    with pytest.raises(HarnessError, match="holds published figures"):
        check.write_baseline(tmp_path / "results", published, "harness baseline")
    assert published.read_bytes() == (BASELINES / "lowrankarena.json").read_bytes()


# ---------------------------------------------------------------- end to end, offline
WIKITEXT_README = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: train
    path: wikitext-2-raw-v1/train.txt
  - split: test
    path: wikitext-2-raw-v1/test.txt
  keep_linebreaks: true
---
"""


def wikitext_format(title: str, paragraphs: int, seed: int) -> str:
    """Text laid out as WikiText-2 raw: ' = Title = ' headings, blank ' ' lines, '@-@' tokens, spaced punctuation."""
    import random

    rng = random.Random(seed)
    words = ["the", "of", "a", "in", "valkyria", "chronicles", "game", "battle", "unit", "series", "war", "army"]
    lines = [" ", f" = {title} = ", " "]
    for p in range(paragraphs):
        if p % 3 == 0:
            lines += [f" = = Section {p} = = ", " "]
        sentence = " ".join(rng.choice(words) for _ in range(60))
        lines += [f" {sentence} , 1 @,@ 200 @-@ strong . {sentence[:80]} .", " "]
    return "\n".join(lines) + "\n"


def write_local_wikitext(root: Path) -> None:
    """A local folder that ``load_dataset("wikitext", "wikitext-2-raw-v1", split=...)`` reads from the
    working directory: one row per line with its line break, as the hub's rows."""
    folder = root / "wikitext"
    (folder / "wikitext-2-raw-v1").mkdir(parents=True)
    (folder / "README.md").write_text(WIKITEXT_README)
    (folder / "wikitext-2-raw-v1" / "train.txt").write_text(wikitext_format("Train", 30, 1))
    (folder / "wikitext-2-raw-v1" / "test.txt").write_text(wikitext_format("Test", 12, 2))


def write_hub_cache(hub: Path, repo: str, model_dir: Path) -> None:
    """``model_dir`` as the Hugging Face cache's snapshot of ``repo``: what offline ``from_pretrained(repo)`` reads."""
    commit = "0" * 39 + "1"
    cached = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, cached / "snapshots" / commit)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)


def small(text: str) -> str:
    """The suite with CPU sizes: only device, dtype, window counts and lengths change."""
    for pattern, new in [
        (r'device = "auto"', 'device = "cpu"'),
        (r'dtype = "float16"', 'dtype = "float32"'),
        (r"samples = 256", "samples = 8"),
        (r"seqlen = 2048", "seqlen = 64"),
        (r"max_windows = 100000", "max_windows = 4"),
    ]:
        text, count = re.subn(pattern, new, text)
        assert count, pattern
    return text


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["svd_llm", "lowrankarena"])
def test_paper_suite_runs_offline_and_check_reports_every_published_number(stem, tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    work.mkdir()
    write_local_wikitext(work)
    write_hub_cache(tmp_path / "hf" / "hub", "jeffwan/llama-7b-hf", tiny_model_dir)
    suite = work / f"{stem}.toml"
    suite.write_text(small((PAPERS / f"{stem}.toml").read_text()))
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    results = work / "results"
    cli = [sys.executable, "-m", "harness.cli"]
    run = subprocess.run(
        [*cli, "run", str(suite), "--results", str(results), "--no-progress"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    name = "papers_" + stem
    records = [json.loads(p.read_text()) for p in (results / name / "cells").glob("*.json")]
    assert records and all(r["status"] == "ok" for r in records)
    texts = json.dumps([r["provenance"]["data"] for r in records])
    assert "wikitext2" in texts and "WikiText-2 raw (hub)" in texts, texts[:2000]

    baseline = BASELINES / f"{stem}.json"
    published = json.loads(baseline.read_text())["rows"]
    check = subprocess.run(
        [*cli, "check", str(results / name), "--baseline", str(baseline)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = check.stdout
    assert check.returncode == 1, out + check.stderr
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("check FAILED:"), summary
    assert f"{len(published)} numbers in {len(published)} rows" in summary, summary
    assert " 0 missing" in summary, summary
    new = {"svd_llm": 1, "lowrankarena": 2}[stem]  # cells without a published figure: listed, not checked
    assert f"{new} new rows not checked" in summary, summary
    assert re.search(r"^\| jeffwan/llama-7b-hf baseline +\| perplexity .*\| FAIL +\|", out, re.M), out
    for row in published:
        label = " ".join(p for p in (row["model"], row["method"], row["allocator"], row["target"]) if p != "—")
        # a random model reproduces nothing; a collapsed figure's wide tolerance may still say "moved"
        assert re.search(rf"^\| {re.escape(label)} +\| perplexity .*\| (FAIL|moved) +\|", out, re.M), label
        assert f"source of {label}: {row['source']}" in out
