"""What identifies a model's cells: data and model fingerprints, plugin versions,
and which cells use calibration data (harness/run/cells.py hashes them into ids)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import harness
from harness import data as data_mod
from harness.run.cells import Cell, content_hash, expand

if TYPE_CHECKING:
    from harness.models import LoadedModel
    from harness.plugins import Plugins
    from harness.run.env import RunEnv
    from harness.suite import Component, Method, Suite


def calibration_identity(suite: Suite) -> dict[str, Any]:
    """The suite's calibration settings with the sha256 of the calibration text, and the draw of this view
    of the suite (``Suite.for_draw``) where it is not 0: what calibrated cells, cached statistics and stored
    factorizations of one draw are told apart by. How many draws there are is no part of it (adding a
    draw leaves the others' ids as they were)."""
    config = dataclasses.asdict(suite.calibration)
    del config["pipeline"]  # "whole" and "blocks" compute the same numbers (tests/test_pipeline.py): not identity
    del config["inputs"]  # part of a cell's identity only where it changes its numbers: ``propagated_inputs``
    del config["draws"]
    text = data_mod.text_source(suite.calibration.source, "calibration")
    config["data"] = data_mod.sha256_texts(text.texts)
    if suite.draw:
        config["draw"] = suite.draw
    return config


def propagates(suite: Suite, plugins: Plugins, method: Method) -> bool:
    """True where ``method``'s factorizations are computed on propagated inputs (``calibration.inputs``):
    the layer-sequential pipeline serves it (forward statistics only); fisher methods and methods
    without statistics are computed as under ``original``."""
    from harness.run.calibration import FORWARD_KINDS

    needs = set(plugins.get("decomposer", method.name).needs)
    return suite.calibration.inputs == "propagated" and bool(needs) and needs <= FORWARD_KINDS


def propagated_inputs(suite: Suite, plugins: Plugins, cells: list[Cell]) -> list[Cell]:
    """``cells`` with ``"inputs": "propagated"`` in the calibration settings (and so the id) of the cells
    whose numbers it changes (``propagates``), and ``"within_block": "sequential"`` where their method
    collects a block stage by stage (``Decomposer.sequential_within_block``); the others, and every cell
    under ``original``, as they were."""
    out = []
    for cell in cells:
        if cell.method is not None and "calibration" in cell.config and propagates(suite, plugins, cell.method):
            calibration = {**cell.config["calibration"], "inputs": "propagated"}
            if plugins.get("decomposer", cell.method.name).sequential_within_block(cell.method.options):
                calibration["within_block"] = "sequential"
            config = {**cell.config, "calibration": calibration}
            cell = dataclasses.replace(cell, id=content_hash(config), config=config)
        out.append(cell)
    return out


def needs_calibration(plugins: Plugins, method: Method, allocator: Component) -> bool:
    decomposer = plugins.get("decomposer", method.name)
    return bool(decomposer.needs) or plugins.get("allocator", allocator.name).uses_calibration


def data_fingerprints(suite: Suite, plugins: Plugins) -> dict[str, Any]:
    """Evaluator label -> what its data fingerprint says (``harness.Evaluator.data_fingerprint``)."""
    prints = {}
    for component in suite.evaluators:
        fingerprint = plugins.get("evaluator", component.name).data_fingerprint(component.options)
        if fingerprint is not None:
            prints[component.label] = fingerprint
    return prints


def used_versions(suite: Suite, plugins: Plugins) -> dict[str, str]:
    """Versions of the harness and of every plugin the suite uses (part of each cell's id)."""
    used = {
        plugins.plugin_of(kind, c.name)
        for kind, items in (
            ("decomposer", suite.methods),
            ("evaluator", suite.evaluators),
            ("profiler", suite.profilers),
        )
        for c in items
    }
    used |= {plugins.plugin_of("allocator", a.name) for m in suite.methods for a in m.allocators}
    all_versions = plugins.versions()
    return {"harness": harness.__version__, **{name: all_versions[name] for name in sorted(used)}}


def model_cells(env: RunEnv, loaded: LoadedModel) -> list[Cell]:
    """The model's grid: baseline first, then every method x allocator x target in suite order, then the
    calibrated cells of the further calibration draws (``harness.run.cells.expand``)."""
    suite, plugins = env.suite.for_draw(0), env.plugins  # whichever draw the session is at: the whole grid

    def calibrated(method: Method, allocator: Component) -> bool:
        return needs_calibration(plugins, method, allocator)

    needs_any = any(calibrated(m, a) for m in suite.methods for a in m.allocators)
    fingerprints = {"model": loaded.fingerprint, "data": data_fingerprints(suite, plugins)}
    cells = expand(
        suite,
        loaded.model_id,
        fingerprints,
        used_versions(suite, plugins),
        env.options.limit,
        calibrated=calibrated,
        calibration=calibration_identity(suite) if needs_any else None,
    )
    return propagated_inputs(suite, plugins, cells)
