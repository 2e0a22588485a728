"""Declared options: a plugin's frozen dataclass, filled from a suite table.

Unknown keys are rejected with a "did you mean"; values are checked against the
field's annotation (int, float, str, bool, list[...], Literal[...], X | None,
dict) and against the bounds the field declares in its metadata (``BOUNDS``,
``CHOICES``, ``MIN_ITEMS``, ``UNIQUE``), then the dataclass's ``__post_init__``
runs. A plugin declares, the core checks: ``field(default=1, metadata={"minimum": 1})``.
Floats must be finite (TOML's ``nan`` and ``inf`` are refused). Errors name the
file, the key, what was expected and what was received, on one line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from typing import Any

from harness.errors import HarnessError, did_you_mean, where

BOUNDS = {
    "minimum": (lambda v, b: v >= b, "at least"),
    "exclusive_minimum": (lambda v, b: v > b, "above"),
    "maximum": (lambda v, b: v <= b, "at most"),
    "exclusive_maximum": (lambda v, b: v < b, "below"),
}
"""Field metadata keys bounding a number (or every number of a list): name -> (test, words)."""
CHOICES = "choices"
"""Field metadata key: the values a string (or every string of a list) may take."""
MIN_ITEMS = "min_items"
"""Field metadata key: the fewest entries a list may hold."""
UNIQUE = "unique"
"""Field metadata key: true where a list must hold each entry once."""
MODEL_NAMES = "model"
"""Field metadata key naming what only the model can confirm (``harness.modelcheck``): ``"kinds"`` (each
entry a layer kind of the model's decomposable Linears) or ``"layers"`` (layer indices, negative from the
end, within the model's blocks). Checked as soon as the model's config is known, before any weights load."""
CONSTRAINTS = (*BOUNDS, CHOICES, MIN_ITEMS, UNIQUE)
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.\-\[\]]*$")


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a one-line message: at most ``limit`` characters (huge integers, long lists
    and strings are cut with '...'); never raises (Python refuses ``str`` of integers over 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(value)
    except ValueError:  # a huge integer inside a container
        text = f"a {type(value).__name__} holding a huge integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str) -> str:
    """``text`` with every character that would break or hide a one-line message (newlines, carriage
    returns, other control and non-printable characters) written as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def key_name(name: str) -> str:
    """A suite key as a message shows it: as written where plain, else quoted TOML-style (no newlines)."""
    if name and _PLAIN_KEY.match(name):
        return name
    text = json.dumps(name)
    return text if len(text) <= 60 else text[:56] + '..."'


@functools.cache
def option_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of an options dataclass (cached: resolving string annotations
    is most of a suite's parsing time)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_options(cls: type, raw: dict[str, Any] | None, key: str, file: str | None = None) -> Any:
    """Build ``cls`` from ``raw``: unknown keys, bad types, values outside the declared bounds and the
    ``__post_init__`` checks all give one HarnessError line naming ``file`` and the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HarnessError(f"{where(file, key)}: expected a table of options, got {shown(raw)}")
    hints = dict(option_fields(cls))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            known = ", ".join(fields) or "none"
            raise HarnessError(
                f"{where(file, f'{key}.{key_name(name)}')}: unknown option{did_you_mean(name, fields)}; "
                f"known options: {known}"
            )
    values = {name: check_value(raw[name], hints[name], where(file, f"{key}.{name}")) for name in raw}
    try:  # the plugin's own checks first (their messages stay as written), then the declared bounds
        options = cls(**values)
    except (HarnessError, TypeError, ValueError, ArithmeticError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the plugin wrote
        prefix = where(file, key)
        raise HarnessError(message if message.startswith(f"{prefix}") else f"{prefix}: {message}") from None
    for name in raw:
        check_constraints(values[name], hints[name], fields[name].metadata, where(file, f"{key}.{name}"))
    return options


def check_constraints(value: Any, annotation: Any, metadata: typing.Mapping[str, Any], key: str) -> None:
    """HarnessError naming ``key`` where ``value`` (or, for a list, one of its entries) breaks a bound,
    a choice, ``min_items`` or ``unique`` declared in ``metadata``."""
    if value is None or not any(name in metadata for name in CONSTRAINTS):
        return
    is_list = isinstance(value, (list, tuple))
    items = list(value) if is_list else [value]
    expected = f"expected {describe(annotation)}{', each' if is_list else ','}"
    if is_list and len(items) < metadata.get(MIN_ITEMS, 0):
        least = metadata[MIN_ITEMS]
        got = shown(list(value)) if items else "an empty list"
        raise HarnessError(f"{key}: expected at least {least} {'entry' if least == 1 else 'entries'}, got {got}")
    if is_list and metadata.get(UNIQUE):
        for i, item in enumerate(items):
            if item in items[:i]:
                raise HarnessError(f"{key}: expected each entry once, got {shown(item)} twice in {shown(value)}")
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            broken = [b for b, (test, _) in BOUNDS.items() if b in metadata and not test(item, metadata[b])]
            if broken:
                words = " and ".join(f"{BOUNDS[b][1]} {metadata[b]:g}" for b in BOUNDS if b in metadata)
                raise HarnessError(f"{key}: {expected} {words}, got {shown(value)}")
        if CHOICES in metadata and isinstance(item, str) and item not in metadata[CHOICES]:
            choices = ", ".join(repr(c) for c in metadata[CHOICES])
            hint = did_you_mean(item, metadata[CHOICES])
            raise HarnessError(f"{key}: {expected} one of {choices}, got {shown(value)}{hint}")


def describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is list or origin is tuple:
        (inner, *_) = typing.get_args(annotation) or (Any,)
        return f"a list of {describe(inner)}"
    if origin is dict:
        return "a table"
    if annotation is type(None):
        return "nothing"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def check_value(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to ``annotation`` (int -> float allowed) or HarnessError."""
    ok, converted = _convert(value, annotation)
    if not ok:
        note = " (nan and inf are refused)" if _non_finite(value) else ""
        raise HarnessError(f"{key}: expected {describe(annotation)}{note}, got {shown(value)}")
    return converted


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


def _convert(value: Any, annotation: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(annotation)), value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, converted = _convert(value, option)
            if ok:
                return True, converted
        return False, value
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            return False, value
        (inner, *_) = typing.get_args(annotation) or (Any,)
        pairs = [_convert(v, inner) for v in value]
        converted = [c for _, c in pairs]
        return all(ok for ok, _ in pairs), converted if origin is list else tuple(converted)
    if origin is dict:
        return isinstance(value, dict), value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        return _float(value)
    if annotation is str:
        return isinstance(value, str), value
    return isinstance(value, annotation), value


def _float(value: Any) -> tuple[bool, Any]:
    """A finite float from an int or float (an integer too large for a float is refused, not raised)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False, value
    try:
        converted = float(value)
    except OverflowError:
        return False, value
    return math.isfinite(converted), converted


OMIT_DEFAULT = "omit_default"
"""Field metadata key: ``dataclasses.field(default=..., metadata={"omit_default": True})`` leaves the
option out of ``options_dict`` while it has its default, so that adding an option whose default keeps the
old behaviour leaves every existing cell's id (a hash of ``options_dict``) unchanged."""


def options_dict(options: Any) -> dict[str, Any]:
    """An options instance as a plain dict (for hashing and recording); options marked ``omit_default``
    are left out while they hold their default."""
    if not dataclasses.is_dataclass(options):
        return {}
    out = dataclasses.asdict(options)
    for f in dataclasses.fields(options):
        if f.metadata.get(OMIT_DEFAULT) and out[f.name] == f.default:
            del out[f.name]
    return out
