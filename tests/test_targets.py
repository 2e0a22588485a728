"""Target kinds as classes: identity, labels, suite parsing, costs and budgets, reachability, a new kind.

Every number is worked out by hand on matrices of shapes (4, 6) and (10, 2)
(dense 24 + 20 = 44 parameters, full ranks 4 and 2; a rank-k factor of an
m x n matrix holds k (m + n) parameters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest
from harness_allocators import Uniform

import harness
from harness import targets
from harness.api import AllocationContext
from harness.targets import BitsTarget, BytesTarget, ParamsTarget, RankTarget, Target, parse_target

DTYPE_BYTES = 2


class Shape(harness.Factorization):
    """A factorization known only by its shape (ranks 0..min(m, n), error unused)."""

    def __init__(self, m: int, n: int) -> None:
        self.names, self.shapes, self.info = (f"w{m}x{n}",), ((m, n),), {}

    @property
    def ranks(self):
        m, n = self.shapes[0]
        return range(min(m, n) + 1)

    def params(self, rank: int) -> int:
        m, n = self.shapes[0]
        return rank * (m + n)

    def error(self, rank: int) -> float:
        return float(self.full_rank - rank)

    def materialize(self, rank: int):
        raise NotImplementedError


@pytest.fixture
def facts():
    return [Shape(4, 6), Shape(10, 2)]


# ---------------------------------------------------------------- identity (cells hold targets)
def test_target_builds_its_kind_and_compares_as_before():
    t = Target("params", 0.8)
    assert type(t) is ParamsTarget and isinstance(t, Target)
    assert (t.kind, t.value) == ("params", 0.8)
    assert t == ParamsTarget(0.8) == Target(kind="params", value=0.8)
    assert t != Target("rank", 0.8) and t != Target("params", 0.7) and t != ("params", 0.8)
    assert hash(t) == hash(("params", 0.8))  # what the frozen dataclass hashed
    assert (Target("rank", 0.5), t).index(Target("params", 0.8)) == 1
    assert {t: 1}[ParamsTarget(0.8)] == 1
    assert repr(t) == "Target(kind='params', value=0.8)"
    assert pickle.loads(pickle.dumps(t)) == t and type(pickle.loads(pickle.dumps(t))) is ParamsTarget
    assert dataclasses.replace(t, value=0.5) == Target("params", 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.value = 0.5
    with pytest.raises(ValueError, match="unknown target kind 'flops'; known: params, rank, bytes, bits"):
        Target("flops", 0.5)


def test_to_dict_is_unchanged():
    # hashed into every cell id: exactly these keys and values
    assert json.dumps(Target("params", 0.8).to_dict(), sort_keys=True) == '{"kind": "params", "value": 0.8}'
    assert Target("bytes", 4e7).to_dict() == {"kind": "bytes", "value": 4e7}
    assert Target("params", 1).to_dict() == {"kind": "params", "value": 1}  # the value is kept as given
    assert [type(Target(k, 1.0)) for k in targets.KINDS] == [ParamsTarget, RankTarget, BytesTarget, BitsTarget]


def test_labels():
    assert Target("params", 0.8).label == "keep=0.8"
    assert Target("rank", 0.5).label == "rank=0.5"
    assert Target("bytes", 40e6).label == "bytes=40MB"
    assert Target("bytes", 1_234_567).label == "bytes=1.23MB"
    assert Target("bits", 2.5).label == "bits=2.5"


# ---------------------------------------------------------------- suite input
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0.8, ParamsTarget(0.8)),
        (1, ParamsTarget(1.0)),
        ({"params": 0.25}, ParamsTarget(0.25)),
        ({"rank": 0.5}, RankTarget(0.5)),
        ({"bytes": "40MB"}, BytesTarget(40e6)),
        ({"bytes": "2GiB"}, BytesTarget(2.0 * 2**30)),
        ({"bytes": " 1.5 kb "}, BytesTarget(1500.0)),
        ({"bytes": 1000}, BytesTarget(1000.0)),
        ({"bits": 2.5}, BitsTarget(2.5)),
        ({"bits": 32}, BitsTarget(32.0)),
    ],
)
def test_parse_target(raw, expected):
    target = parse_target(raw, "t")
    assert target == expected and type(target) is type(expected)
    assert isinstance(target.value, float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (0, "t: expected a fraction in (0, 1], got 0"),
        (-0.5, "t: expected a fraction in (0, 1], got -0.5"),
        (1.5, "t: expected a fraction in (0, 1], got 1.5"),
        ({"rank": 0}, "t: expected a fraction in (0, 1], got 0"),
        ({"bits": 64}, "t: expected bits per weight in (0, 32], got 64"),
        ({"bits": 0}, "t: expected bits per weight in (0, 32], got 0"),
        ({"bytes": 0}, "t: expected a positive number of bytes, got 0"),
        ({"bytes": "lots"}, "t: expected a size such as 40MB or 2.5GiB, got 'lots'"),
        ({"bits": "x"}, "t.bits: expected a number, got 'x'"),
        ({"rank": True}, "t.rank: expected a number, got True"),
        ({"size": 3}, "t: expected one of params, rank, bytes, bits, got 'size'"),
        (True, "t: expected a number in (0, 1] or a table like {rank = 0.5}, got True"),
        ({"rank": 0.5, "bits": 2}, "t: expected a number in (0, 1] or a table like {rank = 0.5}, got"),
        ("0.5", "t: expected a number in (0, 1] or a table like {rank = 0.5}, got '0.5'"),
    ],
)
def test_parse_target_errors(raw, message):
    with pytest.raises(harness.HarnessError) as info:
        parse_target(raw, "t")
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("raw", [0.8, {"rank": 0.5}, {"bits": 2.5}, {"bytes": "40MB"}, {"bytes": "2.5MB"}])
def test_label_round_trip(raw):
    target = parse_target(raw, "t")
    name, text = target.label.split("=")
    back = float(text) if name == "keep" else {name: text if name == "bytes" else float(text)}
    assert parse_target(back, "t") == target


# ---------------------------------------------------------------- costs and budgets
def test_costs_by_kind(facts):
    a, b = facts
    params, rank, size, bits = Target("params", 0.5), Target("rank", 0.5), Target("bytes", 100), Target("bits", 12)
    assert [params.cost(a, r, DTYPE_BYTES) for r in (0, 1, 2, None)] == [0, 10, 20, 24]
    assert [rank.cost(a, r, DTYPE_BYTES) for r in (0, 1, 2, None)] == [0, 1, 2, 4]
    assert [size.cost(a, r, DTYPE_BYTES) for r in (0, 1, 2, None)] == [0, 20, 40, 48]
    assert [bits.cost(b, r, DTYPE_BYTES) for r in (1, None)] == [24, 40]
    assert params.costs(a, [1, 3], DTYPE_BYTES) == [10, 30] and bits.costs(b, [2], DTYPE_BYTES) == [48]
    assert rank.costs(b, [0, 2], DTYPE_BYTES) == [0, 2]


def test_budgets_by_hand(facts):
    assert Target("params", 0.5).budget(facts, DTYPE_BYTES) == 22.0  # 0.5 x 44
    assert Target("params", 0.5).limit(facts, DTYPE_BYTES) == 22.0 + 1e-9
    assert Target("rank", 0.5).budget(facts, DTYPE_BYTES) == 3.0  # 0.5 x (4 + 2)
    assert Target("bytes", 100).budget(facts, DTYPE_BYTES) == 100.0
    assert Target("bytes", 100).limit(facts, DTYPE_BYTES) == 100.0
    assert Target("bits", 12).budget(facts, DTYPE_BYTES) == 66.0  # 12 bits x 44 weights / 8
    assert Target("bits", 2.5).budget_bytes(1000) == 312.5 and Target("bytes", 7.0).budget_bytes(1000) == 7.0
    with pytest.raises(ValueError, match="params target has no byte budget"):
        Target("params", 0.5).budget_bytes(1000)


def test_fits_by_hand(facts):
    params = Target("params", 0.5)  # 22 parameters
    assert params.assignment_cost(facts, [1, 1], DTYPE_BYTES) == 22 and params.fits(facts, [1, 1], DTYPE_BYTES)
    assert not params.fits(facts, [2, 1], DTYPE_BYTES)  # 20 + 12
    assert not params.fits(facts, [1, None], DTYPE_BYTES)  # 10 + 20
    bits = Target("bits", 12)  # 66 bytes
    assert bits.fits(facts, [2, 1], DTYPE_BYTES)  # 40 + 24 = 64
    assert bits.fits(facts, [1, None], DTYPE_BYTES)  # 20 + 40 = 60
    assert not bits.fits(facts, [2, None], DTYPE_BYTES)  # 40 + 40 = 80
    rank = Target("rank", 0.5)  # 3 of 6
    assert rank.fits(facts, [2, 1], DTYPE_BYTES) and rank.fits(facts, [3, 0], DTYPE_BYTES)
    assert not rank.fits(facts, [3, 1], DTYPE_BYTES)
    assert not rank.fits(facts, [2, None], DTYPE_BYTES)  # a dense group keeps its full rank: 2 + 2
    assert rank.fits(facts, [1, None], DTYPE_BYTES)


def test_per_matrix_shares(facts):
    # keep 0.5: (4, 6) may hold 12 -> rank 1 (10); (10, 2) may hold 10 -> rank 0 (12 > 10)
    assert Target("params", 0.5).per_matrix(facts) == [1, 0]
    assert Target("params", 1.0).per_matrix(facts) == [None, None]
    assert Target("rank", 0.5).per_matrix(facts) == [2, 1]  # round(0.5 x 4), round(0.5 x 2)
    assert Target("rank", 0.1).per_matrix(facts) == [1, 1]  # at least 1
    assert Target("rank", 1.0).per_matrix(facts) == [None, None]
    assert Target("bytes", 100).per_matrix(facts) is None and Target("bits", 4).per_matrix(facts) is None


# ---------------------------------------------------------------- reachability
def test_unreachable_below_the_smallest_model(facts):
    tiny = Shape(1, 1)  # rank 1 holds 2 > 1 dense parameter: the smallest model keeps it dense
    three = [*facts, tiny]
    # smallest model: 10 + 12 + 1 = 23 parameters, 46 bytes (dense 45 parameters)
    assert Target("params", 0.5).unreachable(three, DTYPE_BYTES) == (23, 22.5)
    assert Target("params", 0.52).unreachable(three, DTYPE_BYTES) is None  # 23.4 parameters
    assert Target("bytes", 45).unreachable(three, DTYPE_BYTES) == (46, 45.0)
    assert Target("bytes", 46).unreachable(three, DTYPE_BYTES) is None
    assert Target("bits", 8).unreachable(three, DTYPE_BYTES) == (46, 45.0)  # 8 x 45 / 8
    assert Target("bits", 8.2).unreachable(three, DTYPE_BYTES) is None  # 46.125 bytes
    assert Target("rank", 0.01).unreachable(three, DTYPE_BYTES) is None  # never: a rank target keeps rank >= 1
    assert Target("params", 0.01).unreachable([], DTYPE_BYTES) is None
    units = [Target(kind, 0.5).unit for kind in ("params", "rank", "bytes", "bits")]
    assert units == ["parameters", "rank", "bytes", "bytes"]


# ---------------------------------------------------------------- one bisection
def test_largest_fitting_by_hand():
    found = harness.largest_fitting(lambda k: [math.floor(10 * k)], lambda a: a[0] <= 3)
    assert found.ranks == [3] and found.over == [4]
    assert 0.4 - 2**-49 < found.knob < 0.4  # the largest knob found with floor(10 k) <= 3
    assert harness.largest_fitting(lambda k: [math.floor(10 * k)], lambda a: a[0] <= 20) == ([10], None, 1.0)
    assert harness.largest_fitting(lambda k: [1 + math.floor(10 * k)], lambda a: a[0] <= 0) is None
    calls = []
    harness.largest_fitting(lambda k: calls.append(k) or [0 if k < 0.5 else 1], lambda a: a[0] == 0, steps=7)
    assert len(calls) == 2 + 7


# ---------------------------------------------------------------- a new kind is one class
@pytest.fixture
def count_kind(monkeypatch):
    """A kind registered for one test: at most ``value`` parameters kept, absolute."""
    monkeypatch.setattr("harness.targets.KINDS", dict(targets.KINDS))

    class CountTarget(harness.Target):
        kind = "count"
        unit = "parameters"

        @property
        def label(self) -> str:
            return f"count={self.value:,.0f}"

        def check(self, key):
            if self.value <= 0:
                raise harness.HarnessError(f"{key}: expected a positive count, got {self.value:g}")
            return self

        def cost(self, fact, rank, dtype_bytes):
            return fact.dense_params if rank is None else fact.params(rank)

        def budget(self, facts, dtype_bytes):
            return self.value

    return CountTarget


def test_a_new_kind_works_end_to_end(count_kind, facts):
    target = parse_target({"count": 30}, "t")
    assert type(target) is count_kind and target == Target("count", 30.0) and target.label == "count=30"
    assert target.to_dict() == {"kind": "count", "value": 30.0}
    with pytest.raises(harness.HarnessError, match="t: expected a positive count, got -1"):
        parse_target({"count": -1}, "t")
    with pytest.raises(harness.HarnessError, match="expected one of params, rank, bytes, bits, count"):
        parse_target({"size": 1}, "t")
    ctx = AllocationContext(seed=0, layers={}, dtype_bytes=DTYPE_BYTES, log=lambda msg: None)
    # uniform's common kept fraction: [1, 0] (10) up to keep 0.6, [1, 1] (22) up to 5/6, then [2, 1] (32)
    assert Uniform().allocate(facts, target, None, ctx) == [1, 1]
    assert Uniform().allocate(facts, Target("count", 35), None, ctx) == [2, 1]
    with pytest.raises(harness.HarnessError, match="smaller than the smallest factorization"):
        Uniform().allocate(facts, Target("count", -1.0), None, ctx)
    assert Target("count", 20).unreachable(facts, DTYPE_BYTES) == (22, 20)  # every matrix at rank 1


def test_a_kind_name_is_registered_once(count_kind):
    with pytest.raises(TypeError, match="target kind 'params' is already registered by ParamsTarget"):

        class Other(harness.Target):
            kind = "params"


# ---------------------------------------------------------------- bytes scope: decomposable or whole model
def tiny_model(tied: bool = False):
    """Embedding 10x4, one block (q 4x4 with bias, up 6x4, down 4x6 with bias, a norm), final norm, head 10x4."""
    import torch
    from torch import nn

    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    block = nn.Module()
    block.q_proj, block.up_proj, block.down_proj = nn.Linear(4, 4), nn.Linear(4, 6, bias=False), nn.Linear(6, 4)
    block.norm = nn.Parameter(torch.ones(4))
    model.block = block
    model.norm = nn.Parameter(torch.ones(4))
    model.lm_head = nn.Linear(4, 10, bias=False)
    if tied:
        model.lm_head.weight = model.embed.weight
    return model


DECOMPOSABLE = ["block.q_proj", "block.up_proj", "block.down_proj"]


def test_other_params_by_hand():
    # embedding 40 + head 40 + norms 4 + 4 + biases of q and down 4 + 4 = 96 (decomposable weights 16 + 24 + 24)
    assert targets.other_params(tiny_model(), DECOMPOSABLE) == 96
    assert targets.other_params(tiny_model(tied=True), DECOMPOSABLE) == 56  # the tied head counted once
    assert targets.other_params(tiny_model(), DECOMPOSABLE[:1]) == 96 + 48  # up and down stay dense


def test_model_scope_budget_is_the_value_less_the_rest_at_fp16(facts):
    target = parse_target({"bytes": "1KB", "scope": "model"}, "t")
    assert isinstance(target, BytesTarget) and target.scope == "model"
    bound = target.for_model(tiny_model(), DECOMPOSABLE)
    assert bound.other_params == 96 and bound.other_bytes() == 192
    assert bound.budget(facts, DTYPE_BYTES) == 1000 - 192
    assert bound.budget(facts, 4) == 1000 - 192  # the rest counts at fp16 whatever the model's dtype
    assert bound.model_bytes(100) == 292  # decomposable bytes beside whole-model bytes
    assert bound.unreachable(facts, DTYPE_BYTES) is None
    assert parse_target({"bytes": 230, "scope": "model"}, "t").for_model(tiny_model(), DECOMPOSABLE).unreachable(
        facts, DTYPE_BYTES
    ) == (44, 38.0)  # smallest model: rank 1 of both (20 + 24 bytes) against 230 - 192
    with pytest.raises(harness.HarnessError, match=r'scope = "model" needs the rest of the model'):
        target.budget(facts, DTYPE_BYTES)
    default = Target("bytes", 1000.0)
    assert default.for_model(tiny_model(), DECOMPOSABLE) is default and default.budget(facts, DTYPE_BYTES) == 1000


def test_model_scope_identity_and_default_scope_unchanged():
    model = parse_target({"bytes": "40MB", "scope": "model"}, "t")
    assert model.to_dict() == {"kind": "bytes", "value": 4e7, "scope": "model"}
    assert model.label == "model_bytes=40MB" and "scope='model'" in repr(model)
    assert model != Target("bytes", 4e7) and hash(model) != hash(Target("bytes", 4e7))
    assert model == model.for_model(tiny_model(), DECOMPOSABLE)  # binding is not part of the identity
    explicit = parse_target({"bytes": "40MB", "scope": "decomposable"}, "t")
    assert explicit == Target("bytes", 4e7) and explicit.to_dict() == {"kind": "bytes", "value": 4e7}
    assert hash(explicit) == hash(("bytes", 4e7)) and repr(explicit) == "Target(kind='bytes', value=40000000.0)"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"bytes": "1MB", "scope": "all"}, "t.scope: expected 'decomposable' or 'model', got 'all'"),
        ({"bytes": "1MB", "where": "x"}, "t.where: unknown key for a bytes target (known: bytes, scope)"),
        ({"params": 0.5, "scope": "model"}, "t.scope: unknown key for a params target (it takes only params)"),
        ({"bytes": 0, "scope": "model"}, "t: expected a positive number of bytes, got 0"),
    ],
)
def test_scope_errors(raw, message):
    with pytest.raises(harness.HarnessError) as info:
        parse_target(raw, "t")
    assert str(info.value) == message
