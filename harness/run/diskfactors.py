"""``[factorization] keep = "disk"``: a session's factorizations in per-group files under the results
directory (``harness.factorfiles``), and where the Ray executor shares them.

A method's files are in ``<results>/<suite>/factors/<model>/<method label>/``
(``<model>``: the first 16 hex digits of the model's fingerprint). The
manifest records their identity (``identity``): the model's fingerprint,
the method (name, options, targets, allocators: they decide how far factors
are kept), the dtype, seed, device, surgery and storage dtype, the versions
of the harness and the method's plugin, and, for a method that needs
statistics, the calibration identity. A rerun reuses the files only where
every part matches; otherwise, or where a file cannot be read, it
factorizes again and rewrites them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.factorfiles import FactorFileError, Incomplete, MethodFiles, stored_complete
from harness.ray import factstore
from harness.run.cells import content_hash
from harness.run.env import log
from harness.run.identity import calibration_identity

if TYPE_CHECKING:
    import torch

    from harness.factorization import Factorization
    from harness.run.cells import Cell
    from harness.run.env import RunEnv
    from harness.run.prepare import Prepared
    from harness.suite import Method

HEX = re.compile(r"^[0-9a-f]{16,}$")


def identity(env: RunEnv, fingerprint: str, method: Method) -> dict[str, Any]:
    """What a method's stored factorizations depend on (see the module's docstring)."""
    suite, plugins = env.suite, env.plugins
    decomposer = plugins.get("decomposer", method.name)
    plugin = plugins.plugin_of("decomposer", method.name)
    versions = plugins.versions()
    return {
        "model": fingerprint,
        "method": method.to_dict(),
        "targets": [t.to_dict() for t in method.targets],
        "allocators": [a.to_dict() for a in method.allocators],
        "dtype": suite.dtype,
        "seed": suite.seed,
        "device": str(env.device),
        "trust_remote_code": suite.trust_remote_code,
        "surgery": suite.surgery.identity(),
        "storage_dtype": suite.factorization.storage_dtype,
        "versions": {"harness": versions.get("harness"), plugin: versions.get(plugin)},
        "calibration": calibration_identity(suite) if decomposer.needs else None,
    }


def directory(env: RunEnv, fingerprint: str, method: Method) -> Path:
    model = fingerprint[:16] if HEX.match(fingerprint) else content_hash({"model": fingerprint})
    draw = f"@draw{env.suite.draw}" if env.suite.draw else ""  # a calibration draw's own files
    return env.store.root / "factors" / model / f"{method.label}{draw}"


def method_files(
    env: RunEnv, fingerprint: str, method: Method, *, always: bool = False, device: torch.device | None = None
) -> MethodFiles | None:
    """The method's files; None under ``keep = "memory"`` unless ``always`` (the Ray executor's store)."""
    if env.suite.factorization.keep != "disk" and not always:
        return None
    return opened(env, directory(env, fingerprint, method), identity(env, fingerprint, method), device)


_OPEN: dict[tuple[str, str, str], MethodFiles] = {}


def opened(env: RunEnv, where: Path, what: dict[str, Any], device: torch.device | None) -> MethodFiles:
    """The one ``MethodFiles`` per directory and identity (whoever writes a group, the manifest lists it)."""
    key = (str(where), content_hash(what, 32), str(device))
    if key not in _OPEN:
        _OPEN[key] = MethodFiles(where, what, factstore.plugin_roots(env.plugins), device)
    return _OPEN[key]


def cell_files(env: RunEnv, fingerprint: str, cell: Cell, device: torch.device | None = None) -> MethodFiles | None:
    """Propagated inputs: one cell's own files (its factorizations depend on its target and allocator), in
    ``<method directory>@<cell id>``; None under ``keep = "memory"``."""
    if env.suite.factorization.keep != "disk":
        return None
    where = directory(env, fingerprint, cell.method)
    what = {**identity(env, fingerprint, cell.method), "cell": cell.id}
    return opened(env, where.with_name(f"{where.name}@{cell.id[:16]}"), what, device)


def stored(files: MethodFiles | None, force: bool = False) -> bool:
    """True where ``files`` hold a complete set of this identity's factorizations (not read: a manifest with
    this identity's tag, every group file present); a rerun reuses them, so no pass need compute them."""
    return files is not None and not force and stored_complete(files)


def reuse(files: MethodFiles, force: bool = False) -> tuple[list[Factorization], float] | None:
    """The stored factorizations where they match and read; None (a line logged where unreadable) to factorize."""
    if force:
        return None
    try:
        found = files.load()
    except FactorFileError as exc:
        log(f"warning: {exc}; factorizing again")
        return None
    if found is not None:
        log(f"factorizations reused from {files.directory}")
    return found


def put(files: MethodFiles, fact: Factorization) -> Factorization:
    """``fact`` written as the next group file, its memory-mapped copy returned; ``fact`` itself where it cannot
    be stored (``store`` then says so, once, and keeps the method's factorizations in memory)."""
    try:
        return files.put(fact)
    except factstore.Unsupported:
        return fact


def store(files: MethodFiles, factorizations: list[Factorization], seconds: float) -> list[Factorization]:
    """``factorizations`` written (those not yet), the manifest last; what to keep: the memory-mapped ones.
    Where a factorization cannot be stored (``factstore.Unsupported``), they stay as they are, in memory."""
    try:
        return files.finish(factorizations, seconds)
    except Incomplete as exc:
        log(f"warning: factorizations cannot all be stored in {files.directory} ({exc}); those kept in memory")
        return exc.kept


def factorize(prepared: Prepared, method: Method) -> tuple[list[Factorization], float]:
    """``prepared.factorize(method)``, kept as the suite says: under ``keep = "disk"`` read from matching
    files where a run wrote them, else factorized and written (the session's ``factorize`` calls this)."""
    env = prepared.env
    files = method_files(env, prepared.loaded.fingerprint, method)
    if files is None:
        return prepared.factorize(method)
    found = reuse(files, env.options.force)
    if found is not None:
        return found
    files.reset()
    factorizations, seconds = prepared.factorize(method)
    return store(files, factorizations, seconds), seconds


def factorize_cell(prepared: Prepared, cell: Cell) -> tuple[list[Factorization], float]:
    """``prepared.factorize_cell(cell)`` (propagated inputs), kept as the suite says: under ``keep = "disk"``
    read from the cell's matching files where a run wrote them; else the pass computes them and writes each
    group as it is factorized (``BlockFactorizer.run_streams``), keeping the memory-mapped ones."""
    env = prepared.env
    files = cell_files(env, prepared.loaded.fingerprint, cell)
    found = reuse(files, env.options.force) if files is not None else None
    if found is not None:
        return found
    return prepared.factorize_cell(cell)
