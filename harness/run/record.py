"""The cell record: one typed result per cell (``results/<suite>/cells/<id>.json``).

Every report, ``harness check``, ``compare``, ``show`` and the trackers read a
``CellRecord``; its JSON form (``to_json``) is what the store writes. Fields,
what they hold and their unit::

    schema            int   version of this schema (SCHEMA_VERSION)
    cell_id           str   content hash of ``config`` (harness/run/cells.py)
    suite             str   suite name
    status            str   "ok" or "failed"
    error             dict  {type, message, traceback} when failed, else null
    model             dict  id, fingerprint (sha256), files {name: sha256}, note
                            (e.g. "4-bit quantized, de-quantized on load"), dtype
    method            dict  name, label, options, needs (calibration statistics); null for the baseline
    allocator         dict  name, label, options; null for the baseline
    target            dict  kind (params|rank|bytes|bits), value, label; null for the baseline
    surgery           dict  kinds, lm_head, mode (factored|dense)
    calibration       dict  source, samples, seqlen, ..., data (sha256 of the text), draw (where not 0) or null
    draw              int   calibration draw (``[calibration] draws``): windows drawn with seed + draw;
                            0 (and left out of the stored form) for the first draw and uncalibrated cells
    ranks             dict  layer name -> rank kept (null: layer left dense)
    metrics           dict  metric name -> number; accuracies are fractions in [0, 1],
                            perplexity is per token, sizes are counts and bytes
    higher_is_better  dict  metric name -> bool
    hardware_metrics  list  metric names from hardware-bound profilers (latency, memory, energy):
                            comparable only between cells on the same hardware
    evaluations       dict  evaluator/profiler label -> info: data source and split,
                            examples used, sequence length, units, raw samples
    sizes             dict  dense_decomposable_params/bytes (uncompressed), model_params/bytes (as evaluated)
    timing            dict  seconds: factorize_s (the method's one factorization of every
                            group, shared by its cells), allocate_s, <component>_s, cell_s
    factorization_info dict group -> diagnostics (iterations, jitter, relative error)
    weight_optimization dict the method's summary of its per-cell step after surgery (``Decomposer.
                            after_surgery``: steps, losses, ...) and ``seconds``; only where it tuned the
                            cell (left out of the stored form otherwise; ``method.weight_optimization``
                            is then true as well)
    artifacts         list  files beside the results (relative to the suite's results dir):
                            ranks/<cell id>.csv and .png (rank chosen for every matrix)
    provenance        dict  seed, seeding, torch_deterministic, suite_file and suite_sha256,
                            suite (the resolved suite), model_files {name: sha256},
                            data {evaluators: {label: fingerprints, e.g. task -> file sha256},
                            texts: {calibration|label: source, split, note, text_sha256,
                            files {path: sha256}}}, command, limit, harness and plugin
                            versions, libraries, hardware, git revision, created (UTC)
    config            dict  the resolved cell config that ``cell_id`` hashes

A row of the leaderboard is identified by ``row_key``: (model id, method label,
allocator label, target label), with ``"baseline"`` and ``"—"`` for the
baseline cell; every report uses that one key.
"""

from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError

SCHEMA_VERSION = 1
NONE_LABEL = "—"
RowKey = tuple[str, str, str, str]


@dataclass
class CellRecord:
    cell_id: str
    suite: str
    status: str
    model: dict[str, Any]
    error: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    allocator: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    surgery: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    draw: int = 0
    ranks: dict[str, int | None] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    hardware_metrics: list[str] = field(default_factory=list)
    evaluations: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    factorization_info: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    weight_optimization: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    # ------------------------------------------------------------ identity
    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_baseline(self) -> bool:
        return self.method is None

    @property
    def model_id(self) -> str:
        return (self.model or {}).get("id", "?")

    @property
    def method_label(self) -> str:
        return (self.method or {}).get("label", "baseline")

    @property
    def allocator_label(self) -> str:
        return (self.allocator or {}).get("label", NONE_LABEL)

    @property
    def target_label(self) -> str:
        return (self.target or {}).get("label", NONE_LABEL)

    @property
    def row_key(self) -> RowKey:
        """(model, method, allocator, target) labels: what a leaderboard row, a baseline row and a compare
        row are matched by."""
        return (self.model_id, self.method_label, self.allocator_label, self.target_label)

    @property
    def label(self) -> str:
        """The row key as one line, e.g. ``embedded svd uniform keep=0.95`` (``embedded baseline``)."""
        return row_label(self.row_key)

    @property
    def created(self) -> str:
        return self.provenance.get("created") or ""

    @property
    def hardware(self) -> dict[str, Any] | None:
        return self.provenance.get("hardware")

    def order_key(self) -> tuple:
        """Baseline first per model, then method, allocator, target kind, larger targets first."""
        target = self.target or {}
        return (
            self.model_id,
            not self.is_baseline,
            (self.method or {}).get("label", ""),
            (self.allocator or {}).get("label", ""),
            target.get("kind", ""),
            -float(target.get("value", 0)),
        )

    # ------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """The stored form: a plain dict with every field (the keys of the schema above), ``draw`` only where
        it is not 0 (a record of one draw is stored as before the option), ``weight_optimization`` only where set."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.draw:
            del out["draw"]
        if self.weight_optimization is None:
            del out["weight_optimization"]
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "cell result") -> CellRecord:
        """A record from its stored form; HarnessError naming ``source`` where it is not one."""
        if not isinstance(data, dict):
            raise HarnessError(f"{source}: expected a JSON object (a cell result), got {type(data).__name__}")
        version = data.get("schema")
        if version != SCHEMA_VERSION:
            raise HarnessError(
                f"{source}: schema: expected cell result schema version {SCHEMA_VERSION}, got {version!r} "
                f"(written by another harness version; rerun the suite to recompute it)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in ("cell_id", "suite", "status", "model") if n not in data)
        if missing:
            raise HarnessError(f"{source}: expected the keys {', '.join(missing)} of a cell result, got none")
        return cls(**{k: v for k, v in data.items() if k in names})

    # ------------------------------------------------------------ compatibility
    def __getitem__(self, key: str) -> Any:
        """Read access by the stored keys (``record["metrics"]``), as hooks written for the dict form do."""
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._names() else default

    @classmethod
    def _names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))


def row_label(key: tuple) -> str:
    """A row key as one line, leaving out the parts a baseline row has none of."""
    return " ".join(str(part) for part in key if part not in (None, NONE_LABEL))


def error_record(exc: BaseException) -> dict:
    """How a record holds an exception: type, message and traceback lines."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
    }
