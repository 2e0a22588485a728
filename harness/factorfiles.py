"""Factorizations on disk, one file per group, read back memory-mapped (issue 16, points 2 and 4).

A method's factorizations live in one directory::

    group-0000.safetensors   a compacted single-matrix factorization (``StoredLowRank``)
    group-0001.pt            any other kind (TRAWL's, BitStack's): ``harness.ray.factstore``'s encoding
    factors.json             the manifest, written last: identity, seconds, the files in list order

A ``.safetensors`` group holds ``Ut`` (K, m), the left factor transposed, and
``B`` (K, n), so that the first k components of each are the first k rows: a
read of rank k touches k/K of the bytes (``safe_open(...).get_slice(...)[:k]``
reads just those rows from the memory-mapped file), and ``tail`` (the error
curve, float64). Everything else (class, names, shapes, ranks, dtypes, info,
format) is JSON in the header's metadata. ``open_group`` returns a
``MappedLowRank``: the factorization with no tensor in memory, whose
``materialize(k)`` reads ranks <= k only and brings them to its device.

Every file is written to a temporary name beside it and renamed
(``os.replace``); the manifest goes last, so a directory without one is
incomplete. A file that cannot be read (truncated, garbage, another format)
raises ``FactorFileError``, one line naming it; callers then factorize again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.errors import first_line
from harness.factorization import Factorization, StoredLowRank, check_stored
from harness.ray import factstore
from harness.store import atomic_write, atomic_write_json, canonical_json, storage_error

FORMAT = 1
MANIFEST = "factors.json"
KEY = "harness"
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


class FactorFileError(ValueError):
    """A stored factor file cannot be read: the message is one line naming the file."""


class Incomplete(factstore.Unsupported):
    """``finish`` could not store every group: ``kept`` is what to keep (those it could, memory-mapped)."""

    def __init__(self, kept: list[Factorization], cause: factstore.Unsupported) -> None:
        super().__init__(str(cause))
        self.kept = kept


# ---------------------------------------------------------------- header values
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_ranks(ranks: Sequence[int]) -> Any:
    return {"range": [ranks.start, ranks.stop, ranks.step]} if isinstance(ranks, range) else [int(r) for r in ranks]


def decode_ranks(value: Any) -> Sequence[int]:
    return range(*value["range"]) if isinstance(value, dict) else list(value)


def encode_info(info: dict) -> str:
    """``info`` as JSON of ``factstore.encode``'s tree; TypeError where it holds a tensor (or similar)."""
    return json.dumps(factstore.encode(dict(info)), allow_nan=True)


def decode_info(text: str, roots: Iterable[str]) -> dict:
    return factstore.Decoder(roots)(_tuples(json.loads(text)))


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples ``factstore.encode`` wrote (its Decoder reads tagged tuples)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- one group
def write_group(path: Path, fact: Factorization, tag: str = "") -> Path:
    """Write ``fact`` to ``path`` (``.safetensors`` for a ``StoredLowRank``, else ``.pt``); the path written.

    ``tag`` (the identity's hash) is kept in the file, so that a reader can
    tell it belongs to the manifest beside it. ``factstore.Unsupported`` where a
    factorization of another kind holds something that cannot be stored.
    """
    if isinstance(fact, StoredLowRank):
        try:
            header = low_rank_header(fact, tag)
        except TypeError:  # info holds a tensor or similar: the general encoding stores it
            header = None
        if header is not None:
            path = path.with_suffix(".safetensors")
            write_safetensors(path, low_rank_tensors(fact), {KEY: json.dumps(header)})
            return path
    path = path.with_suffix(".pt")
    payload = {"format": FORMAT, "tag": tag, "factorization": factstore.encode(fact)}
    atomic_write(path, lambda stream: torch.save(payload, stream))
    return path


def low_rank_header(fact: StoredLowRank, tag: str) -> dict:
    return {
        "format": FORMAT,
        "class": factstore.class_path(MappedLowRank),
        "tag": tag,
        "names": list(fact.names),
        "shapes": [list(s) for s in fact.shapes],
        "ranks": encode_ranks(fact.ranks),
        "stored_rank": fact.stored_rank,
        "out_dtype": dtype_name(fact.out_dtype),
        "device": str(fact.device),
        "info": encode_info(fact.info),
    }


