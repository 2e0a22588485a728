"""Stored factorizations (the Ray executor shares them through the results store): written and read
back bit for bit for every kind the built-in methods return, read with torch.load(weights_only=True),
and nothing outside the harness and its plugins is ever rebuilt."""

from __future__ import annotations

import pytest
import torch
from harness_bitstack import BitStack
from harness_svd import SVD
from harness_trawl import TrawlCP
from torch import nn

import harness
from harness.factorization import Dense, LowRank, ProjectionFactorization
from harness.options import parse_options
from harness.plugins import get_plugins
from harness.ray import factstore

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
NAME = "model.layers.0.mlp.up_proj"


def weight(m: int = 12, n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def svd():
    return SVD().factorize({NAME: weight()}, {}, parse_options(SVD.Options, {}, "methods.svd"), CTX)


def projection():
    W = weight()
    eigvals, U = torch.linalg.eigh(W @ W.T)
    return ProjectionFactorization(NAME, W, U.flip(1), eigvals.flip(0), info={"jitter": 0.0, "ranks": range(3)})


def bitstack():
    stats = harness.LayerStats(tokens=4, abs_mean=torch.ones(8), sq_mean=torch.ones(8))
    options = parse_options(BitStack.Options, {"niter": 3, "k": 2, "seqlen": 16, "statistic": "l2"}, "methods.bitstack")
    return BitStack().factorize({NAME: weight()}, {NAME: stats}, options, CTX)


def trawl():
    weights = {f"model.layers.0.mlp.{k}": weight(12, 8, i) for i, k in enumerate(("gate_proj", "up_proj"))}
    options = parse_options(TrawlCP.Options, {"ranks": [2, 3]}, "methods.trawl")
    return TrawlCP().factorize(weights, {}, options, CTX)


def same(a, b) -> bool:
    if isinstance(a, LowRank):
        return torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    if isinstance(a, Dense):
        return torch.equal(a.weight, b.weight)
    x = torch.randn(3, a.in_features, generator=torch.Generator().manual_seed(1))
    return type(a) is type(b) and torch.equal(a(x), b(x))


@pytest.mark.parametrize("make", [svd, projection, bitstack, trawl])
def test_round_trip_is_exact(make, tmp_path):
    original = make()
    factstore.save(tmp_path / "f.pt", [original], 1.5)
    (loaded,), seconds = factstore.load(tmp_path / "f.pt", factstore.plugin_roots(get_plugins()))
    assert seconds == 1.5 and type(loaded) is type(original)
    assert loaded.names == original.names and loaded.shapes == original.shapes and loaded.info == original.info
    assert list(loaded.ranks) == list(original.ranks)
    for rank in list(original.ranks)[1:3]:
        assert loaded.error(rank) == original.error(rank) and loaded.params(rank) == original.params(rank)
        replaced, expected = loaded.materialize(rank), original.materialize(rank)
        assert replaced.keys() == expected.keys()
        assert all(same(expected[k], replaced[k]) for k in expected)


def test_plugin_roots_name_the_plugin_packages():
    assert {"harness_svd", "harness_bitstack", "harness_trawl"} <= factstore.plugin_roots(get_plugins())


class Holder(harness.Factorization):
    """A factorization holding something that must not be pickled."""

    def __init__(self, value) -> None:
        self.names, self.shapes, self.info, self.value = ("a",), ((2, 2),), {}, value

    ranks = property(lambda self: [0])
    params = error = materialize = lambda self, rank: 0


@pytest.mark.parametrize("value", [nn.Linear(2, 2), lambda: 0, object()])
def test_what_cannot_be_stored_is_refused_when_writing(value, tmp_path):
    with pytest.raises(factstore.Unsupported):
        factstore.save(tmp_path / "f.pt", [Holder(value)], 0.0)
    assert not (tmp_path / "f.pt").exists()


@pytest.mark.parametrize(
    "path, message",
    [
        ("os:system", "outside the harness"),
        ("collections:OrderedDict", "outside the harness"),
        ("harness.store:ResultStore", "not a Factorization or dataclass"),
    ],
)
def test_reading_rebuilds_only_allowed_classes(path, message, tmp_path):
    payload = {"format": factstore.FORMAT, "seconds": 0.0, "factorizations": (factstore.TAG, "object", (path, {}))}
    torch.save(payload, tmp_path / "f.pt")
    with pytest.raises(ValueError, match=message):
        factstore.load(tmp_path / "f.pt", ["harness_svd"])
