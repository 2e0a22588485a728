"""``harness export``: a computed cell's compressed model, out of the harness (issue 19).

The cell is recomputed up to its surgery, not read from anywhere: the suite
is loaded, the model opened, the cell's method factorized and its allocator
run exactly as ``harness run`` does (same seeds, same code), and the ranks
must equal those its record holds, else the export is refused. Then:

- ``factored`` (default): ``model.safetensors`` holds every tensor of the
  compressed model, each decomposed Linear as its two factors ``<name>.A``
  (out x rank) and ``<name>.B`` (rank x in) (and its bias); beside it the
  original architecture's ``config.json``, the tokenizer, and
  ``harness_compressed.json``: the cell id, the model, each factored layer's
  shape, rank and whether it has a bias (``<name>.bias``: the Linear's own, or
  the output offset a ``LowRank(A, B, bias)`` brought, as LoRD's and SFSD's, on
  a Linear that had none), the parameter and module counts of the cell's record.
  ``harness.load_compressed(DIR)`` rebuilds it: the architecture from the
  config on the meta device, each listed Linear replaced by a
  ``harness.surgery.FactoredLinear`` of the listed shape and bias, the tensors loaded
  strictly; it checks the parameter count, the number of dense and factored
  modules and every factor's shape and bias against the manifest (a one-line error
  otherwise). Loading needs the harness (no ``trust_remote_code`` model
  class: transformers has no factored Linear of its own).
- ``dense``: the reconstructed weights (A B, or a plugin module's affine
  map) written into the original architecture as a plain checkpoint
  (``save_pretrained``) that ``AutoModelForCausalLM.from_pretrained`` loads
  anywhere; as large as the uncompressed model, by design.

A cell whose method fine-tunes its compressed model (``Decomposer.after_surgery``, e.g. svd-llm's
``update = "lora"``) is tuned again before it is written, and exported only where the tuning's summary
equals the record's (``retune``): its tuned factors, never the untuned ones.

Only ``LowRank`` replacements (with or without a bias) can be exported
``factored``; a method whose replacements are modules of its own (BitStack,
TRAWL, Basis Sharing) exports ``dense``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from harness.run.record import CellRecord
    from harness.suite import Suite

MANIFEST = "harness_compressed.json"
FORMAT = 1
FORMATS = ("factored", "dense")


@dataclass
class Exported:
    directory: Path
    format: str
    cell_id: str
    files: dict[str, int]
    """File name -> bytes."""


# ---------------------------------------------------------------- export
def find_record(results_dir: Path, cell: str) -> CellRecord:
    """The computed, compressed cell of ``results_dir`` whose id is ``cell`` or starts with it."""
    from harness.report.show import find_cell, load_cell

    record = load_cell(find_cell(cell, results_dir))
    if not record.ok or record.is_baseline:
        what = "the baseline" if record.is_baseline else "a failed cell"
        raise HarnessError(f"cell: expected a computed compressed cell, got {record.cell_id} ({what})")
    return record


def export_cell(suite: Suite, results_root: Path, cell: str, out: Path, fmt: str = "factored") -> Exported:
    """Recompute ``cell``'s compressed model from ``suite`` and write it to ``out`` in ``fmt``."""
    from harness.run.allocate import compress
    from harness.run.runner import RunOptions, SuiteRunner
    from harness.surgery import replaced

    if fmt not in FORMATS:
        raise HarnessError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    runner = SuiteRunner(suite, RunOptions(Path(results_root), progress=False))
    record = find_record(runner.store.root, cell)
    if record.model_id not in suite.models:
        raise HarnessError(f"cell: its model {record.model_id!r} is not among {suite.file}'s models")
    runner.options.model_key = f"{suite.file}: models[{suite.models.index(record.model_id)}]"
    session = runner.open_session(record.model_id)
    try:
        target = next((c for c in session.cells() if c.id == record.cell_id), None)
        if target is None:
            raise HarnessError(
                f"cell: {record.cell_id} is not a cell of {suite.file} as it stands now (its method, target, "
                "data or versions changed since it ran)"
            )
        session.use_draw(target.draw)  # the cell's own calibration draw
        prepared = session.prepared
        if prepared.propagated(target.method):
            factorizations, seconds = prepared.factorize_cell(target)
        else:
            factorizations, seconds = session.factorize(target.method)
        compressed = compress(session.env, prepared, target, factorizations, seconds)
        if compressed.ranks != record.ranks:
            moved = sorted(n for n in record.ranks if compressed.ranks.get(n) != record.ranks[n])
            raise HarnessError(
                f"cell {record.cell_id}: recomputed ranks differ from the record's at {len(moved)} layers "
                f"(first: {moved[:1]}); the export would not be the cell that was measured"
            )
        model, tokenizer = prepared.loaded.model, prepared.loaded.tokenizer
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        names = list(compressed.replacements)
        with replaced(model, compressed.replacements):
            retune(session.env, prepared, target, record, names)
            if fmt == "factored":
                write_factored(model, tokenizer, record, names, out)
            else:
                overrides = {name: affine_map(model.get_submodule(name)) for name in names}
        if fmt == "dense":  # the originals are back: their architecture, the reconstructed weights
            write_dense(model, tokenizer, overrides, out)
    finally:
        session.close()
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return Exported(out, fmt, record.cell_id, files)


