"""Factorizations on disk, so that one process computes them and others reuse them (the Ray executor).

A method's factorizations (a list of ``harness.Factorization``) are written with
``torch.save`` as a tree of tensors and plain values, and read back with
``torch.load(weights_only=True)``: never an unpickled object. Objects are
written as their class's import path and their ``__dict__``; reading rebuilds
only classes that are ``Factorization`` subclasses or dataclasses defined in
the harness or in a loaded plugin's package (``cls.__new__`` plus the stored
attributes; no constructor or other code runs). A value of any other kind is
refused when writing (``Unsupported``): the caller then factorizes where it
needs them instead.

Writes are atomic (temporary file, then ``os.replace``); tensors come back
bit for bit, so a cell computed from a reloaded factorization has the numbers
of one computed in the process that factorized.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from harness.factorization import Factorization
from harness.store import atomic_write

FORMAT = 1
TAG = "__harness__"
PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)


class Unsupported(TypeError):
    """A factorization holds a value that cannot be written without pickling it."""


# ---------------------------------------------------------------- encode
def encode(value: Any) -> Any:
    """``value`` as a tree that ``torch.load(weights_only=True)`` reads: tagged tuples stand for objects."""
    if type(value) in PLAIN or isinstance(value, torch.Tensor):
        return value
    if type(value).__module__ == "numpy":
        return _numpy(value)
    if type(value) in (list, set, frozenset):
        return _tagged(type(value).__name__, [encode(v) for v in value])
    if type(value) is tuple:
        return _tagged("tuple", [encode(v) for v in value])
    if type(value) in (dict, OrderedDict):
        return _tagged(type(value).__name__, [(encode(k), encode(v)) for k, v in value.items()])
    if type(value) is range:
        return _tagged("range", (value.start, value.stop, value.step))
    return _tagged("object", (class_path(type(value)), encode(dict(vars(value)))))


def _tagged(kind: str, payload: Any) -> tuple:
    return (TAG, kind, payload)


def _numpy(value: Any) -> tuple:
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return _tagged("ndarray", torch.from_numpy(value.copy()))
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return _tagged("numpy", (value.dtype.str, value.item()))
    raise Unsupported(f"cannot store a numpy {type(value).__name__} of dtype {getattr(value, 'dtype', '?')}")


def class_path(cls: type) -> str:
    """'module:QualName' of a class a reader may rebuild; Unsupported for any other."""
    if not (issubclass(cls, Factorization) or dataclasses.is_dataclass(cls)) or "<locals>" in cls.__qualname__:
        raise Unsupported(f"cannot store a {cls.__module__}.{cls.__qualname__} (not a Factorization or dataclass)")
    if not hasattr(cls, "__dict__") or getattr(cls, "__slots__", None):
        raise Unsupported(f"cannot store a {cls.__qualname__}: it has __slots__")
    return f"{cls.__module__}:{cls.__qualname__}"


# ---------------------------------------------------------------- decode
class Decoder:
    """Rebuilds an encoded tree; objects only of allowed classes under ``roots`` (top-level package names)."""

    def __init__(self, roots: Iterable[str]) -> None:
        self.roots = frozenset(roots) | {"harness"}

    def __call__(self, value: Any) -> Any:
        if not (type(value) is tuple and len(value) == 3 and value[0] == TAG):
            return value
        kind, payload = value[1], value[2]
        if kind in ("list", "tuple", "set", "frozenset"):
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](map(self, payload))
        if kind in ("dict", "OrderedDict"):
            return (dict if kind == "dict" else OrderedDict)((self(k), self(v)) for k, v in payload)
        if kind == "range":
            return range(*payload)
        if kind in ("ndarray", "numpy"):
            return _numpy_value(kind, payload)
        if kind == "object":
            return self.rebuild(*payload)
        raise ValueError(f"unknown tag {kind!r} in a stored factorization")

    def rebuild(self, path: str, state: Any) -> Any:
        cls = self.allowed_class(path)
        obj = cls.__new__(cls)
        obj.__dict__.update(self(state))
        return obj

    def allowed_class(self, path: str) -> type:
        module_name, _, qualname = path.partition(":")
        if module_name.split(".")[0] not in self.roots:
            raise ValueError(f"stored factorization names {path!r}, outside the harness and its plugins")
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not isinstance(cls, type) or not (issubclass(cls, Factorization) or dataclasses.is_dataclass(cls)):
            raise ValueError(f"stored factorization names {path!r}: not a Factorization or dataclass")
        return cls


def _numpy_value(kind: str, payload: Any) -> Any:
    import numpy as np

    if kind == "ndarray":
        return payload.numpy()
    dtype, item = payload
    return np.dtype(dtype).type(item)


# ---------------------------------------------------------------- files
def save(path: Path, factorizations: list[Factorization], seconds: float) -> None:
    """Write ``factorizations`` (and the seconds they took) to ``path`` atomically; Unsupported if impossible."""
    payload = {"format": FORMAT, "seconds": seconds, "factorizations": encode(list(factorizations))}
    atomic_write(Path(path), lambda stream: torch.save(payload, stream))


def load(path: Path, roots: Iterable[str]) -> tuple[list[Factorization], float]:
    """The factorizations written by ``save`` and the seconds they took; tensors on their saved device."""
    location = None if torch.cuda.is_available() else "cpu"
    payload = torch.load(path, map_location=location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a stored factorization of format {FORMAT}")
    return Decoder(roots)(payload["factorizations"]), float(payload["seconds"])


def plugin_roots(plugins: Any) -> set[str]:
    """Top-level package names of the loaded plugins (whose classes ``load`` may rebuild)."""
    roots = set()
    for _, plugin in plugins.pm.list_name_plugin():
        module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
        roots.add(module.split(".")[0])
    return roots
