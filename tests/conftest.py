"""Test set-up: offline, only the built-in plugins, caches inside the checkout.

Tests never auto-load whatever third-party plugin happens to be installed:
HARNESS_LOAD_PLUGINS is set to the entry points declared under plugins/.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def builtin_entry_points() -> list[str]:
    names = []
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        names += list(data.get("project", {}).get("entry-points", {}).get("harness", {}))
    return names


os.environ["HARNESS_LOAD_PLUGINS"] = ",".join(builtin_entry_points())
os.environ.setdefault("HARNESS_CACHE", str(ROOT / ".cache" / "test-harness"))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """Each test starts with a freshly loaded plugin manager."""
    from harness.plugins import set_plugins

    set_plugins(None)
    yield
    set_plugins(None)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``) avoids
    OpenMP's spin-waiting on a shared, busy CPU; the module's tests run with it, the count restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded():
    """The embedded model (loaded once per session)."""
    from harness.models import load_model

    return load_model("embedded", "float32", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded) -> Path:
    """A tiny randomly initialised Llama (GQA) saved as a local model directory,
    with the embedded model's tokenizer: a fast model for runner tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(embedded.tokenizer),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return path


def write_suite(path: Path, text: str) -> Path:
    path.write_text(re.sub(r"^\s+", "", text, flags=re.M))
    return path
