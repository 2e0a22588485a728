"""Shape-only models: the architecture of a published model with seeded random weights.

A model spec ``random:<shape>[?key=value[&key=value]]`` names one of the
config files beside this module (``harness/shapes/<shape>.json``, the sizes
copied from the model's public ``config.json``). Keys:

- ``layers=N``: keep the first N transformer blocks (1 <= N <= the shape's);
- ``scale=F``: divide the widths by F (hidden and intermediate sizes, attention and key/value heads;
  the head width, vocabulary and depth stay): e.g. ``random:llama-2-7b?scale=4`` is 1024 wide with 8
  heads of 128 and an intermediate size of 2752. Every divided size must be a multiple of F. For
  benchmarks whose memory per block scales with the widths (bench/scale.py), never for shapes of
  published models;
- ``seed=S``: the weights' seed (default 0).

This module is torch-free: ``harness validate`` checks the specs with it;
``harness.models`` builds the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from harness.errors import HarnessError, did_you_mean

PREFIX = "random:"
KEYS = ("layers", "scale", "seed")
WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
"""The config keys ``scale=F`` divides."""


def known_shapes() -> tuple[str, ...]:
    """The shape names, sorted (the JSON files shipped in this package)."""
    folder = resources.files(__name__)
    return tuple(sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")))


@cache
def _shape_text(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")


def shape_config(name: str) -> dict[str, Any]:
    """The shape's config (a fresh dict; keys starting with ``_`` are notes, not config)."""
    if name not in known_shapes():
        shapes = known_shapes()
        raise HarnessError(f"unknown shape {name!r}{did_you_mean(name, shapes)}; known shapes: {', '.join(shapes)}")
    return json.loads(_shape_text(name))


@dataclass(frozen=True)
class RandomSpec:
    """A parsed ``random:`` model spec."""

    shape: str
    layers: int
    """Transformer blocks kept (the shape's own count where the spec does not cut it)."""
    seed: int = 0
    full_layers: int = 0
    """The shape's own number of blocks."""
    scale: int = 1
    """The widths' divisor (``WIDTHS``; 1: the shape's own widths)."""

    @property
    def canonical(self) -> str:
        """``random:<shape>`` plus only the keys that differ from the defaults (``layers``, ``scale``, ``seed``)."""
        keys = []
        if self.layers != self.full_layers:
            keys.append(f"layers={self.layers}")
        if self.scale != 1:
            keys.append(f"scale={self.scale}")
        if self.seed:
            keys.append(f"seed={self.seed}")
        return PREFIX + self.shape + ("?" + "&".join(keys) if keys else "")

    def config(self) -> dict[str, Any]:
        """The shape's config with ``num_hidden_layers`` cut to ``layers``, the widths divided by ``scale``
        (an explicit ``head_dim`` stays) and the notes dropped."""
        config = {k: v for k, v in shape_config(self.shape).items() if not k.startswith("_")}
        config["num_hidden_layers"] = self.layers
        for key in WIDTHS:
            if self.scale != 1 and key in config:
                config[key] //= self.scale
        return config

    def fingerprint(self, dtype: str, extra: dict[str, Any] | None = None) -> str:
        """sha256 of the shape's config, the layers, the seed and the dtype (plus ``extra``); ``scale`` only
        where it cuts the widths (so the full-width fingerprints are those from before the key existed)."""
        payload = {
            "shape": self.shape,
            "config": shape_config(self.shape),
            "layers": self.layers,
            "seed": self.seed,
            "dtype": dtype,
            **({"scale": self.scale} if self.scale != 1 else {}),
            **(extra or {}),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_random(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _int(value: str, key: str, spec: str) -> int:
    if not value.isdigit():
        raise HarnessError(f"model: expected {key}=<non-negative integer> in {spec!r}, got {key}={value!r}")
    return int(value)


def parse_random_spec(spec: str, layers: int | None = None) -> RandomSpec:
    """Parse ``random:<shape>[?layers=N][&scale=F][&seed=S]``; ``layers`` (the ``--layers`` flag) overrides
    the spec's.

    Raises a one-line HarnessError for an unknown shape (listing the known
    ones), an unknown key, layers outside 1..the shape's blocks, or a scale
    that does not divide every width.
    """
    if not is_random(spec):
        raise HarnessError(f"model: expected a spec 'random:<shape>', got {spec!r}")
    name, _, query = spec[len(PREFIX) :].partition("?")
    shapes = known_shapes()
    if name not in shapes:
        raise HarnessError(
            f"model: unknown shape {name!r} in {spec!r}{did_you_mean(name, shapes)}; known shapes: {', '.join(shapes)}"
        )
    values: dict[str, int] = {}
    for item in query.split("&") if query else ():
        key, eq, value = item.partition("=")
        if key not in KEYS or not eq:
            hint = did_you_mean(key, KEYS) if key not in KEYS else ""
            raise HarnessError(
                f"model: expected key=value with keys {', '.join(KEYS)} after '?' in {spec!r}, got {item!r}{hint}"
            )
        if key in values:
            raise HarnessError(f"model: {key} given twice in {spec!r}")
        values[key] = _int(value, key, spec)
    full = int(shape_config(name)["num_hidden_layers"])
    chosen = layers if layers is not None else values.get("layers", full)
    if not 1 <= chosen <= full:
        raise HarnessError(f"model: layers: expected 1 to {full} (the blocks of shape {name!r}), got {chosen}")
    seed = values.get("seed", 0)
    if seed >= 2**63:
        raise HarnessError(f"model: seed: expected an integer below 2**63, got {seed} in {spec!r}")
    scale = values.get("scale", 1)
    _check_scale(name, scale, spec)
    return RandomSpec(name, chosen, seed, full, scale)


def _check_scale(name: str, scale: int, spec: str) -> None:
    if scale < 1:
        raise HarnessError(f"model: scale: expected a positive integer (the widths' divisor), got 0 in {spec!r}")
    config = shape_config(name)
    for key in WIDTHS:
        if key in config and config[key] % scale:
            raise HarnessError(
                f"model: scale: expected a divisor of every width of shape {name!r}, got {scale} "
                f"({key} = {config[key]}) in {spec!r}"
            )


def with_layers(spec: str, layers: int) -> str:
    """``spec`` (a ``random:`` spec) with its depth set to ``layers`` (the ``--layers`` flag), canonical."""
    return parse_random_spec(spec, layers).canonical
