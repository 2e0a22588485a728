"""Per-group factor files (issue 16, points 2 and 4): bitwise round trips, a rank-k read touching only
the first k rows of the file, corrupt files named in one line and factorized again, the suite's
``[factorization] keep = "disk"`` giving the numbers and cell ids of ``keep = "memory"``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from harness_svd import SVD

import harness
from harness.factorfiles import FactorFileError, MappedLowRank, MethodFiles, open_group
from harness.factorization import StoredLowRank
from harness.plugins import get_plugins
from harness.ray import factstore
from tests.test_factstore import bitstack, same, trawl

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
ROOTS = {"harness_svd", "harness_trawl", "harness_bitstack"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def stored(dtype: torch.dtype = torch.float32, m: int = 14, n: int = 10, keep: int = 6) -> StoredLowRank:
    """A compacted SVD of a random m x n weight in ``dtype`` (kept in ``dtype``: the factors' out dtype)."""
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    fact = SVD().factorize({"w": W}, {}, SVD.Options(), CTX).compact(keep, dtype=torch.float32)
    assert isinstance(fact, StoredLowRank) and fact.A.dtype == dtype
    return fact


def files(tmp_path: Path, identity: dict | None = None) -> MethodFiles:
    return MethodFiles(tmp_path / "method", identity or {"method": "svd"}, ROOTS)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise_at_every_stored_rank(tmp_path, dtype):
    fact = stored(dtype)
    store = files(tmp_path)
    kept = store.finish([store.put(fact)], 2.5)
    (back,), seconds = files(tmp_path).load()
    assert seconds == 2.5 and isinstance(kept[0], MappedLowRank) and isinstance(back, MappedLowRank)
    assert (back.names, back.shapes, back.info, back.stored_rank) == (fact.names, fact.shapes, fact.info, 6)
    assert list(back.ranks) == list(fact.ranks) and back.full_rank == fact.full_rank == 10
    assert [back.error(r) for r in fact.ranks] == [fact.error(r) for r in fact.ranks]
    assert [back.params(r) for r in fact.ranks] == [fact.params(r) for r in fact.ranks]
    for rank in (0, 1, 3, 6):
        a, b = fact.materialize(rank)["w"], back.materialize(rank)["w"]
        assert a.A.dtype == b.A.dtype == dtype and b.A.is_contiguous() and b.B.is_contiguous()
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), rank
    with pytest.raises(ValueError, match="rank 7 is beyond the 6 ranks"):
        back.materialize(7)
    assert [p.name for p in sorted((tmp_path / "method").iterdir())] == ["factors.json", "group-0000.safetensors"]


@pytest.mark.parametrize("make", [trawl, bitstack])
def test_other_factorizations_fall_back_to_the_encoded_tree(tmp_path, make):
    original = make()
    store = files(tmp_path)
    assert store.finish([original], 0.5) == [original]  # kept as the method left it
    (back,), _ = files(tmp_path).load()
    assert type(back) is type(original) and (tmp_path / "method" / "group-0000.pt").exists()
    for rank in list(original.ranks)[1:3]:
        expected, got = original.materialize(rank), back.materialize(rank)
        assert expected.keys() == got.keys() and all(same(expected[k], got[k]) for k in expected)


def test_a_mapped_factorization_holds_no_factor_and_pickles_as_its_path(tmp_path):
    import pickle

    fact = stored()
    mapped = files(tmp_path).put(fact)
    assert not any(isinstance(v, torch.Tensor) for v in vars(mapped).values())
    again = pickle.loads(pickle.dumps(mapped))
    assert again.path == mapped.path and torch.equal(again.materialize(4)["w"].B, fact.materialize(4)["w"].B)


# ---------------------------------------------------------------- a rank-k read touches k rows
def tensor_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of each tensor in a safetensors file (its documented layout: u64 header size, JSON, data)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    base = 8 + size
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k[0] != "_"}


