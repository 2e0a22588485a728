"""The planner's view of a model, from its config alone: its decomposable Linears
(Llama-family decoders laid out from the config; any other ``model_type`` built on
the meta device) and its parameter counts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import LayerInfo
from harness.errors import HarnessError

if TYPE_CHECKING:
    pass

GiB = 2**30
FLOAT64 = 8
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})
EMBEDDED_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
"""SmolLM2-135M's sizes (the embedded model), used until its conversion's config.json is cached."""


# ---------------------------------------------------------------- the model, from its config
def model_config(spec: str, layers: int | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's config as a dict (no weights read; see the module docstring for each kind of spec)."""
    from harness import shapes

    if shapes.is_random(spec):
        return shapes.parse_random_spec(spec, layers).config()
    if layers is not None:
        raise HarnessError(f"model: layers: applies to random:<shape> models only, got {spec!r}")
    if spec == "embedded":
        return _embedded_config()
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    source = str(path) if path.exists() else spec
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing or unreadable config: the input's
        from harness.errors import first_line

        raise HarnessError(f"plan: expected a model with a config.json, got {spec!r}: {first_line(exc, 300)}") from None
    return config.to_dict()


def _embedded_config() -> dict[str, Any]:
    from harness.files import cache_dir

    for candidate in sorted((cache_dir() / "models").glob("*/config.json")):
        try:
            config = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if config.get("hidden_size") == EMBEDDED_CONFIG["hidden_size"]:
            return config
    return dict(EMBEDDED_CONFIG)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def head_dim(config: dict[str, Any]) -> int:
    """``head_dim`` where the config sets it, else hidden_size / num_attention_heads."""
    c = text_config(config)
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def linear_layers(config: dict[str, Any], kinds: Sequence[str] | None = None, lm_head: bool = False) -> list[LayerInfo]:
    """The decomposable Linears (``harness.surgery.find_linears``'s list) from the config.

    Llama family, per block i (``model.layers.i``): q (H·d, h), k and v (Hkv·d, h), o (h, H·d),
    gate and up (I, h), down (h, I); h hidden, I intermediate, H heads, Hkv key/value heads, d head_dim;
    ``lm_head`` (V, h) last where asked. Other decoders: built on the meta device.
    """
    c = text_config(config)
    if c.get("model_type") not in LLAMA_FAMILY:
        return _meta_linears(config, kinds, lm_head)
    h, inter, d = int(c["hidden_size"]), int(c["intermediate_size"]), head_dim(c)
    q, kv = int(c["num_attention_heads"]) * d, int(c.get("num_key_value_heads") or c["num_attention_heads"]) * d
    block = [
        ("self_attn.q_proj", (q, h)),
        ("self_attn.k_proj", (kv, h)),
        ("self_attn.v_proj", (kv, h)),
        ("self_attn.o_proj", (h, q)),
        ("mlp.gate_proj", (inter, h)),
        ("mlp.up_proj", (inter, h)),
        ("mlp.down_proj", (h, inter)),
    ]
    layers = []
    for i in range(int(c["num_hidden_layers"])):
        for suffix, shape in block:
            kind = suffix.rsplit(".", 1)[-1]
            if kinds is None or kind in kinds:
                layers.append(LayerInfo(f"model.layers.{i}.{suffix}", kind, i, shape))
    if lm_head:
        layers.append(LayerInfo("lm_head", "lm_head", None, (int(c["vocab_size"]), h)))
    return layers


def _meta_linears(config: dict[str, Any], kinds, lm_head: bool) -> list[LayerInfo]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.surgery import find_linears

    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    built = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(built)
    return find_linears(model, kinds, lm_head)


def param_count(config: dict[str, Any]) -> int:
    """Parameters of the whole model: embeddings V·h, per block its Linears (+ q/k/v biases for qwen2)
    and two norms (2h), the final norm h, and the LM head V·h unless tied to the embeddings."""
    c = text_config(config)
    h, vocab = int(c["hidden_size"]), int(c["vocab_size"])
    total = vocab * h + h + (0 if c.get("tie_word_embeddings") else vocab * h)
    return total + int(c["num_hidden_layers"]) * block_params(c)


def block_params(config: dict[str, Any]) -> int:
    """Parameters of one decoder block (its seven Linears, qwen2's q/k/v biases, two norms)."""
    c = dict(text_config(config), num_hidden_layers=1)
    linears = linear_layers(c)
    total = sum(m * n for _, _, _, (m, n) in (_fields(x) for x in linears)) + 2 * int(c["hidden_size"])
    if c.get("model_type") == "qwen2" or c.get("attention_bias"):
        total += sum(x.shape[0] for x in linears if x.kind in ("q_proj", "k_proj", "v_proj"))
    return total


def _fields(layer: LayerInfo) -> tuple:
    return layer.name, layer.kind, layer.index, layer.shape
