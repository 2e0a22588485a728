"""What produced a cell: seed, suite file, model and data sha256, command,
versions, hardware and time (the ``provenance`` field of its record)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch

import harness
from harness import data as data_mod
from harness.files import sha256_file
from harness.provenance import git_revision, hardware, library_versions

if TYPE_CHECKING:
    from harness.models import LoadedModel
    from harness.run.cells import Cell
    from harness.run.env import RunEnv
    from harness.suite import Suite

SEEDING = (
    "random, numpy and torch seeded with seed before each factorization, allocation, "
    "evaluator and profiler; calibration windows drawn with random.Random(seed)"
)


def suite_sha256(suite: Suite) -> str | None:
    """sha256 of the suite file as read (None where it is gone)."""
    try:
        return sha256_file(suite.file)
    except OSError:
        return None


def data_provenance(suite: Suite, cell: Cell) -> dict[str, Any]:
    """Every dataset the cell read: evaluators' fingerprints (e.g. lm-eval task file sha256),
    and for each text source (calibration, perplexity) its text sha256 and its files' sha256."""
    texts = {}
    if cell.config.get("calibration"):
        texts["calibration"] = data_mod.text_provenance(suite.calibration.source, "calibration")
    for component in suite.evaluators:
        source = getattr(component.options, "source", None)
        if source in data_mod.TEXT_SOURCES:
            texts[component.label] = data_mod.text_provenance(source, "perplexity")
    return {"evaluators": cell.config.get("fingerprints", {}).get("data", {}), "texts": texts}


def cell_provenance(env: RunEnv, loaded: LoadedModel, cell: Cell) -> dict[str, Any]:
    suite = env.suite
    return {
        "seed": suite.seed,
        "seeding": SEEDING,
        "torch_deterministic": torch.are_deterministic_algorithms_enabled(),
        "suite_file": suite.file,
        "suite_sha256": suite_sha256(suite),
        "suite": suite.to_dict(),
        "model_files": loaded.files,
        "data": data_provenance(suite, cell),
        "command": env.options.command,
        "limit": env.options.limit,
        "harness": harness.__version__,
        "plugins": env.plugins.versions(),
        "libraries": library_versions(),
        "hardware": hardware(env.device),
        "git": git_revision(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
