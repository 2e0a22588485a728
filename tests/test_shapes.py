"""Shape-only random models (random:<shape>), --layers, and dtype "auto"."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.shapes import known_shapes, parse_random_spec, shape_config
from tests.conftest import ROOT, write_suite

# numbers copied from the models' public config.json files (not from harness/shapes)
PUBLISHED = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=40),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        num_hidden_layers=80, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_key_value_heads=8, sliding_window=4096),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       num_hidden_layers=28, vocab_size=152064, rope_theta=1000000.0),
}  # fmt: skip


def test_the_shapes_have_the_published_sizes():
    assert set(PUBLISHED) | {"tiny-llama"} == set(known_shapes())
    for name, sizes in PUBLISHED.items():
        config = shape_config(name)
        assert {key: config[key] for key in sizes} == sizes, name


def test_the_shape_files_ship_with_the_package():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "harness.shapes" in setuptools["packages"]
    assert "*.json" in setuptools["package-data"]["harness.shapes"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("random:llama-2-7", "unknown shape 'llama-2-7' in 'random:llama-2-7' (did you mean 'llama-2-7b'?); known"),
        ("random:llama-2-7b?layers=0", "layers: expected 1 to 32 (the blocks of shape 'llama-2-7b'), got 0"),
        ("random:llama-2-7b?layers=33", "layers: expected 1 to 32 (the blocks of shape 'llama-2-7b'), got 33"),
        ("random:llama-2-7b?layer=2", "got 'layer=2' (did you mean 'layers'?)"),
        ("random:llama-2-7b?layers=two", "expected layers=<non-negative integer>"),
        ("random:llama-2-7b?scale=0", "scale: expected a positive integer (the widths' divisor), got 0"),
        ("random:llama-2-7b?scale=3", "expected a divisor of every width of shape 'llama-2-7b', got 3 (hidden_size"),
        ("random:llama-2-70b?scale=16", "got 16 (num_key_value_heads = 8)"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, expected):
    with pytest.raises(HarnessError) as info:
        parse_random_spec(spec)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if "unknown shape" in message:
        assert message.endswith(", ".join(known_shapes()))


def test_specs_parse_and_canonicalize():
    spec = parse_random_spec("random:llama-2-7b?seed=3&layers=2")
    assert (spec.shape, spec.layers, spec.seed, spec.full_layers) == ("llama-2-7b", 2, 3, 32)
    assert spec.canonical == "random:llama-2-7b?layers=2&seed=3"
    assert parse_random_spec("random:llama-2-7b?layers=32").canonical == "random:llama-2-7b"
    assert parse_random_spec("random:llama-2-7b?layers=2", layers=5).layers == 5  # --layers wins


def test_scale_divides_the_widths_and_keeps_heads_128_wide():
    spec = parse_random_spec("random:llama-2-7b?layers=2&scale=4&seed=1")
    assert spec.canonical == "random:llama-2-7b?layers=2&scale=4&seed=1"
    assert parse_random_spec("random:llama-2-7b?scale=1").canonical == "random:llama-2-7b"
    config = spec.config()
    full = shape_config("llama-2-7b")
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")} == {
        "hidden_size": 1024,
        "intermediate_size": 2752,
        "num_attention_heads": 8,
    }
    assert config["num_key_value_heads"] == 8 and config["hidden_size"] // config["num_attention_heads"] == 128
    assert (config["vocab_size"], config["num_hidden_layers"]) == (full["vocab_size"], 2)
    assert parse_random_spec("random:llama-2-7b?scale=4", layers=3).canonical == "random:llama-2-7b?layers=3&scale=4"


def test_a_scaled_model_has_the_divided_shapes():
    from harness.models import load_model

    loaded = load_model("random:tiny-llama?scale=2", "float32", "cpu")
    block = loaded.model.model.layers[0]
    assert block.self_attn.q_proj.weight.shape == (32, 32)  # 2 heads of 16 (tiny-llama: 4 of 16)
    assert block.self_attn.k_proj.weight.shape == (16, 32)  # 1 key/value head of 16
    assert block.mlp.down_proj.weight.shape == (32, 88)
    assert loaded.model.lm_head.weight.shape == (4096, 32)
    assert loaded.model_id == "random:tiny-llama?scale=2"
    assert loaded.model(loaded.tokenizer("a b c", return_tensors="pt")["input_ids"]).logits.shape[-1] == 4096


def test_fingerprints_differ_between_shapes_layers_seeds_and_dtypes():
    prints = {
        parse_random_spec(spec).fingerprint(dtype)
        for spec in (
            "random:llama-2-7b",
            "random:mistral-7b",
            "random:llama-2-7b?layers=2",
            "random:llama-2-7b?seed=1",
            "random:llama-2-7b?scale=2",
        )
        for dtype in ("float32", "bfloat16")
    }
    assert len(prints) == 10
    assert parse_random_spec("random:llama-2-7b").fingerprint("float32") == parse_random_spec(
        "random:llama-2-7b?layers=32"
    ).fingerprint("float32")


# ---------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def tiny():
    from harness.models import load_model

    return load_model("random:tiny-llama", "float32", "cpu")


def test_same_seed_same_weights_other_seed_other_weights(tiny):
    import torch

    from harness.models import load_model

    again = load_model("random:tiny-llama", "float32", "cpu")
    other = load_model("random:tiny-llama?seed=1", "float32", "cpu")
    first, second, third = (dict(m.model.named_parameters()) for m in (tiny, again, other))
    assert all(torch.equal(first[name], second[name]) for name in first)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[q], third[q])
    assert tiny.fingerprint == again.fingerprint != other.fingerprint
    assert "shape-only random model" in tiny.note


def test_random_weights_have_the_stated_distribution(tiny):
    params = dict(tiny.model.named_parameters())
    weight = params["model.layers.0.mlp.gate_proj.weight"]
    assert weight.shape == (176, 64)
    assert abs(weight.mean().item()) < 0.002 and abs(weight.std().item() - 0.02) < 0.001
    assert (params["model.layers.0.input_layernorm.weight"] == 1).all()
    # the buffers are real (rotary frequencies: theta ** (-2i / head_dim), head_dim 16)
    inv_freq = tiny.model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and abs(inv_freq[1].item() - 10000 ** (-2 / 16)) < 1e-6


def test_the_tokenizer_maps_ids_into_the_shape_vocabulary(tiny):
    import torch
    from transformers import PreTrainedTokenizerBase

    from harness.models import embedded_tokenizer

    text = "The quick brown fox jumps over the lazy dog"
    plain = embedded_tokenizer()
    ids = tiny.tokenizer(text, return_tensors="pt")["input_ids"]
    raw = plain(text, return_tensors="pt")["input_ids"]
    assert raw.max() >= 4096  # the embedded vocabulary (49152) is larger: ids wrap
    assert torch.equal(ids, raw % 4096)
    assert tiny.tokenizer(text)["input_ids"] == [i % 4096 for i in plain(text)["input_ids"]]
    assert tiny.tokenizer.encode(text) == [i % 4096 for i in plain.encode(text)]
    assert tiny.tokenizer.eos_token_id == plain.eos_token_id % 4096 and len(tiny.tokenizer) == 4096
    assert isinstance(tiny.tokenizer, PreTrainedTokenizerBase)  # lm-eval's HFLM asserts a transformers tokenizer
    assert tiny.model(ids).logits.shape == (1, ids.shape[1], 4096)


def test_layers_cut_the_depth_and_keep_the_width():
    """random:llama-2-7b?layers=2 on the meta device: shapes only, no weights allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = parse_random_spec("random:llama-2-7b", layers=2).config()
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    assert len(model.model.layers) == 2
    block = model.model.layers[1]
    assert block.self_attn.q_proj.weight.shape == (4096, 4096)
    assert block.mlp.down_proj.weight.shape == (4096, 11008)
    assert model.lm_head.weight.shape == (32000, 4096)


