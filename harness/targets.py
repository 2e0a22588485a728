"""Compression targets: what a suite asks the allocator to meet.

Kinds (DESIGN.md, "Definitions that every method shares"):

- ``params``: fraction of the decomposable Linear weights' parameters kept
  (``keep = 0.8`` removes 20%).
- ``rank``: fraction of each matrix's full rank kept (the denoising regime).
- ``bytes``: a memory budget in bytes for the decomposable weights.
- ``bits``: average bits per decomposable weight (a budget in bytes, scaled).

In a suite a bare number is a ``params`` target; a table names the kind:
``{rank = 0.5}``, ``{bytes = "40MB"}``, ``{bits = 2.5}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError

KINDS = ("params", "rank", "bytes", "bits")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Target:
    kind: str
    value: float

    @property
    def label(self) -> str:
        if self.kind == "params":
            return f"keep={self.value:g}"
        if self.kind == "bytes":
            return f"bytes={self.value / 1e6:.3g}MB"
        return f"{self.kind}={self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def budget_bytes(self, dense_weights: int) -> float:
        """The bytes budget of a ``bytes`` or ``bits`` target for ``dense_weights`` weights."""
        if self.kind == "bytes":
            return self.value
        if self.kind == "bits":
            return self.value * dense_weights / 8
        raise ValueError(f"{self.kind} target has no byte budget")


def parse_bytes(text: str | int | float, key: str) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not match:
        raise HarnessError(f"{key}: expected a size such as 40MB or 2.5GiB, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def parse_target(raw: Any, key: str) -> Target:
    """A suite's target value -> Target; raises HarnessError naming ``key``."""
    if isinstance(raw, bool):
        raise HarnessError(f"{key}: expected a number in (0, 1] or a table like {{rank = 0.5}}, got {raw!r}")
    if isinstance(raw, (int, float)):
        return _checked(Target("params", float(raw)), key)
    if isinstance(raw, dict) and len(raw) == 1:
        kind, value = next(iter(raw.items()))
        if kind not in KINDS:
            raise HarnessError(f"{key}: expected one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "bytes":
            return _checked(Target("bytes", parse_bytes(value, key)), key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise HarnessError(f"{key}.{kind}: expected a number, got {value!r}")
        return _checked(Target(kind, float(value)), key)
    raise HarnessError(f"{key}: expected a number in (0, 1] or a table like {{rank = 0.5}}, got {raw!r}")


def _checked(target: Target, key: str) -> Target:
    if target.kind in ("params", "rank") and not 0 < target.value <= 1:
        raise HarnessError(f"{key}: expected a fraction in (0, 1], got {target.value:g}")
    if target.kind == "bits" and not 0 < target.value <= 32:
        raise HarnessError(f"{key}: expected bits per weight in (0, 32], got {target.value:g}")
    if target.kind == "bytes" and target.value <= 0:
        raise HarnessError(f"{key}: expected a positive number of bytes, got {target.value:g}")
    return target