def low_rank_tensors(fact: StoredLowRank) -> dict[str, torch.Tensor]:
    """``Ut`` (K, m) and ``B`` (K, n) in the storage dtype, rank first, and the error curve ``tail``."""
    A, B = fact.folded(fact.stored_rank)
    return {
        "Ut": A.T.detach().to("cpu").contiguous(),
        "B": B.detach().to("cpu").contiguous(),
        "tail": torch.tensor(fact._tail, dtype=torch.float64),
    }


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``safetensors`` file written to a temporary name beside ``path``, fsynced, then renamed over it."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:  # a full disk or read-only directory: one line naming it
        raise storage_error(exc, path) from None
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        check_length(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise storage_error(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_length(path: Path) -> None:
    """OSError(ENOSPC) where the safetensors file is shorter than its header says: safetensors does not
    report every failed write (a full disk can leave a short file behind a successful ``save_file``)."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        try:
            header = json.loads(stream.read(length)) if length <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise OSError(errno.ENOSPC, f"short write: {size} bytes, the header incomplete", str(path))
    expected = 8 + length + max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if size < expected:
        raise OSError(errno.ENOSPC, f"short write: {size} of {expected} bytes", str(path))


def open_group(path: Path, roots: Iterable[str], device: torch.device | None = None, tag: str = "") -> Factorization:
    """The factorization in ``path``; FactorFileError (one line naming it) where it cannot be read.

    A ``.safetensors`` group comes back as a ``MappedLowRank`` (nothing read but
    its header and error curve); ``device`` is where it materializes (None: where
    it was computed). A ``.pt`` group is read whole (tensors memory-mapped, on
    the device they were saved from, as ``factstore.load`` does).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return MappedLowRank.open(path, roots, device, tag)
        return _open_pt(path, roots, tag)
    except FactorFileError:
        raise
    except Exception as exc:  # safetensors' and torch's own errors, a bad header, a missing file
        raise FactorFileError(f"{path}: cannot read stored factors ({first_line(exc)})") from None


def _open_pt(path: Path, roots: Iterable[str], tag: str) -> Factorization:
    location = None if torch.cuda.is_available() else "cpu"
    payload = torch.load(path, map_location=location, weights_only=True, mmap=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("tag") != tag:
        raise FactorFileError(f"{path}: not a stored factorization of this manifest (format {FORMAT})")
    fact = factstore.Decoder(roots)(payload["factorization"])
    if not isinstance(fact, Factorization):
        raise FactorFileError(f"{path}: holds a {type(fact).__name__}, not a Factorization")
    return fact


class MappedLowRank(StoredLowRank):
    """A ``StoredLowRank`` whose factors stay in its file until a rank is asked for.

    ``ranks``, ``error``, ``params`` and ``stored_rank`` come from the header;
    ``folded(k)`` reads rows < k of ``Ut`` and ``B`` from the memory-mapped file
    (nothing else), so ``materialize(k)`` returns exactly what the in-memory
    ``StoredLowRank`` it was written from returns, on ``device``. The file is
    opened on first use and kept open (one mapping per group); pickling keeps
    the path only.
    """

    def __init__(self, path: Path, header: dict, tail: list[float], device: torch.device, info: dict) -> None:
        self.path = Path(path)
        self.names = tuple(header["names"])
        self.shapes = tuple((int(m), int(n)) for m, n in header["shapes"])
        self._ranks, self._tail = decode_ranks(header["ranks"]), tail
        self._stored = int(header["stored_rank"])
        self.out_dtype, self.device = DTYPES[header["out_dtype"]], torch.device(device)
        self.info = info
        self.tag = str(header.get("tag", ""))
        self._handle: Any = None

    @classmethod
    def open(cls, path: Path, roots: Iterable[str], device: torch.device | None, tag: str) -> MappedLowRank:
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt", device="cpu")
        header = json.loads((handle.metadata() or {}).get(KEY, "null"))
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise FactorFileError(f"{path}: not a harness factor file of format {FORMAT}")
        if header.get("tag") != tag:
            raise FactorFileError(f"{path}: written for other factorizations than its manifest's")
        (m, n), K = header["shapes"][0], int(header["stored_rank"])
        for key, shape in (("Ut", [K, m]), ("B", [K, n])):
            if handle.get_slice(key).get_shape() != shape:
                raise FactorFileError(f"{path}: {key} is {handle.get_slice(key).get_shape()}, expected {shape}")
        tail = handle.get_tensor("tail").tolist()
        fact = cls(path, header, tail, device or torch.device(header["device"]), decode_info(header["info"], roots))
        fact._handle, fact.tag = handle, tag
        return fact

    @property
    def stored_rank(self) -> int:
        return self._stored

    @property
    def A(self) -> torch.Tensor:
        return self.folded(self._stored)[0]

    @property
    def B(self) -> torch.Tensor:
        return self.folded(self._stored)[1]

    def rows(self, key: str, rank: int) -> torch.Tensor:
        """Rows < ``rank`` of the stored tensor ``key`` (only those bytes of the file are read)."""
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle.get_slice(key)[:rank]

    def folded(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_stored(self, rank)
        return self.rows("Ut", rank).T, self.rows("B", rank)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}


# ---------------------------------------------------------------- a method's directory
class MethodFiles:
    """One method's group files and manifest in ``directory``, for factorizations identified by ``identity``.

    ``put`` writes one group as soon as it is factorized and returns what to
    keep instead (the memory-mapped one); ``finish`` writes whatever is not yet
    written and the manifest; ``load`` reads a complete directory back (None
    where there is none, it is another identity's, or a file is unreadable:
    the caller factorizes again and the directory is rewritten).
    """

    def __init__(self, directory: Path, identity: dict, roots: Iterable[str], device: torch.device | None = None):
        self.directory = Path(directory)
        self.identity = identity
        self.tag = hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:32]
        self.roots = set(roots)
        self.device = device
        self._written: dict[int, Path] = {}
        self._started = False

    @property
    def manifest(self) -> Path:
        return self.directory / MANIFEST

    def reset(self) -> None:
        """Forget what was written (by an earlier attempt): the next ``put`` starts the directory anew. Called
        before factorizing; ``finish`` keeps the record, so that finishing twice writes nothing twice."""
        self._written, self._started = {}, False

    def start(self) -> None:
        """Before the first write: anything there (another identity's, a partial write) goes."""
        if not self._started:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._started = True

    def put(self, fact: Factorization) -> Factorization:
        """Write ``fact`` as the next group file; the memory-mapped factorization for a ``StoredLowRank``,
        ``fact`` itself for any other kind (written for reruns, kept as the method left it)."""
        self.start()
        path = write_group(self.directory / f"group-{len(self._written):04d}", fact, self.tag)
        if path.suffix == ".safetensors":
            fact = open_group(path, self.roots, self.device or getattr(fact, "device", None), self.tag)
        self._written[id(fact)] = path
        return fact

    def finish(self, factorizations: Sequence[Factorization], seconds: float) -> list[Factorization]:
        """Every group written (those ``put`` did not write, now) and the manifest; what to keep, in order.

        A factorization that cannot be stored (``factstore.Unsupported``) is kept as
        it is, in memory, and no manifest is written (nothing of it is reused).
        """
        kept, unsupported = [], None
        for fact in factorizations:
            if not self.written(fact):
                try:
                    fact = self.put(fact)
                except factstore.Unsupported as exc:
                    unsupported = unsupported or exc
            kept.append(fact)
        if unsupported is None:
            files = [self.written(f).name for f in kept]
            record = {"format": FORMAT, "tag": self.tag, "identity": self.identity, "seconds": seconds}
            atomic_write_json(self.manifest, {**record, "groups": files})
        if unsupported is not None:
            raise Incomplete(kept, unsupported)
        return kept

    def written(self, fact: Factorization) -> Path | None:
        """The file ``fact`` was written to or read from, in this directory for this identity; else None."""
        if isinstance(fact, MappedLowRank) and fact.path.parent == self.directory and fact.tag == self.tag:
            return fact.path
        return self._written.get(id(fact))

    def load(self) -> tuple[list[Factorization], float] | None:
        """The stored factorizations and the seconds they took; None where the directory has none to reuse
        (absent or another identity's), FactorFileError where a file of a matching one cannot be read."""
        try:
            manifest = json.loads(self.manifest.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise FactorFileError(f"{self.manifest}: cannot read stored factors ({first_line(exc)})") from None
        if not self.owns(manifest):
            return None
        paths = [self.directory / name for name in manifest["groups"]]
        facts = [open_group(path, self.roots, self.device, self.tag) for path in paths]
        self._written = {id(f): path for f, path in zip(facts, paths, strict=True)}  # ``finish`` rewrites none
        self._started = True
        return facts, float(manifest["seconds"])

    def owns(self, manifest: Any) -> bool:
        """True where ``manifest`` (a parsed manifest file) is this format's and this identity's."""
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("tag") == self.tag

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def stored_complete(files: MethodFiles) -> bool:
    """True where ``files``' directory has a manifest of its identity and every group file it lists: what
    ``load`` would read (its files are not opened here; an unreadable one is found, and redone, by ``load``)."""
    try:
        manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not files.owns(manifest):
        return False
    groups = manifest.get("groups")
    return isinstance(groups, list) and all((files.directory / str(name)).is_file() for name in groups)


def disk_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory`` (a method's factor files: what ``keep = "disk"`` costs)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