def test_a_cut_model_keeps_the_first_blocks_of_the_full_one():
    import torch

    from harness.models import load_model

    full = dict(load_model("random:tiny-llama", "float32", "cpu").model.named_parameters())
    cut = load_model("random:tiny-llama", "float32", "cpu", layers=1)
    assert len(cut.model.model.layers) == 1 and cut.model_id == "random:tiny-llama?layers=1"
    assert all(torch.equal(value, full[name]) for name, value in cut.model.named_parameters())


def test_bfloat16_weights_are_the_float32_draw_rounded():
    import torch

    from harness.models import load_model

    f32 = load_model("random:tiny-llama?layers=1", "float32", "cpu").model.model.layers[0].mlp.up_proj.weight
    bf16 = load_model("random:tiny-llama?layers=1", "bfloat16", "cpu").model.model.layers[0].mlp.up_proj.weight
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, f32.to(torch.bfloat16))


def test_layers_on_a_checkpoint_is_an_error():
    from harness.models import load_model

    with pytest.raises(HarnessError, match="applies to random:<shape> models only"):
        load_model("embedded", "float32", "cpu", layers=2)


# ---------------------------------------------------------------- dtype auto
def test_dtype_auto_resolves_by_device(tmp_path):
    import torch

    from harness.models import resolve_dtype
    from harness.suite import load_suite

    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"
    assert resolve_dtype("float16", "cuda") == "float16"
    auto = load_suite(write_suite(tmp_path / "a.toml", 'device = "cpu"\nmodels = ["random:tiny-llama"]'))
    assert (auto.dtype_setting, auto.dtype, auto.to_dict()["dtype"]) == ("auto", "float32", "float32")
    from dataclasses import replace

    assert replace(auto, device="cuda:1").dtype == "bfloat16"
    assert replace(auto, device="auto").dtype == ("bfloat16" if torch.cuda.is_available() else "float32")
    with pytest.raises(HarnessError, match="dtype: expected one of 'auto', 'float32'"):
        load_suite(write_suite(tmp_path / "b.toml", 'dtype = "fp8"'))
    with pytest.raises(HarnessError, match="device_map: expected 'auto'"):
        load_suite(write_suite(tmp_path / "c.toml", 'device_map = "balanced"'))
    assert load_suite(write_suite(tmp_path / "d.toml", 'device_map = "auto"')).device_map == "auto"


