"""Each method factorizes every group once per model, whatever the number of
targets and allocators: the targets are served by truncating the same
factorization (the runner must not refactorize per target)."""

from __future__ import annotations

import json

import pytest

import harness
from harness.plugins import get_plugins
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from tests.conftest import write_suite


class CountingSVD(harness.Decomposer):
    """Plain SVD that counts its factorize calls per group."""

    name = "counting-svd"

    def __init__(self) -> None:
        self.calls: dict[tuple[str, ...], int] = {}

    def factorize(self, weights, stats, options, ctx):
        names = tuple(weights)
        self.calls[names] = self.calls.get(names, 0) + 1
        svd = get_plugins().get("decomposer", "svd")
        return svd.factorize(weights, stats, svd.Options(), ctx)


class CountingPlugin:
    def __init__(self) -> None:
        self.decomposer = CountingSVD()

    @harness.hookimpl
    def register_decomposers(self, register):
        register(self.decomposer)


@pytest.fixture
def counting():
    plugin = CountingPlugin()
    get_plugins().register(plugin, name="counting")
    return plugin.decomposer


def suite_with_targets(tmp_path, model_dir, targets: str):
    return load_suite(
        write_suite(
            tmp_path / f"once-{len(targets)}.toml",
            f"""
            name = "once"
            device = "cpu"
            models = ["{model_dir}"]
            targets = {targets}
            allocators = ["uniform", "energy"]
            [[methods]]
            name = "counting-svd"
            [[evaluators]]
            name = "perplexity"
            options = {{ seqlen = 16, max_windows = 1 }}
            """,
        )
    )


def test_four_targets_two_allocators_factorize_each_group_once(counting, tiny_model_dir, tmp_path):
    suite = suite_with_targets(tmp_path, tiny_model_dir, "[0.9, 0.7, 0.5, 0.3]")
    summary = run_suite(suite, RunOptions(results_root=tmp_path / "r", progress=False))
    assert summary.computed == 1 + 4 * 2 and not summary.failed
    assert len(counting.calls) == 14  # 2 layers x 7 projections of the tiny Llama
    assert set(counting.calls.values()) == {1}
    # the cells differ (truncation at different ranks), and every one reports the one factorization time
    cells = [json.loads(p.read_text()) for p in (tmp_path / "r" / "once" / "cells").glob("*.json")]
    compressed = [c for c in cells if c["method"]]
    assert len({c["sizes"]["model_params"] for c in compressed if c["allocator"]["name"] == "uniform"}) == 4
    assert len({c["timing"]["factorize_s"] for c in compressed}) == 1


def test_rerun_with_a_new_target_factorizes_once_more_and_reuses_the_rest(counting, tiny_model_dir, tmp_path):
    run_suite(suite_with_targets(tmp_path, tiny_model_dir, "[0.5]"), RunOptions(tmp_path / "r", progress=False))
    counting.calls.clear()
    summary = run_suite(
        suite_with_targets(tmp_path, tiny_model_dir, "[0.5, 0.25]"), RunOptions(tmp_path / "r", progress=False)
    )
    assert (summary.computed, summary.skipped) == (2, 3)  # the new target under both allocators
    assert set(counting.calls.values()) == {1}
