"""One model's part of a run: its grid of cells, computed method by method.

The session loads nothing itself (``open_session`` does) and reaches the runner
only through the narrow ``RunEnv`` (suite, options, plugins, store, device) and
a ``CellSink`` (skip, collect). A plugin's exception fails the cell it happened
in (recorded with its error); a ``HarnessError`` (bad input) stops the run.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harness import modelcheck
from harness.errors import HarnessError
from harness.models import LoadedModel, load_model
from harness.run import diskfactors
from harness.run.allocate import compress
from harness.run.env import CellSink, RunEnv, log
from harness.run.identity import model_cells, used_versions
from harness.run.measure import Measured, measure
from harness.run.prepare import Prepared
from harness.run.provenance import cell_provenance
from harness.run.record import CellRecord, error_record
from harness.surgery import count_layers, find_linears

if TYPE_CHECKING:
    from harness.api import LayerInfo
    from harness.factorization import Factorization
    from harness.run.cells import Cell
    from harness.suite import Method


def open_session(env: RunEnv, sink: CellSink, model_spec: str, key: str) -> ModelSession:
    """Load ``model_spec`` and find its decomposable layers; bad input is a HarnessError naming ``key``."""
    suite = env.suite
    known = modelcheck.layers_before_load(suite, model_spec)
    if known is not None:  # names only the model can confirm, before any weights load
        modelcheck.check_model_names(suite, known, model_spec)
    loaded, cleanup = load_for_session(env, model_spec, key)
    if known is None:
        modelcheck.check_model_names(suite, find_linears(loaded.model, None, suite.surgery.lm_head), model_spec)
    layers = find_linears(loaded.model, suite.surgery.kinds, suite.surgery.lm_head)
    if not layers:
        kinds = "surgery.kinds " + ", ".join(suite.surgery.kinds) if suite.surgery.kinds else "surgery"
        raise HarnessError(
            f"{key}: expected a model with torch.nn.Linear layers in its transformer blocks to decompose "
            f"({kinds}), got {model_spec!r} with none ({type(loaded.model).__name__})"
        )
    session = ModelSession(env, sink, loaded, layers)
    session.cleanup = cleanup
    return session


def load_for_session(env: RunEnv, model_spec: str, key: str) -> tuple[LoadedModel, weakref.finalize | None]:
    """The model, on the run device or offloaded (``offload``), and what removes its offload folder (None
    without one). Under ``offload = "disk"`` the folder is made first: the blocks go there as they load
    (``harness.models.load_model``), so the host never holds the whole model."""
    suite = env.suite
    log(f"loading model {model_spec}")
    if suite.offload:
        log(f"offload: {model_spec}'s decoder blocks on {suite.offload}, each brought to {env.device} for its forward")
    folder = offload_folder(env.store.root, model_spec) if suite.offload == "disk" else None
    try:
        loaded = load_model(
            model_spec,
            suite.dtype,
            str(env.device),
            suite.trust_remote_code,
            device_map=suite.device_map,
            offload=suite.offload,
            offload_dir=folder,
        )
    except BaseException as exc:
        if folder is not None:  # no model holds it: nothing else would remove it
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, HarnessError):
            raise HarnessError(f"{key}: {str(exc).removeprefix('model: ')}") from None
        raise
    return loaded, None if folder is None else weakref.finalize(loaded.model, shutil.rmtree, folder, True)


def offload_folder(root: Path, model_spec: str) -> Path:
    """A fresh folder for offloaded blocks under the results root (``offload-<sha256 of the spec>-*``), made
    before the model loads (its blocks are written there as they load). ``load_for_session`` removes it where
    the load fails, else ties its removal to the model (``weakref.finalize``): called when the session
    closes, else when the model is collected or at exit."""
    import hashlib

    root.mkdir(parents=True, exist_ok=True)
    named = hashlib.sha256(model_spec.encode()).hexdigest()[:12]
    return Path(tempfile.mkdtemp(prefix=f"offload-{named}-", dir=root))


class ModelSession:
    """Everything computed once per model (calibration, factorizations) and its cells."""

    def __init__(self, env: RunEnv, sink: CellSink, loaded: LoadedModel, layers: list[LayerInfo]) -> None:
        self.env = env
        self.sink = sink
        self.loaded = loaded
        self.layers = layers
        self.prepared = Prepared(env, loaded, layers)
        self.dense = count_layers(loaded.model, [layer.name for layer in layers])
        self.cleanup: Callable[[], object] | None = None
        """Removes what the session keeps on disk (offloaded blocks); ``close`` calls it."""

    def close(self) -> None:
        if self.cleanup is not None:
            self.cleanup()

    # ------------------------------------------------------------ grid
    def cells(self) -> list[Cell]:
        return model_cells(self.env, self.loaded)

    def versions(self) -> dict[str, str]:
        return used_versions(self.env.suite, self.env.plugins)

    def run(self) -> None:
        baseline, *method_cells = self.cells()
        if self.env.pending(baseline):
            self.record(baseline, lambda: self.compute_baseline(baseline))
        else:
            self.sink.skip(baseline)
        for draw in range(self.env.suite.calibration.draws):  # ``[calibration] draws``: one draw at a time
            self.use_draw(draw)
            self.run_cells([c for c in method_cells if c.draw == draw])

    def use_draw(self, draw: int) -> None:
        """Compute calibration draw ``draw`` from now on: a fresh ``Prepared`` (its windows drawn with
        ``seed + draw``), the last draw's batches, statistics and factorizations let go of first, so
        that memory does not grow with the number of draws."""
        if draw == self.env.suite.draw:
            return
        del self.prepared
        gc.collect()
        self.env = dataclasses.replace(self.env, suite=self.env.suite.for_draw(draw))
        self.prepared = Prepared(self.env, self.loaded, self.layers)
        log(f"calibration draw {draw}: windows drawn with seed {self.env.suite.calibration_seed}")

    def run_cells(self, method_cells: Sequence[Cell]) -> None:
        """One draw's method cells, method by method (its factorizations computed once for its cells)."""
        methods = self.env.suite.methods
        pending = [c for c in method_cells if self.env.pending(c)]
        self.prepared.expect(*self.to_compute(methods, pending))
        for method in self.env.suite.methods:
            mine = [c for c in method_cells if c.method is method]
            pending = [c for c in mine if self.env.pending(c)]
            for cell in mine:
                if cell not in pending:
                    self.sink.skip(cell)
            if pending:
                self.run_method(method, pending)

    def to_compute(self, methods: Sequence[Method], pending: Sequence[Cell]) -> tuple[list[Method], list[Cell]]:
        """The methods (and cells) whose factorizations the pipeline's one pass must compute: those with pending
        cells, less those whose files a run wrote under ``keep = "disk"`` (they are read back instead)."""
        env, fingerprint = self.env, self.prepared.loaded.fingerprint
        force = env.options.force
        cells = [c for c in pending if not diskfactors.stored(diskfactors.cell_files(env, fingerprint, c), force)]
        stored = {m.label for m in methods if diskfactors.stored(diskfactors.method_files(env, fingerprint, m), force)}
        return [m for m in methods if m.label not in stored and any(c.method is m for c in pending)], cells

    def run_method(self, method: Method, cells: Sequence[Cell]) -> None:
        """Compute ``cells`` (the method's pending ones), then let go of the method's factorizations: only the
        current method's and those of methods still waiting stay alive (``Prepared.release``)."""
        if self.prepared.propagated(method):  # each cell its own factorizations (calibration.inputs)
            for cell in cells:
                self.compute_cells([cell], lambda cell=cell: diskfactors.factorize_cell(self.prepared, cell))
                self.prepared.release(method, cell)
        else:
            self.compute_cells(cells, lambda: self.factorize(method))
        self.prepared.release(method)

    def compute_cells(self, cells: Sequence[Cell], factorize: Callable[[], tuple[list[Factorization], float]]) -> None:
        try:
            factorizations, seconds = factorize()
        except HarnessError:
            raise
        except Exception as exc:  # every cell of the method fails with the factorization's error
            for cell in cells:
                self.record(cell, lambda cell=cell, exc=exc: self.failed(cell, error_record(exc)))
            return
        for cell in cells:
            self.record(cell, lambda cell=cell: self.compute_cell(cell, factorizations, seconds))

    def record(self, cell: Cell, compute: Callable[[], CellRecord]) -> CellRecord | None:
        if not self.env.claim(cell):  # another run (--shared) computes it, or has by now: the sink waits for it
            self.sink.skip(cell)
            return None
        self.env.plugins.pm.hook.harness_cell_start(cell=cell)
        record = self.attempt(cell, compute)
        path = self.env.store.save(record)
        self.sink.collect(cell, record, path)
        return record

    def attempt(self, cell: Cell, compute: Callable[[], CellRecord]) -> CellRecord:
        """``compute()``'s record, or the cell's failed record where a plugin raised; timed in ``cell_s``."""
        log(f"cell {cell.label} [{cell.id}]")
        started = time.perf_counter()
        try:
            record = compute()
        except HarnessError:
            raise
        except Exception as exc:  # a plugin's failure costs one cell, not the suite
            record = self.failed(cell, error_record(exc))
            log(f"cell {cell.label} FAILED: {type(exc).__name__}: {exc}")
        record.timing["cell_s"] = time.perf_counter() - started
        return record

    # ------------------------------------------------------------ stages
    def stats(self, needs: set[str]) -> dict:
        return self.prepared.stats(needs)

    def factorize(self, method: Method) -> tuple[list[Factorization], float]:
        """The method's factorizations: from matching files under ``[factorization] keep = "disk"``, else
        computed (and, under ``disk``, written per group: ``harness.run.diskfactors``)."""
        return diskfactors.factorize(self.prepared, method)

    def compute_baseline(self, cell: Cell) -> CellRecord:
        return self.finished(cell, measure(self.env, self.prepared, cell, {}, self.dense), ranks={})

    def compute_cell(self, cell: Cell, factorizations: list[Factorization], factorize_s: float) -> CellRecord:
        compressed = compress(self.env, self.prepared, cell, factorizations, factorize_s)
        measured = measure(self.env, self.prepared, cell, compressed.replacements, self.dense)
        measured.timing = {**compressed.timing, **measured.timing}
        record = self.finished(cell, measured, compressed.ranks)
        record.factorization_info, record.artifacts = compressed.factorization_info, compressed.artifacts
        return record

    # ------------------------------------------------------------ records
    def finished(self, cell: Cell, measured: Measured, ranks: dict[str, int | None]) -> CellRecord:
        record = self.failed(cell, None)
        record.status, record.ranks = "ok", ranks
        record.metrics, record.higher_is_better = measured.metrics, measured.higher_is_better
        record.evaluations, record.hardware_metrics = measured.evaluations, measured.hardware_metrics
        record.timing = measured.timing
        record.weight_optimization = measured.weight_optimization
        record.sizes.update(model_params=measured.model_params, model_bytes=measured.model_bytes)
        return record

    def failed(self, cell: Cell, error: dict | None) -> CellRecord:
        """The cell's record without results: failed with ``error`` (type, message, traceback), or None."""
        loaded, suite = self.loaded, self.env.suite
        method = cell.method
        needs = None if method is None else sorted(self.env.plugins.get("decomposer", method.name).needs)
        return CellRecord(
            cell_id=cell.id,
            suite=cell.suite,
            status="failed",
            error=error,
            model={
                "id": loaded.model_id,
                "fingerprint": loaded.fingerprint,
                "files": loaded.files,
                "note": loaded.note,
                "dtype": suite.dtype,
            },
            method=None if method is None else {**method.to_dict(), "needs": needs, **tuned_flag(self.env, cell)},
            allocator=None if cell.allocator is None else cell.allocator.to_dict(),
            target=None if cell.target is None else {**cell.target.to_dict(), "label": cell.target.label},
            surgery=dataclasses.asdict(suite.surgery),
            calibration=cell.config.get("calibration"),
            draw=cell.draw,
            sizes={"dense_decomposable_params": self.dense[0], "dense_decomposable_bytes": self.dense[1]},
            provenance=cell_provenance(self.env, loaded, cell),
            config=cell.config,
        )


def tuned_flag(env: RunEnv, cell: Cell) -> dict[str, bool]:
    """``{"weight_optimization": True}`` for a cell whose method trains its factors on calibration data (tunes
    after surgery, or refines its blocks in the propagated pass), else nothing (the record of every other cell
    stays as it was)."""
    if cell.method is None:
        return {}
    decomposer, options = env.plugins.get("decomposer", cell.method.name), cell.method.options
    return {"weight_optimization": True} if decomposer.tunes(options) or decomposer.refines(options) else {}
