"""Names in a suite that only the model can confirm, checked as soon as its config is known.

A ``surgery.kinds`` entry must be a kind of the model's decomposable Linears; a
plugin option declared with ``metadata={"model": "kinds"}`` (Basis Sharing's
``share``, TRAWL's ``kinds``) must name kinds the suite decomposes, one with
``metadata={"model": "layers"}`` (TRAWL's ``layers``) indices within the model's
blocks. The layers come from the config alone (``harness.plan.layout``: no
weights read, no torch for Llama-family decoders), so a typo fails in a second
rather than after the model has loaded; ``harness validate`` runs the same check
where the config is available offline (``offline_layers``). Errors are one
HarnessError line naming the file, the key, what exists and a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.api import LayerInfo
from harness.errors import HarnessError, did_you_mean
from harness.options import MODEL_NAMES, shown

if TYPE_CHECKING:
    from harness.suite import Suite


def check_model_names(suite: Suite, layers: Sequence[LayerInfo], model: str) -> None:
    """HarnessError where ``suite`` names a layer kind or index that ``model`` (whose decomposable
    Linears, before ``surgery.kinds`` filters them, are ``layers``) does not have."""
    block = [layer for layer in layers if layer.index is not None]
    if not block:
        return  # no transformer-block Linears at all: the run's own error says so
    present = list(dict.fromkeys(layer.kind for layer in block))
    n_blocks = max(layer.index for layer in block) + 1
    for i, kind in enumerate(suite.surgery.kinds or ()):
        if kind not in present:
            head = " (the output head is surgery.lm_head = true)" if kind in ("lm_head", "embed_out", "output") else ""
            raise HarnessError(
                f"{suite.file}: surgery.kinds[{i}]: expected a layer kind of {model} ({', '.join(present)}), "
                f"got {shown(kind)}{did_you_mean(kind, present)}{head}"
            )
    selected = [kind for kind in present if suite.surgery.kinds is None or kind in suite.surgery.kinds]
    for key, options in _declared(suite):
        for f in dataclasses.fields(options):
            what, value = f.metadata.get(MODEL_NAMES), getattr(options, f.name)
            if what == "kinds":
                _check_kinds(value, selected, model, f"{suite.file}: {key}.{f.name}")
            elif what == "layers":
                _check_indices(value, n_blocks, model, f"{suite.file}: {key}.{f.name}")


def _declared(suite: Suite) -> Iterator[tuple[str, Any]]:
    """(key, options) of every component of ``suite`` whose options are a dataclass."""
    seen: set[int] = set()
    for i, method in enumerate(suite.methods):
        yield f"methods[{i}].options", method.options
        for allocator in method.allocators:
            if id(allocator) not in seen:
                seen.add(id(allocator))
                yield f"allocator {allocator.label!r} options", allocator.options
    for plural in ("evaluators", "profilers", "trackers"):
        for i, component in enumerate(getattr(suite, plural)):
            yield f"{plural}[{i}].options", component.options


def _check_kinds(value: Any, selected: Sequence[str], model: str, key: str) -> None:
    for kind in value or ():
        if kind not in selected:
            raise HarnessError(
                f"{key}: expected kinds of the layers this suite decomposes in {model} ({', '.join(selected)}), "
                f"got {shown(kind)}{did_you_mean(kind, selected)}"
            )


def _check_indices(value: Any, n_blocks: int, model: str, key: str) -> None:
    if not isinstance(value, (list, tuple)):
        return  # "all", "first:N", "last:N": any N is clipped to the model's blocks
    for index in value:
        if not -n_blocks <= index < n_blocks:
            raise HarnessError(
                f"{key}: expected layer indices from {-n_blocks} to {n_blocks - 1} ({model} has {n_blocks} "
                f"blocks), got {shown(index)}"
            )


# ---------------------------------------------------------------- the layers, from the config
def config_layers(config: dict[str, Any], lm_head: bool) -> list[LayerInfo]:
    """The decomposable Linears of a model with ``config`` (every kind: ``surgery.kinds`` is checked
    against them, so they are not filtered by it)."""
    from harness.plan.layout import linear_layers

    return linear_layers(config, None, lm_head)


def layers_before_load(suite: Suite, model: str) -> list[LayerInfo] | None:
    """The layers of ``model`` from its config, fetched as the run would (a hub id's config.json may be
    downloaded); None where no config can be had or read (the load then says what is wrong)."""
    from harness.plan.layout import model_config

    try:
        config = model_config(model, trust_remote_code=suite.trust_remote_code) if not _is_gguf(model) else None
        return None if config is None else config_layers(config, suite.surgery.lm_head)
    except Exception:  # (an unreadable config is the load's error to report, with its own key)
        return None


def offline_layers(suite: Suite, model: str) -> tuple[list[LayerInfo] | None, str]:
    """The layers of ``model`` from a config readable without the network, else (None, why not).

    ``random:<shape>`` and ``embedded`` always; a local directory's config.json; a hub id whose
    config.json is in the Hugging Face cache. A ``.gguf`` file or an uncached hub id is skipped.
    """
    from harness import shapes
    from harness.plan.layout import model_config

    try:
        if shapes.is_random(model) or model == "embedded":
            return config_layers(model_config(model), suite.surgery.lm_head), ""
        if _is_gguf(model):
            return None, "a .gguf file (its layers are checked when the run reads it)"
        path = Path(model).expanduser()
        file = path / "config.json" if path.exists() else _cached_config(model)
        if file is None or not file.is_file():
            return None, "a hub id whose config is not cached here (checked when the run fetches it)"
        return config_layers(json.loads(file.read_text(encoding="utf-8")), suite.surgery.lm_head), ""
    except Exception as exc:  # (a config that cannot be read is reported by the run, not here)
        return None, f"its config could not be read ({type(exc).__name__})"


def _is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf")


def _cached_config(model: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # (a name the hub would refuse: not cached)
        return None
    return Path(found) if isinstance(found, str) else None


def validate_models(suite: Suite) -> list[str]:
    """``harness validate``'s check of every model whose config is available offline (HarnessError on
    the first bad name); a note for each model it could not check, saying why."""
    notes = []
    for i, model in enumerate(suite.models):
        layers, why = offline_layers(suite, model)
        if layers is None:
            notes.append(f"models[{i}] {model!r}: names only the model can confirm were not checked: {why}")
        else:
            check_model_names(suite, layers, model)
    return notes
