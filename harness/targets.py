"""Compression targets: what a suite asks the allocator to meet.

Kinds (DESIGN.md, "Definitions that every method shares"), one class each:

- ``params`` (``ParamsTarget``): fraction of the decomposable Linear weights'
  parameters kept (``keep = 0.8`` removes 20%).
- ``rank`` (``RankTarget``): fraction of each matrix's full rank kept (the
  denoising regime).
- ``bytes`` (``BytesTarget``): a memory budget in bytes for the decomposable
  weights (``scope = "decomposable"``, the default) or for the whole model
  (``scope = "model"``: the decomposable weights plus everything else,
  embeddings, LM head, norms, biases, counted at fp16 as BitStack's paper does).
- ``bits`` (``BitsTarget``): average bits per decomposable weight (a budget in
  bytes, scaled).

In a suite a bare number is a ``params`` target; a table names the kind:
``{rank = 0.5}``, ``{bytes = "40MB"}``, ``{bits = 2.5}``; a kind may take more
keys in the same table (``{bytes = "3GB", scope = "model"}``).

A kind is a subclass of ``Target`` that sets ``kind`` (its name in suites,
registered in ``KINDS`` when the class is defined) and ``unit``, and defines
its arithmetic: ``cost`` (what one group at one rank, or dense, spends) and
``budget`` (the total a list of groups may spend). Everything an allocator
asks (``limit``, ``fits``, ``assignment_cost``, ``unreachable``) follows from
those two. ``Target(kind, value)`` builds the registered class of ``kind``, so
``Target("params", 0.8) == ParamsTarget(0.8)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from harness import budget
from harness.errors import HarnessError
from harness.options import shown

if TYPE_CHECKING:
    from harness.budget import Assignment
    from harness.factorization import Factorization

KINDS: dict[str, type[Target]] = {}
"""Registered target kinds by name, in definition order (filled by ``Target.__init_subclass__``)."""
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class _TargetType(type):
    """``Target(kind, value)`` builds the registered class of ``kind``; a kind's own class builds itself."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Target:
            return _build(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def _build(kind: str, value: float) -> Target:
    if kind not in KINDS:
        raise ValueError(f"unknown target kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind](value)


@dataclass(frozen=True, eq=False, repr=False)
class Target(metaclass=_TargetType):
    """A compression target of one kind: ``value`` in the kind's own terms.

    Equality and hash are those of ``(kind, value)``; ``to_dict`` is
    ``{"kind": ..., "value": ...}`` (part of every cell's id).
    """

    value: float
    kind: ClassVar[str] = ""
    """The kind's name in suites and results (``{kind = value}``)."""
    unit: ClassVar[str] = ""
    """What ``cost`` and ``budget`` count, in messages (parameters, bytes, rank)."""
    tolerance: ClassVar[float] = 0.0
    """Slack added to ``budget`` before comparing a cost against it (``limit``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        if kind in KINDS and KINDS[kind].__qualname__ != cls.__qualname__:
            raise TypeError(f"target kind {kind!r} is already registered by {KINDS[kind].__qualname__}")
        KINDS[kind] = cls

    # ------------------------------------------------------------ identity and reporting
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Target):
            return NotImplemented
        return (self.kind, self.value) == (other.kind, other.value)

    def __hash__(self) -> int:
        return hash((self.kind, self.value))

    def __repr__(self) -> str:
        return f"Target(kind={self.kind!r}, value={self.value!r})"

    @property
    def label(self) -> str:
        return f"{self.kind}={self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    # ------------------------------------------------------------ suite input
    @classmethod
    def parse_value(cls, raw: Any, key: str) -> float:
        """A suite's ``{kind = raw}`` -> value; HarnessError naming ``key``."""
        if not isinstance(raw, (int, float)) or isinstance(raw, bool):
            raise HarnessError(f"{key}.{cls.kind}: expected a number, got {shown(raw)}")
        return finite(raw, f"{key}.{cls.kind}")

    def check(self, key: str) -> Target:
        """This target, or HarnessError naming ``key`` where its value is out of range."""
        return self

    @classmethod
    def from_table(cls, value: float, extra: dict[str, Any], key: str) -> Target:
        """The target of a suite table ``{kind = value, **extra}``; a kind without further keys refuses any."""
        if extra:
            name = next(iter(extra))
            raise HarnessError(f"{key}.{name}: unknown key for a {cls.kind} target (it takes only {cls.kind})")
        return cls(value)

    def for_model(self, model: Any, decomposable: Sequence[str]) -> Target:
        """This target bound to a loaded model whose decomposable Linears are ``decomposable`` (by name).

        The run calls it before allocating; a kind whose budget depends on the
        rest of the model (``bytes`` with ``scope = "model"``) returns a copy
        that knows it, every other kind returns itself.
        """
        return self

    # ------------------------------------------------------------ arithmetic
    def cost(self, fact: Factorization, rank: int | None, dtype_bytes: int) -> float:
        """What ``fact`` at ``rank`` (None: dense) spends of this target's budget."""
        raise NotImplementedError(f"{type(self).__name__} defines no cost")

    def costs(self, fact: Factorization, ranks: Sequence[int], dtype_bytes: int) -> list[float]:
        """``cost`` of ``fact`` at each of ``ranks`` (kinds may do this faster)."""
        return [self.cost(fact, r, dtype_bytes) for r in ranks]

    def budget(self, facts: Sequence[Factorization], dtype_bytes: int) -> float:
        """The total cost this target allows for ``facts``, as stated (no tolerance)."""
        raise NotImplementedError(f"{type(self).__name__} defines no budget")

    def limit(self, facts: Sequence[Factorization], dtype_bytes: int) -> float:
        """The largest total cost that meets this target: ``budget`` plus ``tolerance``."""
        return self.budget(facts, dtype_bytes) + self.tolerance

    def assignment_cost(self, facts: Sequence[Factorization], ranks: Sequence[int | None], dtype_bytes: int) -> float:
        return sum(self.cost(f, r, dtype_bytes) for f, r in zip(facts, ranks, strict=True))

    def fits(self, facts: Sequence[Factorization], ranks: Sequence[int | None], dtype_bytes: int) -> bool:
        """Does the assignment ``ranks`` (one rank or None per group) meet this target?"""
        return self.assignment_cost(facts, ranks, dtype_bytes) <= self.limit(facts, dtype_bytes)

    def per_matrix(self, facts: Sequence[Factorization]) -> Assignment | None:
        """Each group's rank where every matrix meets this target on its own (the uniform allocator).

        None where the kind is a budget for the whole model only: the uniform
        allocator then solves one common kept fraction of parameters that fits.
        """
        return None

    def unreachable(self, facts: Sequence[Factorization], dtype_bytes: int) -> tuple[float, float] | None:
        """``(least, allowed)`` where this target is below the smallest model, else None.

        The smallest model has every matrix at its smallest positive rank (or
        dense, where that costs less); ``least`` is its cost, ``allowed`` this
        target's ``budget``, both in ``unit``. Only removing whole matrices
        (rank 0) could meet such a target.
        """
        if not facts:
            return None
        smallest = [min((r for r in f.ranks if r > 0), default=None) for f in facts]
        least = sum(min(self.cost(f, r, dtype_bytes), self.cost(f, None, dtype_bytes)) for f, r in zip(facts, smallest))
        allowed = self.budget(facts, dtype_bytes)
        return (least, allowed) if allowed + 1e-9 < least else None

    def budget_bytes(self, dense_weights: int) -> float:
        """The bytes budget of a ``bytes`` or ``bits`` target for ``dense_weights`` weights."""
        raise ValueError(f"{self.kind} target has no byte budget")


def _fraction(target: Target, key: str) -> Target:
    if not 0 < target.value <= 1:
        raise HarnessError(f"{key}: expected a fraction in (0, 1], got {target.value:g}")
    return target


class ParamsTarget(Target):
    """Keep ``value`` of the decomposable weights' parameters (budget: ``value`` x dense parameters)."""

    kind = "params"
    unit = "parameters"
    tolerance = 1e-9

    @property
    def label(self) -> str:
        return f"keep={self.value:g}"

    def check(self, key: str) -> Target:
        return _fraction(self, key)

    def cost(self, fact: Factorization, rank: int | None, dtype_bytes: int) -> float:
        return budget.group_params(fact, rank)

    def costs(self, fact: Factorization, ranks: Sequence[int], dtype_bytes: int) -> list[float]:
        return [fact.params(r) for r in ranks]

    def budget(self, facts: Sequence[Factorization], dtype_bytes: int) -> float:
        return self.value * budget.dense_total(facts)

    def per_matrix(self, facts: Sequence[Factorization]) -> Assignment:
        return budget.keep_fraction(facts, self.value)


class RankTarget(Target):
    """Keep ``value`` of the rank, summed over matrices (a dense matrix keeps its full rank).

    Budget: ``value`` x the sum of full ranks, i.e. a rank-weighted mean kept
    fraction of rank (WeLore's convention: removed rank / total rank over all
    matrices). Per matrix (uniform): ``round(value * full_rank)``, at least 1.
    """

    kind = "rank"
    unit = "rank"
    tolerance = 1e-9

    def check(self, key: str) -> Target:
        return _fraction(self, key)

    def cost(self, fact: Factorization, rank: int | None, dtype_bytes: int) -> float:
        return fact.full_rank if rank is None else rank

    def budget(self, facts: Sequence[Factorization], dtype_bytes: int) -> float:
        return self.value * sum(f.full_rank for f in facts)

    def per_matrix(self, facts: Sequence[Factorization]) -> Assignment:
        ranks: Assignment = []
        for fact in facts:
            rank = max(1, round(self.value * fact.full_rank))
            rank = min((r for r in fact.ranks if r >= rank), default=fact.full_rank)
            ranks.append(None if self.value >= 1 else rank)
        return ranks

    def unreachable(self, facts: Sequence[Factorization], dtype_bytes: int) -> tuple[float, float] | None:
        return None  # per matrix, a rank target always keeps at least rank 1


class _ByteBudget(Target):
    """Bytes kept (``Factorization.bytes``; a dense group: its parameters x ``dtype_bytes``)."""

    unit = "bytes"

    def cost(self, fact: Factorization, rank: int | None, dtype_bytes: int) -> float:
        return budget.group_bytes(fact, rank, dtype_bytes)

    def costs(self, fact: Factorization, ranks: Sequence[int], dtype_bytes: int) -> list[float]:
        return [fact.bytes(r, dtype_bytes) for r in ranks]

    def budget(self, facts: Sequence[Factorization], dtype_bytes: int) -> float:
        return self.budget_bytes(budget.dense_total(facts))


SCOPES = ("decomposable", "model")
"""What a ``bytes`` target's value counts: the decomposable weights, or the whole model."""
OTHER_BYTES_PER_PARAM = 2
"""With ``scope = "model"``, every parameter outside the decomposable weights counts at fp16 (the paper's)."""


@dataclass(frozen=True, eq=False, repr=False)
class BytesTarget(_ByteBudget):
    """At most ``value`` bytes for the decomposable weights (``scope = "decomposable"``) or the whole model.

    ``scope = "model"`` (BitStack's convention: whole-model memory, its
    ``check_model_memory_excluding_linear`` + the decomposed layers): the
    budget of the decomposable weights is ``value`` minus 2 bytes per other
    parameter of the model (``other_params``: embeddings, LM head, norms,
    biases, Linears not decomposed, tied tensors once). ``other_params`` is
    set by ``for_model`` from the loaded model; it is not part of the
    target's identity (the model is, in the cell's id). A default-scope
    target's equality, hash, ``to_dict`` and label are those of every
    target: ``(kind, value)``, so existing cell ids do not change.
    """

    scope: str = "decomposable"
    other_params: int | None = None

    kind = "bytes"

    def _key(self) -> tuple:
        return (self.kind, self.value) if self.scope == "decomposable" else (self.kind, self.value, self.scope)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Target):
            return NotImplemented
        return self._key() == (other._key() if isinstance(other, BytesTarget) else (other.kind, other.value))

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if self.scope == "decomposable":
            return super().__repr__()
        return f"Target(kind={self.kind!r}, value={self.value!r}, scope={self.scope!r})"

    @property
    def label(self) -> str:
        prefix = "bytes" if self.scope == "decomposable" else "model_bytes"
        return f"{prefix}={self.value / 1e6:.3g}MB"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.scope != "decomposable":
            out["scope"] = self.scope
        return out

    @classmethod
    def parse_value(cls, raw: Any, key: str) -> float:
        return parse_bytes(raw, key)

    @classmethod
    def from_table(cls, value: float, extra: dict[str, Any], key: str) -> Target:
        unknown = [k for k in extra if k != "scope"]
        if unknown:
            raise HarnessError(f"{key}.{unknown[0]}: unknown key for a bytes target (known: bytes, scope)")
        scope = extra.get("scope", "decomposable")
        if scope not in SCOPES:
            raise HarnessError(f"{key}.scope: expected 'decomposable' or 'model', got {scope!r}")
        return cls(value, scope)

    def check(self, key: str) -> Target:
        if self.value <= 0:
            raise HarnessError(f"{key}: expected a positive number of bytes, got {self.value:g}")
        return self

    def for_model(self, model: Any, decomposable: Sequence[str]) -> Target:
        if self.scope == "decomposable":
            return self
        return dataclasses.replace(self, other_params=other_params(model, decomposable))

    def other_bytes(self) -> int:
        """Bytes the rest of the model takes out of a ``scope = "model"`` budget (0 for the default scope)."""
        if self.scope == "decomposable":
            return 0
        if self.other_params is None:
            raise HarnessError(
                f'target {self.label}: scope = "model" needs the rest of the model counted '
                "(Target.for_model, before allocating)"
            )
        return OTHER_BYTES_PER_PARAM * self.other_params

    def model_bytes(self, decomposable_bytes: float) -> float:
        """Whole-model bytes in this target's convention: the decomposable weights' bytes plus the rest at fp16."""
        return decomposable_bytes + OTHER_BYTES_PER_PARAM * (self.other_params or 0)

    def budget_bytes(self, dense_weights: int) -> float:
        return self.value - self.other_bytes()


def other_params(model: Any, decomposable: Sequence[str]) -> int:
    """Parameters of ``model`` outside the weights of the ``decomposable`` Linears (tied tensors once).

    Embeddings, LM head, norms, biases (of decomposed layers too: BitStack's
    ``check_model_memory_excluding_linear`` keeps them), every Linear not
    decomposed. Buffers are not counted (rotary ``inv_freq`` is recomputed,
    not stored).
    """
    from harness.surgery import count_model

    total, _ = count_model(model)
    return total - sum(model.get_submodule(name).weight.numel() for name in decomposable)


class BitsTarget(_ByteBudget):
    """At most ``value`` bits per decomposable weight on average: ``value`` x dense weights / 8 bytes."""

    kind = "bits"

    def check(self, key: str) -> Target:
        if not 0 < self.value <= 32:
            raise HarnessError(f"{key}: expected bits per weight in (0, 32], got {self.value:g}")
        return self

    def budget_bytes(self, dense_weights: int) -> float:
        return self.value * dense_weights / 8


def parse_bytes(text: str | int | float, key: str) -> float:
    if isinstance(text, (int, float)):
        return finite(text, key)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not match:
        raise HarnessError(f"{key}: expected a size such as 40MB or 2.5GiB, got {shown(text)}")
    try:
        return finite(float(match.group(1)) * _UNITS[match.group(2) or ""], key)
    except ValueError:  # "1.2.3" or "." matched the characters but is no number
        raise HarnessError(f"{key}: expected a size such as 40MB or 2.5GiB, got {shown(text)}") from None


def finite(value: int | float, key: str) -> float:
    """``value`` as a finite float, or HarnessError naming ``key`` (nan, inf, an integer beyond floats)."""
    try:
        converted = float(value)
    except OverflowError:
        converted = math.inf
    if not math.isfinite(converted):
        raise HarnessError(f"{key}: expected a finite number, got {shown(value)}")
    return converted


def parse_target(raw: Any, key: str) -> Target:
    """A suite's target value -> Target; raises HarnessError naming ``key``."""
    if isinstance(raw, bool):
        raise HarnessError(f"{key}: expected a number in (0, 1] or a table like {{rank = 0.5}}, got {shown(raw)}")
    if isinstance(raw, (int, float)):
        return ParamsTarget(finite(raw, key)).check(key)
    if isinstance(raw, dict) and len(raw) == 1:
        kind, value = next(iter(raw.items()))
        if kind not in KINDS:
            raise HarnessError(f"{key}: expected one of {', '.join(KINDS)}, got {kind!r}")
        cls = KINDS[kind]
        return cls(cls.parse_value(value, key)).check(key)
    kinds = [k for k in raw if k in KINDS] if isinstance(raw, dict) else []
    if len(kinds) == 1:  # {kind = value, further keys the kind takes}
        cls = KINDS[kinds[0]]
        extra = {k: v for k, v in raw.items() if k != kinds[0]}
        return cls.from_table(cls.parse_value(raw[kinds[0]], key), extra, key).check(key)
    raise HarnessError(f"{key}: expected a number in (0, 1] or a table like {{rank = 0.5}}, got {shown(raw)}")
