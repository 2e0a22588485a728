"""Grid expansion and cell identity.

A suite's grid is model x method x allocator x target, plus one baseline cell
(no compression) per model. A cell's id is a content hash of its resolved
config: the model's fingerprint, the data fingerprints, the components with
their options, the evaluation settings and the versions of the harness and of
every plugin the cell uses. Change any of these and the cell is computed anew;
change nothing and a rerun skips it.

With ``[calibration] draws = K`` every cell that uses calibration data is
repeated for draws 1 .. K-1 (``Cell.draw``): the same config with
``"draw": d`` in its calibration settings, so each draw has its own id (and
is resumed on its own). Draw 0 is the cell as without the option; the
baseline and the cells without calibration are computed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.options import options_dict
from harness.store import canonical_json
from harness.suite import Component, Method, Suite
from harness.targets import Target


@dataclass(frozen=True)
class Cell:
    id: str
    suite: str
    model: str
    method: Method | None
    allocator: Component | None
    target: Target | None
    config: dict[str, Any]
    draw: int = 0
    """The calibration draw this cell computes (0 .. calibration.draws - 1); 0 for cells without calibration."""

    @property
    def is_baseline(self) -> bool:
        return self.method is None

    @property
    def label(self) -> str:
        if self.method is None:
            return f"{self.model} baseline"
        label = f"{self.model} {self.method.label} {self.allocator.label} {self.target.label}"
        return f"{label} draw={self.draw}" if self.draw else label


def content_hash(config: dict[str, Any], length: int = 16) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:length]


def common_config(suite: Suite, model: str, fingerprints: dict[str, Any], versions: dict[str, str], limit: int | None):
    return {
        "suite": suite.name,
        "model": model,
        "fingerprints": fingerprints,
        "dtype": suite.dtype,
        "seed": suite.seed,
        "trust_remote_code": suite.trust_remote_code,
        "evaluators": [c.to_dict() for c in suite.evaluators],
        "profilers": [c.to_dict() for c in suite.profilers],
        "limit": limit,
        "versions": versions,
    }


def expand(
    suite: Suite,
    model: str,
    fingerprints: dict[str, Any],
    versions: dict[str, str],
    limit: int | None = None,
    calibrated: Callable[[Method, Component], bool] = lambda method, allocator: True,
    calibration: dict[str, Any] | None = None,
) -> list[Cell]:
    """Baseline cell first, then every method x allocator x target, in suite order, then the calibrated
    cells of draws 1 .. ``calibration.draws`` - 1 (``draws``), draw by draw.

    ``calibrated(method, allocator)`` says whether the pair uses calibration
    data; only then are the calibration settings (``calibration``: the suite's,
    with the data's fingerprint) part of the cell's identity.
    """
    common = common_config(suite, model, fingerprints, versions, limit)
    cells = [Cell(content_hash({**common, "method": None}), suite.name, model, None, None, None, common)]
    for method in suite.methods:
        for allocator in method.allocators:
            for target in method.targets:
                config = {
                    **common,
                    "method": method.to_dict(),
                    "allocator": allocator.to_dict(),
                    "target": target.to_dict(),
                    "surgery": suite.surgery.identity(),  # offload_originals changes no number
                }
                if calibrated(method, allocator):
                    config["calibration"] = calibration or settings(suite)
                cells.append(Cell(content_hash(config), suite.name, model, method, allocator, target, config))
    return cells + draws(cells, suite.calibration.draws)


def settings(suite: Suite) -> dict[str, Any]:
    """The calibration settings as a cell's identity holds them where no fingerprinted ones are given."""
    config = options_dict(suite.calibration)  # ``draws`` left out while 1: the ids of before the option
    config.pop("draws", None)
    return config


def draws(cells: list[Cell], count: int) -> list[Cell]:
    """The cells of draws 1 .. ``count`` - 1: each calibrated cell with ``"draw": d`` in its calibration."""
    out = []
    for draw in range(1, count):
        for cell in cells:
            if cell.method is not None and "calibration" in cell.config:
                config = {**cell.config, "calibration": {**cell.config["calibration"], "draw": draw}}
                out.append(dataclasses.replace(cell, id=content_hash(config), config=config, draw=draw))
    return out