def retune(env, prepared, cell, record: CellRecord, names: list[str]) -> None:
    """A cell whose method tunes after surgery (``Decomposer.after_surgery``) is tuned again, as its run did
    (same seed, windows and code), so that the export holds the tuned factors, never the untuned ones; its
    summary must equal the record's (seconds aside), else the export is refused."""
    from harness.run.tuning import after_surgery, tunes

    if not tunes(env, cell):
        return
    summary = after_surgery(env, prepared, cell, names) or {}
    again, recorded = comparable(summary), comparable(record.weight_optimization or {})
    if again != recorded:
        moved = sorted(k for k in {*again, *recorded} if again.get(k) != recorded.get(k))
        raise HarnessError(
            f"cell {record.cell_id}: its weight optimization after surgery, recomputed, differs from the record's "
            f"(at {', '.join(moved[:3])}); the export would not be the cell that was measured"
        )


def comparable(summary: dict) -> dict:
    """A weight-optimization summary as stored (JSON), without its ``seconds``."""
    return {k: v for k, v in json.loads(json.dumps(summary)).items() if k != "seconds"}


def write_factored(model: nn.Module, tokenizer, record: CellRecord, names: list[str], out: Path) -> None:
    from safetensors.torch import save_file

    from harness.surgery import FactoredLinear, count_model

    layers = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, FactoredLinear):
            raise HarnessError(
                f"--format factored: {name} is replaced by a {type(module).__name__}, not two factors; "
                "export this cell with --format dense"
            )
        layers[name] = {
            "out": module.out_features,
            "in": module.in_features,
            "rank": module.rank,
            "bias": module.bias is not None,
        }
    tensors = unique_tensors(model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "harness_cell": record.cell_id})
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params, _ = count_model(model)
    manifest = {
        "format": FORMAT,
        "cell_id": record.cell_id,
        "model": record.model_id,
        "fingerprint": record.model.get("fingerprint"),
        "method": record.method_label,
        "target": (record.target or {}).get("label"),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": layers,
        "model_params": params,
        "recorded_model_params": record.sizes.get("model_params"),
        "factored_modules": len(layers),
        "dense_linears": sum(1 for m in model.modules() if type(m).__name__ == "Linear"),
        "tied": sorted(tied_names(model)),
    }
    if params != manifest["recorded_model_params"]:
        raise HarnessError(
            f"cell {record.cell_id}: the compressed model has {params:,} parameters, its record "
            f"{manifest['recorded_model_params']:,}"
        )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_dense(model: nn.Module, tokenizer, overrides: dict[str, tuple], out: Path) -> None:
    """``save_pretrained`` of the original architecture with each replaced Linear's weight (and bias) the
    affine map of its replacement (``overrides``: name -> (W, b))."""
    full = dict(model.state_dict())
    for name, (weight, bias) in overrides.items():
        full[f"{name}.weight"] = weight.to(full[f"{name}.weight"].dtype)
        if f"{name}.bias" in full:
            full[f"{name}.bias"] = bias.to(full[f"{name}.bias"].dtype)
        elif bias.abs().max() > 0:
            raise HarnessError(
                f"--format dense: {name}'s replacement adds an output offset that its Linear has no bias "
                "for; the original architecture cannot hold it"
            )
    model.save_pretrained(out, state_dict=full, safe_serialization=True)
    tokenizer.save_pretrained(out)


