"""Security: suites are data, remote code stays off unless asked for, weights load
from safetensors (pickles only with ``weights_only=True``), names cannot escape
the results directory, caches are keyed by content hashes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.suite import load_suite
from tests.conftest import ROOT, write_suite


class Captured(Exception):
    pass


@pytest.mark.parametrize("asked", [False, True])
def test_remote_code_only_when_the_suite_asks_and_weights_only_from_safetensors(tiny_model_dir, monkeypatch, asked):
    import transformers

    from harness.models import load_model

    calls = []

    def capture(kind):
        def from_pretrained(source, **kwargs):
            calls.append((kind, kwargs))
            if kind == "model":
                raise Captured
            return object()

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", capture("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture("model"))
    with pytest.raises(HarnessError, match="expected a causal LM with safetensors weights"):
        load_model(str(tiny_model_dir), trust_remote_code=asked)
    (_, tokenizer), (_, model) = calls
    assert tokenizer["trust_remote_code"] is asked and model["trust_remote_code"] is asked
    assert model["use_safetensors"] is True


def test_a_suite_leaves_remote_code_off_by_default(tmp_path):
    suite = load_suite(write_suite(tmp_path / "s.toml", 'name = "s"\n'))
    assert suite.trust_remote_code is False
    suite = load_suite(write_suite(tmp_path / "t.toml", 'name = "t"\ntrust_remote_code = true\n'))
    assert suite.trust_remote_code is True


def torch_load_calls() -> list[tuple[Path, int, bool]]:
    """Every torch.load call under harness/ and plugins/: (file, line, passes weights_only=True)."""
    found = []
    for path in [*ROOT.glob("harness/**/*.py"), *ROOT.glob("plugins/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                found.append((path.relative_to(ROOT), node.lineno, safe))
    return found


def test_torch_load_is_only_called_with_weights_only():
    calls = torch_load_calls()
    assert calls, "expected at least the calibration cache's torch.load"
    assert [c for c in calls if not c[2]] == []


def test_suites_are_read_with_tomllib_only():
    source = (ROOT / "harness" / "suite.py").read_text()
    assert "tomllib.loads" in source
    for forbidden in ("exec(", "eval(", "import_module", "runpy", "pickle"):
        assert forbidden not in source


@pytest.mark.parametrize("name", ["../escape", "/etc", "a/b", "..", ".hidden", "a\\b", "x" * 81, ""])
def test_suite_names_cannot_leave_the_results_directory(tmp_path, name):
    with pytest.raises(HarnessError, match=r"name: expected letters, digits"):
        load_suite(write_suite(tmp_path / "s.toml", f"name = {name!r}\n".replace("'", '"')))


@pytest.mark.parametrize("cell_id", ["../x", "/etc/passwd", "ab/cd", "", "ABC"])
def test_cell_ids_are_hashes_never_paths(tmp_path, cell_id):
    from harness.run.record import CellRecord
    from harness.store import ResultStore

    store = ResultStore(tmp_path / "s")
    with pytest.raises(ValueError, match="cell id: expected hexadecimal digits"):
        store.path(cell_id)
    with pytest.raises(ValueError):
        store.save(CellRecord(cell_id=cell_id, suite="s", status="ok", model={}))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cells", "s"]


def test_calibration_cache_is_keyed_by_content_hashes():
    from harness.api import LayerInfo
    from harness.run.calibration import cache_digest

    layers = [LayerInfo("model.layers.0.mlp.up_proj", "up_proj", 0, (8, 4))]
    key = {"model": "a" * 64, "calibration": {"data": "b" * 64, "samples": 4, "seqlen": 32}, "dtype": "float32"}
    same = cache_digest({**key}, layers)
    assert cache_digest(key, layers) == same and len(same) == 64
    other_data = {**key, "calibration": {**key["calibration"], "data": "c" * 64}}
    assert cache_digest(other_data, layers) != same
    assert cache_digest({**key, "model": "d" * 64}, layers) != same


def test_converted_gguf_models_are_cached_under_the_files_sha256(embedded):
    from harness.files import cache_dir
    from harness.models import embedded_gguf

    sha = embedded.fingerprint
    assert embedded.files == {embedded_gguf().name: sha} and len(sha) == 64
    assert (cache_dir() / "models" / sha[:16] / "model.safetensors").exists()