def test_a_rank_k_read_touches_only_the_first_k_rows(tmp_path):
    fact = stored(m=14, n=10, keep=6)
    path = files(tmp_path).put(fact).path
    k, itemsize = 3, 4
    raw = bytearray(path.read_bytes())
    offsets = tensor_offsets(path)
    for key, width in (("Ut", 14), ("B", 10)):
        start, end = offsets[key]
        assert end - start == 6 * width * itemsize  # rank first: row i is component i
        poison = struct.pack("<f", float("nan")) * ((end - start) // itemsize - k * width)
        raw[start + k * width * itemsize : end] = poison  # every row from k on
    path.write_bytes(bytes(raw))
    back = open_group(path, ROOTS, tag=files(tmp_path).tag)
    a, b = fact.materialize(k)["w"], back.materialize(k)["w"]
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)  # rows >= k were never read
    assert back.materialize(k + 1)["w"].A[:, k].isnan().all()  # the poison is where rank k + 1 reads


# ---------------------------------------------------------------- corrupt files
def test_a_truncated_or_garbage_file_is_one_line_naming_it(tmp_path):
    store = files(tmp_path)
    store.finish([store.put(stored())], 1.0)
    path = tmp_path / "method" / "group-0000.safetensors"
    whole = path.read_bytes()
    for broken in (whole[: len(whole) // 2], b"\x00" * 64, b"not safetensors at all"):
        path.write_bytes(broken)
        with pytest.raises(FactorFileError) as info:
            files(tmp_path).load()
        message = str(info.value)
        assert message.startswith(f"{path}: cannot read stored factors") and "\n" not in message


def test_an_unreadable_file_is_factorized_again_and_rewritten(tmp_path, capsys):
    from harness.run import diskfactors

    store = files(tmp_path)
    store.finish([store.put(stored())], 1.0)
    path = tmp_path / "method" / "group-0000.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert diskfactors.reuse(files(tmp_path)) is None
    assert f"warning: {path}: cannot read stored factors" in capsys.readouterr().err
    again = files(tmp_path)
    again.finish([again.put(stored())], 1.0)
    (back,), _ = files(tmp_path).load()
    assert torch.equal(back.materialize(6)["w"].A, stored().materialize(6)["w"].A)


def test_files_of_another_identity_are_not_reused_and_are_replaced(tmp_path):
    store = files(tmp_path, {"method": "svd", "targets": [0.5]})
    store.finish([store.put(stored(keep=6))], 1.0)
    other = files(tmp_path, {"method": "svd", "targets": [0.9]})
    assert other.load() is None
    other.finish([other.put(stored(keep=3))], 2.0)
    (back,), seconds = files(tmp_path, {"method": "svd", "targets": [0.9]}).load()
    assert seconds == 2.0 and back.stored_rank == 3
    assert files(tmp_path, {"method": "svd", "targets": [0.5]}).load() is None


def test_a_group_without_a_manifest_is_not_reused(tmp_path):
    store = files(tmp_path)
    store.put(stored())  # interrupted before ``finish``
    assert files(tmp_path).load() is None


def test_what_cannot_be_stored_stays_in_memory_without_a_manifest(tmp_path):
    from tests.test_factstore import Holder

    store = files(tmp_path)
    mapped = store.put(stored())
    odd = Holder(lambda: 0)
    with pytest.raises(factstore.Unsupported) as info:
        store.finish([mapped, odd], 1.0)
    assert info.value.kept == [mapped, odd] and not store.manifest.exists()


# ---------------------------------------------------------------- the suite option, end to end
SUITE = """
name = "disk"
device = "cpu"
dtype = "float32"
models = ["{tiny}"]
targets = [0.9, 0.5]
[[methods]]
name = "svd"
[[evaluators]]
name = "perplexity"
options = {{ seqlen = 16, max_windows = 2 }}
[factorization]
keep = "{keep}"
"""


def session(tmp_path: Path, tiny: Path, keep: str):
    from harness.run.env import RunOptions
    from harness.run.runner import SuiteRunner
    from harness.suite import load_suite

    path = tmp_path / f"{keep}.toml"
    path.write_text(SUITE.format(tiny=tiny, keep=keep))
    suite = load_suite(path)
    runner = SuiteRunner(suite, RunOptions(results_root=tmp_path / "results", progress=False))
    return runner.open_session(str(tiny))


def test_disk_mode_gives_the_numbers_and_cell_ids_of_memory_mode(tmp_path, tiny_model_dir, capsys):
    from harness.run import diskfactors

    results = {}
    for keep in ("memory", "disk"):
        current = session(tmp_path, tiny_model_dir, keep)
        method = current.env.suite.methods[0]
        factorizations, seconds = diskfactors.factorize(current.prepared, method)
        mapped = all(isinstance(f, MappedLowRank) for f in factorizations)
        assert mapped == (keep == "disk")
        cells = current.cells()[1:]
        results[keep] = {c.id: current.compute_cell(c, factorizations, seconds) for c in cells}
    assert results["memory"].keys() == results["disk"].keys()
    for cell_id, record in results["memory"].items():
        disk = results["disk"][cell_id]
        assert disk.status == record.status == "ok" and disk.metrics == record.metrics
        assert (disk.ranks, disk.sizes) == (record.ranks, record.sizes)
    folder = tmp_path / "results" / "disk" / "factors"
    groups = sorted(folder.glob("*/svd/group-*.safetensors"))
    assert len(groups) == 14 and len(list(folder.glob("*/svd/factors.json"))) == 1  # 2 blocks x 7 Linears

    capsys.readouterr()
    current = session(tmp_path, tiny_model_dir, "disk")
    again, _ = diskfactors.factorize(current.prepared, current.env.suite.methods[0])
    assert "factorizations reused from" in capsys.readouterr().err
    assert [f.path for f in again] == groups


def test_keep_and_offload_options_and_cell_ids(tmp_path):
    from harness.run.cells import expand
    from harness.suite import load_suite

    base = 'name = "s"\nmodels = ["embedded"]\ntargets = [0.5]\n[[methods]]\nname = "svd"\n'
    variants = {
        "default": "",
        "disk": '[factorization]\nkeep = "disk"\n',
        "offload": "[surgery]\noffload_originals = true\n",
        "no-offload": "[surgery]\noffload_originals = false\n",
    }
    suites = {}
    for name, extra in variants.items():
        (tmp_path / f"{name}.toml").write_text(base + extra)
        suites[name] = load_suite(tmp_path / f"{name}.toml", get_plugins())
    assert suites["default"].factorization.keep == "memory" and suites["disk"].factorization.keep == "disk"
    assert suites["default"].surgery.offload_originals == "auto" and suites["offload"].surgery.offload_originals is True
    ids = {name: [c.id for c in expand(s, "m", {"model": "f"}, {"harness": "1"})] for name, s in suites.items()}
    assert ids["disk"] == ids["default"] == ids["offload"] == ids["no-offload"]
    for key, value, expected in (
        ("factorization", 'keep = "ssd"', "factorization.keep: expected 'memory' or 'disk', got 'ssd'"),
        ("surgery", "offload_originals = 1", "surgery.offload_originals: expected true or false or 'auto', got 1"),
        ("surgery", 'offload_originals = "yes"', "surgery.offload_originals: expected true or false or 'auto'"),
    ):
        (tmp_path / "bad.toml").write_text(base + f"[{key}]\n{value}\n")
        with pytest.raises(harness.HarnessError, match=f"bad.toml: {expected}"):
            load_suite(tmp_path / "bad.toml", get_plugins())


def test_finishing_twice_or_after_reading_writes_nothing_twice(tmp_path):
    """The session's writer and the Ray task's may both finish one method: the files stay as written."""
    store = files(tmp_path)
    first = store.finish([store.put(stored()), trawl()], 1.0)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "method").glob("group-*")}
    assert store.finish(first, 1.0) == first
    found, _ = files(tmp_path).load()
    reader = files(tmp_path)
    reader.finish(reader.load()[0], 1.0)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "method").glob("group-*")} == stamps
    assert [type(f).__name__ for f in found] == ["MappedLowRank", type(first[1]).__name__]