def smoke_cell_ids(text: str) -> list[str]:
    import torch

    from harness.models import LoadedModel
    from harness.plugins import get_plugins
    from harness.run.env import RunEnv, RunOptions
    from harness.run.identity import model_cells
    from harness.suite import load_suite

    folder = Path(tempfile.mkdtemp())
    suite = load_suite(write_suite(folder / "smoke.toml", text))
    env = RunEnv(suite, RunOptions(), get_plugins(), None, torch.device("cpu"))
    return [c.id for c in model_cells(env, LoadedModel(None, None, "embedded", "0" * 64, {}, ""))]


def test_dtype_auto_leaves_the_smoke_cell_ids_unchanged_on_cpu():
    text = (ROOT / "suites" / "smoke.toml").read_text()
    assert 'dtype = "float32"' in text
    auto = text.replace('dtype = "float32"\n', "")
    assert smoke_cell_ids(auto) == smoke_cell_ids(text)
    assert smoke_cell_ids(text.replace('dtype = "float32"', 'dtype = "bfloat16"')) != smoke_cell_ids(text)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_random_model_on_cuda_is_bfloat16_by_default():
    from harness.models import load_model

    loaded = load_model("random:tiny-llama", "auto", "cuda")
    weight = loaded.model.model.layers[0].mlp.up_proj.weight
    assert str(weight.dtype) == "torch.bfloat16" and weight.device.type == "cuda"


# ---------------------------------------------------------------- through the CLI
def test_validate_checks_random_specs_and_layers(tmp_path, capsys):
    from harness.cli import main

    good = write_suite(tmp_path / "good.toml", 'models = ["random:llama-2-7b?layers=2"]')
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), "--layers", "33"]) == 2
    assert "--layers: layers: expected 1 to 32" in capsys.readouterr().err
    bad = write_suite(tmp_path / "bad.toml", 'models = ["random:lama-2-7b"]')
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "models[0]: unknown shape 'lama-2-7b'" in err and "did you mean 'llama-2-7b'" in err
    assert len(err.strip().splitlines()) == 1
    embedded = write_suite(tmp_path / "embedded.toml", 'models = ["embedded"]')
    assert main(["validate", str(embedded), "--layers", "2"]) == 2
    assert "--layers: applies to random:<shape> models only, got 'embedded'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["validate", str(good), "--layers", "0"])
    assert info.value.code == 2


def test_random_tiny_llama_runs_end_to_end(tmp_path, capsys):
    from harness.cli import main

    suite = write_suite(
        tmp_path / "shapes.toml",
        """
        name = "shapes"
        device = "cpu"
        models = ["random:tiny-llama"]
        targets = [0.8]
        [[methods]]
        name = "svd"
        [[evaluators]]
        name = "perplexity"
        options = { source = "wiki-passages", seqlen = 64, max_windows = 1 }
        """,
    )
    args = ["run", str(suite), "--results", str(tmp_path / "results"), "--no-progress", "--layers", "1"]
    assert main(args) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "shapes").rglob("*.json")]
    cells = [r for r in records if "cell_id" in r]
    assert len(cells) == 2 and all(r["status"] == "ok" for r in cells)
    for record in cells:
        assert record["model"]["id"] == "random:tiny-llama?layers=1"
        assert record["model"]["dtype"] == "float32"
        assert "shape-only random model" in record["model"]["note"]
        perplexity = next(v for k, v in record["metrics"].items() if "perplexity" in k)
        assert 1 < perplexity < 10 * 4096  # a random model: about the vocabulary size, finite
    baseline = next(r for r in cells if r["method"] is None)
    compressed = next(r for r in cells if r["method"] is not None)
    assert compressed["sizes"]["model_params"] < baseline["sizes"]["model_params"]


def test_device_map_is_ignored_on_cpu(tiny_model_dir):
    import torch

    from harness.models import load_model

    placed = load_model(str(tiny_model_dir), "auto", "cpu", device_map="auto")
    plain = load_model(str(tiny_model_dir), "float32", "cpu")
    assert getattr(placed.model, "hf_device_map", None) is None
    assert placed.fingerprint == plain.fingerprint
    ours, theirs = placed.model.state_dict(), plain.model.state_dict()
    assert all(value.dtype == torch.float32 and torch.equal(value, theirs[name]) for name, value in ours.items())
    with pytest.raises(HarnessError, match="device_map: expected 'auto'"):
        load_model(str(tiny_model_dir), "float32", "cpu", device_map="balanced")


def test_validate_with_random_models_imports_no_torch(tmp_path):
    import subprocess
    import sys

    suite = write_suite(tmp_path / "r.toml", 'models = ["random:llama-2-70b", "random:qwen2.5-7b?seed=2"]')
    code = (
        "import sys; from harness.cli import main; "
        f"code = main(['validate', {str(suite)!r}, '--layers', '2']); print(code, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "2 model(s)" in proc.stdout and proc.stdout.split()[-2:] == ["0", "False"], proc.stderr
