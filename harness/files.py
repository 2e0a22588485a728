"""Where the harness keeps its files, and how it fingerprints them.

``cache_dir()`` is ``$HARNESS_CACHE`` (default ``~/.cache/harness``): converted
models, calibration statistics and a sha256 index of big files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big files hash once."""
    stat = path.stat()
    index_file = cache_dir() / "sha256.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    if key not in index:
        index[key] = sha256_file(path)
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_file)
    return index[key]
