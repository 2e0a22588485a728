"""``harness validate`` refuses what is wrong: declared option bounds, finite numbers, and names only
the model can confirm (checked from its config, before any weights load).

The corpus under tests/bad_suites/ holds one suite per check, each valid but for one defect; its first
line is ``# expect: <regex>`` for the one error line. Every file goes through ``load_suite`` plus the
model check (in-process) and through ``harness validate`` (one subprocess): exit 2, one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.modelcheck import check_model_names, config_layers, layers_before_load, validate_models
from harness.options import BOUNDS, option_fields, parse_options
from harness.plan.layout import model_config
from harness.plugins import get_plugins
from harness.suite import CalibrationConfig, load_suite
from tests.conftest import ROOT

CORPUS = sorted((ROOT / "tests" / "bad_suites").glob("*.toml"))


def expected(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_each_bad_suite_is_refused_in_one_line(path):
    with pytest.raises(HarnessError) as err:
        validate_models(load_suite(path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert re.search(expected(path), message), message


def test_the_corpus_covers_each_new_check():
    assert len(CORPUS) >= 20
    assert sum(p.stem.startswith("model-") for p in CORPUS) >= 5


def test_validate_on_the_command_line_exits_2_with_one_line(tmp_path):
    driver = (
        "import contextlib, io, json, sys\n"
        "from harness.cli import main\n"
        "from harness.plugins import set_plugins\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    set_plugins(None); err = io.StringIO()\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
        "        code = main(['validate', path])\n"
        "    out[path] = [code, err.getvalue()]\n"
        "print(json.dumps(out)); print('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", driver, *map(str, CORPUS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes, torch_loaded = proc.stdout.splitlines()
    for path, (code, stderr) in json.loads(outcomes).items():
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, (path, code, stderr)
        assert re.search(expected(Path(path)), lines[0]), lines[0]
    assert torch_loaded == "False"  # random: and embedded configs are read without torch


# ---------------------------------------------------------------- the class, not the examples
def numeric(annotation) -> bool:
    """Does ``annotation`` take a number (int or float, alone, in a union or in a list)?"""
    if annotation in (int, float):
        return True
    return any(numeric(a) for a in typing.get_args(annotation))


def declared_options() -> list[tuple[str, type]]:
    plugins = get_plugins()
    found = [("calibration", CalibrationConfig)]
    for kind, table in plugins.registry.items():
        for name, entry in table.items():
            cls = getattr(entry.component, "Options", None)
            if cls is not None and dataclasses.is_dataclass(cls):
                found.append((f"{kind} {name}", cls))
    return found


def test_every_numeric_option_of_a_builtin_plugin_declares_its_bounds():
    """A number option without a declared bound is how ``limit = -1`` got through: none is left."""
    unbounded = [
        f"{where}: {f.name}"
        for where, cls in declared_options()
        for f in dataclasses.fields(cls)
        if numeric(option_fields(cls)[f.name])
        and not any(b in f.metadata for b in BOUNDS)
        and f.metadata.get("model") != "layers"  # layer indices: bounded by the model (modelcheck)
    ]
    assert not unbounded, unbounded


def test_declared_bounds_are_checked_by_the_core_for_any_plugin():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        count: int = dataclasses.field(default=1, metadata={"minimum": 1, "maximum": 4})
        share: float = dataclasses.field(default=0.5, metadata={"exclusive_minimum": 0, "exclusive_maximum": 1})
        mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
        sizes: list[int] = dataclasses.field(default_factory=lambda: [1], metadata={"minimum": 1, "min_items": 1})

    assert parse_options(Opts, {"count": 4, "share": 0.25, "mode": "b", "sizes": [2, 3]}, "x").count == 4
    for raw, message in [
        ({"count": 5}, "f.toml: x.count: expected an integer, at least 1 and at most 4, got 5"),
        ({"share": 1}, "f.toml: x.share: expected a number, above 0 and below 1, got 1.0"),
        ({"mode": "c"}, "f.toml: x.mode: expected a string, one of 'a', 'b', got 'c'"),
        ({"sizes": [1, 0]}, "f.toml: x.sizes: expected a list of an integer, each at least 1, got [1, 0]"),
        ({"sizes": []}, "f.toml: x.sizes: expected at least 1 entry, got an empty list"),
        ({"share": float("nan")}, "f.toml: x.share: expected a number (nan and inf are refused), got nan"),
    ]:
        with pytest.raises(HarnessError) as err:
            parse_options(Opts, raw, "x", "f.toml")
        assert str(err.value) == message


def test_a_suite_within_the_bounds_is_unchanged():
    """Declaring bounds changes no accepted suite: every suite under suites/ still validates."""
    for path in sorted((ROOT / "suites").glob("*.toml")):
        validate_models(load_suite(path))


# ---------------------------------------------------------------- model names, before the weights
def test_the_config_layers_match_the_loaded_model(tiny_model_dir):
    """The layers the check uses (from config.json alone) are the ones surgery finds in the loaded model."""
    from harness.models import load_model
    from harness.surgery import find_linears

    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    loaded = load_model(str(tiny_model_dir), "float32", "cpu", False)
    assert config_layers(config, False) == find_linears(loaded.model, None, False)


def test_run_refuses_a_bad_layer_kind_before_any_weights_load(tmp_path, monkeypatch, capsys):
    import harness.run.session as session
    from harness.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the model's names were checked")

    monkeypatch.setattr(session, "load_model", no_load)
    suite = tmp_path / "s.toml"
    suite.write_text(
        'models = ["random:tiny-llama"]\ndevice = "cpu"\ntargets = [0.5]\n'
        'surgery = { kinds = ["q_proj", "up_prj"] }\n[[methods]]\nname = "svd"\n'
    )
    code = main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "surgery.kinds[1]" in err[0] and "did you mean 'up_proj'" in err[0], err


def test_layers_before_load_skips_what_it_cannot_read(tmp_path):
    suite = load_suite(ROOT / "suites" / "smoke.toml")
    assert layers_before_load(suite, str(tmp_path / "nothing-here")) is None
    assert layers_before_load(suite, str(tmp_path / "model.gguf")) is None
    layers = layers_before_load(suite, "random:tiny-llama")
    assert layers == config_layers(model_config("random:tiny-llama"), False)
    check_model_names(suite, layers, "random:tiny-llama")


def test_validate_notes_a_hub_id_it_cannot_check_offline(tmp_path, capsys):
    from harness.cli import main

    suite = tmp_path / "s.toml"
    suite.write_text(
        'models = ["random:tiny-llama", "nobody/not-cached-model"]\ntargets = [0.5]\n'
        'surgery = { kinds = ["q_proj"] }\n[[methods]]\nname = "svd"\n'
    )
    assert main(["validate", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "note: models[1] 'nobody/not-cached-model': names only the model can confirm were not checked" in out
