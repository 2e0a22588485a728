"""Hook contract, registry rules, suite validation and the CLI's one-line errors."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness
from harness import hookspecs
from harness.errors import HarnessError
from harness.plugins import Plugins, get_plugins
from harness.suite import load_suite
from tests.conftest import ROOT, write_suite


class ThrowawayPlugin:
    """A plugin registered for one test only."""

    @dataclass(frozen=True)
    class Options:
        scale: float = 1.0

    class Scaled(harness.Decomposer):
        name = "throwaway"

    Scaled.Options = Options

    def __init__(self):
        self.events = []

    @harness.hookimpl
    def register_decomposers(self, register):
        register(self.Scaled())

    @harness.hookimpl
    def harness_cell_end(self, cell, result):
        self.events.append(("cell_end", result["status"]))


def test_every_hookspec_is_documented():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "harness_spec")]
    assert len(specs) == 10
    for spec in specs:
        assert spec.__doc__ and len(spec.__doc__.strip()) > 20, spec.__name__


def test_builtin_plugins_register_through_entry_points():
    plugins = get_plugins()
    infos = {info.name: info for info in plugins.infos()}
    assert infos["svd"].distribution == "harness-svd"
    assert "svd" in plugins.names("decomposer")
    assert {"uniform"} <= set(plugins.names("allocator"))
    assert {"lm-eval", "perplexity"} <= set(plugins.names("evaluator"))
    assert plugins.names("tracker") == ["mlflow"]


def test_a_throwaway_plugin_registers_and_unregisters():
    plugins = get_plugins()
    plugin = ThrowawayPlugin()
    plugins.register(plugin, name="throwaway-plugin")
    try:
        assert plugins.get("decomposer", "throwaway").name == "throwaway"
        assert plugins.plugin_of("decomposer", "throwaway") == "throwaway-plugin"
    finally:
        plugins.unregister("throwaway-plugin")
    with pytest.raises(HarnessError, match="unknown decomposer 'throwaway'"):
        plugins.get("decomposer", "throwaway")


def test_duplicate_names_are_rejected_naming_both_plugins():
    plugins = get_plugins()

    class Clash:
        @harness.hookimpl
        def register_decomposers(self, register):
            register(type("Clash", (harness.Decomposer,), {"name": "svd"})())

    plugins.register(Clash(), name="clash")
    with pytest.raises(HarnessError, match=r"plugin 'clash' registers decomposer 'svd', already registered by"):
        plugins.registry  # noqa: B018


def test_unknown_name_gets_the_list_and_did_you_mean():
    with pytest.raises(HarnessError, match=r"unknown decomposer 'svdd' \(did you mean 'svd'\?\); known: .*svd"):
        get_plugins().get("decomposer", "svdd")


def test_misspelled_hook_is_caught_at_registration():
    class Misspelled:
        @harness.hookimpl
        def register_decomposer(self, register):  # singular: no such hook
            pass

    with pytest.raises(Exception, match="unknown hook"):
        get_plugins().register(Misspelled(), name="misspelled")


def test_allow_and_block_lists(monkeypatch):
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "svd,allocators")
    assert [i.name for i in Plugins().infos()] == ["allocators", "svd"]
    monkeypatch.delenv("HARNESS_LOAD_PLUGINS")
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "mlflow")
    assert "mlflow" not in [i.name for i in Plugins().infos()]


def test_lifecycle_hooks_reach_plugins(tmp_path, tiny_model_dir):
    from harness.run.runner import RunOptions, run_suite

    plugin = ThrowawayPlugin()
    get_plugins().register(plugin, name="listener")
    suite_file = write_suite(
        tmp_path / "s.toml",
        f"""
        name = "hooks"
        device = "cpu"
        models = ["{tiny_model_dir}"]
        targets = [0.5]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = {{ seqlen = 32, max_windows = 2 }}
    """,
    )
    summary = run_suite(load_suite(suite_file), RunOptions(results_root=tmp_path / "r", progress=False))
    assert plugin.events == [("cell_end", "ok"), ("cell_end", "ok")]
    assert summary.computed == 2


# ---------------------------------------------------------------- suites
SUITE_OK = """
name = "unit"
targets = [0.9]
[[methods]]
name = "svd"
[[evaluators]]
name = "perplexity"
"""


def suite_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(HarnessError) as info:
        load_suite(write_suite(tmp_path / "bad.toml", text))
    message = str(info.value)
    assert "\n" not in message
    assert "bad.toml" in message
    return message


def test_a_valid_suite_parses_into_typed_config(tmp_path):
    suite = load_suite(write_suite(tmp_path / "ok.toml", SUITE_OK))
    assert suite.methods[0].targets[0] == harness.Target("params", 0.9)
    assert suite.methods[0].allocators[0].name == "uniform"
    assert suite.evaluators[0].options.seqlen == 256


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SUITE_OK.replace("targets", "targetz"), r"targetz: unknown key \(did you mean 'targets'\?\)"),
        (SUITE_OK.replace('"svd"', '"svdd"'), r"methods\[0\]\.name: unknown decomposer 'svdd' \(did you mean 'svd'"),
        (SUITE_OK.replace("[0.9]", "[1.5]"), r"targets\[0\]: expected a fraction in \(0, 1\], got 1.5"),
        (SUITE_OK.replace("[0.9]", '["x"]'), r"targets\[0\]: expected a number in \(0, 1\]"),
        (
            SUITE_OK + "options = { seqlen = 'long' }\n",
            r"evaluators\[0\]\.options\.seqlen: expected an integer, got 'long'",
        ),
        (SUITE_OK + "options = { seqlenn = 3 }\n", r"options\.seqlenn: unknown option \(did you mean 'seqlen'\?\)"),
        (SUITE_OK.replace('name = "unit"', 'name = "../escape"'), r"name: expected letters, digits"),
        (SUITE_OK + "[calibration]\nsamples = 'many'\n", r"calibration\.samples: expected an integer"),
        ("targets = [0.9\n", r"not valid TOML"),
        (SUITE_OK.replace("targets = [0.9]", "targets = [{ bytes = 'lots' }]"), r"expected a size such as 40MB"),
    ],
)
def test_bad_suites_give_one_line_errors(tmp_path, text, expected):
    import re

    assert re.search(expected, suite_error(tmp_path, text))


def test_cli_bad_input_is_one_line_exit_2_no_traceback(tmp_path):
    bad = write_suite(tmp_path / "bad.toml", SUITE_OK.replace('"svd"', '"svdd"'))
    for args in (
        ["validate", str(bad)],
        ["run", str(bad)],
        ["run", str(tmp_path / "missing.toml")],
        ["run", str(bad), "--limit", "zero"],
    ):
        proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("harness: error:") or proc.stderr.startswith("harness run: error:")


def test_cli_plugins_lists_versions_and_registrations():
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "plugins"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    svd_line = next(line for line in proc.stdout.splitlines() if line.startswith("svd "))
    assert "0.1.0" in svd_line and "harness-svd" in svd_line and "methods: svd" in svd_line


def test_shipped_suites_validate():
    for suite in sorted((ROOT / "suites").glob("*.toml")):
        load_suite(suite)


def test_cli_reference_is_up_to_date():
    from harness.docs import cli_reference

    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), "run: python -m harness.docs > docs/cli.md"