def affine_map(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) with ``module(x) = x W^T + b`` for a replacement module (read off at 0 and the unit vectors)."""
    import torch

    from harness.surgery import FactoredLinear

    if isinstance(module, FactoredLinear):
        with torch.no_grad():
            weight = module.A @ module.B
        return weight, torch.zeros(weight.shape[0], dtype=weight.dtype) if module.bias is None else module.bias
    params = list(module.parameters())
    dtype, device = params[0].dtype, params[0].device
    n = module.in_features if hasattr(module, "in_features") else params[-1].shape[-1]
    with torch.no_grad():
        zero = module(torch.zeros(1, n, dtype=dtype, device=device))[0]
        eye = module(torch.eye(n, dtype=dtype, device=device)) - zero
    return eye.T.contiguous(), zero


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by name, a tied tensor once (under its first name)."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names whose tensor another name holds too (e.g. a head tied to the embeddings)."""
    first: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in first and tensor.numel():
            tied.add(name)
        first.setdefault(key, name)
    return tied


# ---------------------------------------------------------------- load
def load_compressed(directory: str | Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """A model exported ``factored`` (and its tokenizer), checked against its manifest."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.surgery import FactoredLinear, _parent, count_model

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{manifest_path}: expected a harness export manifest, got {exc}") from None
    if manifest.get("format") != FORMAT:
        raise HarnessError(f"{manifest_path}: format: expected {FORMAT}, got {manifest.get('format')!r}")
    config = AutoConfig.from_pretrained(directory)
    dtype = getattr(torch, manifest["dtype"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, shape in manifest["layers"].items():
        parent, child = _parent(model, name)
        original = getattr(parent, child)
        A = torch.empty(shape["out"], shape["rank"], dtype=dtype, device="meta")
        B = torch.empty(shape["rank"], shape["in"], dtype=dtype, device="meta")
        has_bias = shape.get("bias", original.bias is not None)  # exports before the key: the Linear's own
        bias = torch.empty(shape["out"], dtype=dtype, device="meta") if has_bias else None
        setattr(parent, child, FactoredLinear(A, B, bias))
    tensors = load_file(str(directory / "model.safetensors"))
    for name in manifest.get("tied", []):
        tensors.pop(name, None)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another shape than the manifest says
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise HarnessError(f"{directory}: tensors do not match the manifest: {detail}") from None
    model.tie_weights()
    missing = [m for m in missing if m not in manifest.get("tied", [])]
    if unexpected or any(model.get_parameter(m).device.type == "meta" for m in missing if "." in m):
        raise HarnessError(
            f"{directory}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    check_loaded(model, manifest, directory, count_model)
    model.eval().requires_grad_(False).to(device)
    return model, AutoTokenizer.from_pretrained(directory)


def check_loaded(model: nn.Module, manifest: dict, directory: Path, count_model) -> None:
    """The strict check: parameters, dense and factored module counts, every factor's shape."""
    from harness.surgery import FactoredLinear

    params, _ = count_model(model)
    factored = {n: m for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
    dense = sum(1 for m in model.modules() if type(m).__name__ == "Linear")
    problems = []
    if params != manifest["model_params"]:
        problems.append(f"{params:,} parameters, manifest {manifest['model_params']:,}")
    if len(factored) != manifest["factored_modules"] or dense != manifest["dense_linears"]:
        problems.append(
            f"{len(factored)} factored and {dense} dense Linears, manifest "
            f"{manifest['factored_modules']} and {manifest['dense_linears']}"
        )
    for name, shape in manifest["layers"].items():
        module = factored.get(name)
        want = ((shape["out"], shape["rank"]), (shape["rank"], shape["in"]))
        if module is None or (tuple(module.A.shape), tuple(module.B.shape)) != want:
            problems.append(f"{name}: factors {None if module is None else tuple(module.A.shape)} expected {want}")
            break
        if "bias" in shape and (module.bias is not None) != shape["bias"]:
            problems.append(f"{name}: bias {module.bias is not None}, manifest {shape['bias']}")
            break
    if problems:
        raise HarnessError(f"{directory}: not the exported cell {manifest.get('cell_id')}: {problems[0]}")
