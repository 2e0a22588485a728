"""Declared options: a plugin's frozen dataclass, filled from a suite table.

Unknown keys are rejected with a "did you mean"; values are checked against the
field's annotation (int, float, str, bool, list[...], Literal[...], X | None,
dict). Errors name the file, the key, what was expected and what was received.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from harness.errors import HarnessError, did_you_mean, where


def option_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of an options dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_options(cls: type, raw: dict[str, Any] | None, key: str, file: str | None = None) -> Any:
    """Build ``cls`` from ``raw``; raises HarnessError for unknown keys or bad types."""
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise HarnessError(f"{where(file, key)}: expected a table of options, got {raw!r}")
    fields = option_fields(cls)
    for name in raw:
        if name not in fields:
            known = ", ".join(fields) or "none"
            raise HarnessError(
                f"{where(file, f'{key}.{name}')}: unknown option{did_you_mean(name, fields)}; known options: {known}"
            )
    values = {name: check_value(raw[name], fields[name], where(file, f"{key}.{name}")) for name in raw}
    try:
        return cls(**values)
    except HarnessError:
        raise
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"{where(file, key)}: {exc}") from None


def describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
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
        raise HarnessError(f"{key}: expected {describe(annotation)}, got {value!r}")
    return converted


def _convert(value: Any, annotation: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin is typing.Literal:
        return value in typing.get_args(annotation), value
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
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    return isinstance(value, annotation), value


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
