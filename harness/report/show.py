"""``harness show CELL``: where one cell's numbers came from.

A cell is named by its id or any unambiguous prefix of it, searched in every
``<results>/*/cells/`` (or in ``<results>/cells/`` where ``--results`` names a
suite's own directory). The text says the cell's settings and metrics, then
its provenance: the model files and datasets read with their sha256, the
resolved suite, the seed, the command, the git revision, the hardware and
every version; ``--json`` prints the stored result as it is.

A cell that is one of a configuration's calibration draws (``[calibration]
draws = K``) says so: which draw it is, the cell ids of the configuration's
draws found beside it, and the mean ± spread over them of each metric (the
leaderboard's row of them, harness/report/draws.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.provenance import hardware_label
from harness.run.record import CellRecord

CELL_ID = re.compile(r"^[0-9a-f]{1,64}$")


def find_cell(prefix: str, results: Path) -> Path:
    """The one cell file under ``results`` whose id starts with ``prefix``."""
    if not CELL_ID.match(prefix):
        raise HarnessError(f"cell id: expected hexadecimal digits (a cell id or its prefix), got {prefix!r}")
    results = Path(results)
    if not results.is_dir():
        raise HarnessError(f"--results: expected a results directory, got {str(results)!r}: no such directory")
    folders = [results / "cells"] if (results / "cells").is_dir() else sorted(results.glob("*/cells"))
    matches = sorted(p for folder in folders for p in folder.glob(f"{prefix}*.json"))
    if not matches:
        raise HarnessError(f"cell id: expected the id of a cell under {results}, got {prefix!r}: no such cell")
    if len(matches) > 1:
        listed = ", ".join(str(p) for p in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise HarnessError(f"cell id: {prefix!r} matches {len(matches)} cells ({listed}); give more digits")
    return matches[0]


def load_cell(path: Path) -> CellRecord:
    """The cell record at ``path``; HarnessError naming the file and why where it is not one (truncated,
    edited, another schema)."""
    from harness.store import Unreadable, read_record

    found = read_record(Path(path))
    if isinstance(found, Unreadable):
        raise HarnessError(f"{found}; rerun its suite to recompute it")
    return found


def _line(key: str, value: Any) -> str:
    return f"{key:<13}{value}"


def _options(component: dict | None) -> str:
    if not component:
        return "—"
    options = ", ".join(f"{k}={v}" for k, v in (component.get("options") or {}).items())
    return f"{component.get('label', component.get('name'))}" + (f" ({options})" if options else "")


def describe(result: CellRecord, path: Path) -> str:
    """Human-readable text of a cell's settings, metrics and provenance."""
    prov = result.provenance
    model = result.model or {}
    lines = [
        _line("cell", f"{result.cell_id}  ({path})"),
        _line("suite", f"{result.suite}  status {result.status}  created {prov.get('created')}"),
        _line("model", f"{model.get('id')}  dtype {model.get('dtype')}  fingerprint {model.get('fingerprint')}"),
    ]
    if model.get("note"):
        lines.append(_line("", model["note"]))
    for name, sha in (model.get("files") or prov.get("model_files") or {}).items():
        lines.append(_line("", f"file {name}  sha256 {sha}"))
    lines += [
        _line("method", _options(result.method) if result.method else "baseline (uncompressed)"),
        _line("allocator", _options(result.allocator)),
        _line("target", result.target_label),
    ]
    if result.error:
        lines.append(_line("error", f"{result.error.get('type')}: {result.error.get('message')}"))
    metrics = result.metrics
    lines.append(_line("metrics", "; ".join(f"{k} {v:.6g}" for k, v in metrics.items()) or "—"))
    lines += draw_lines(result, path)
    lines += data_lines(prov.get("data") or {}, result.calibration)
    lines += [
        _line("seed", f"{prov.get('seed')}  (torch deterministic algorithms: {prov.get('torch_deterministic')})"),
        _line("limit", prov.get("limit")),
        _line("suite file", f"{prov.get('suite_file')}  sha256 {prov.get('suite_sha256')}"),
        _line("command", prov.get("command") or "—"),
        _line("git", prov.get("git") or "unknown"),
    ]
    hw = prov.get("hardware") or {}
    lines.append(_line("hardware", f"{hardware_label(hw)}; {hw.get('platform')}" if hw else "unknown"))
    plugins = ", ".join(f"{k} {v}" for k, v in (prov.get("plugins") or {}).items())
    libraries = ", ".join(f"{k} {v}" for k, v in (prov.get("libraries") or {}).items())
    lines += [
        _line("versions", f"harness {prov.get('harness')}; {libraries}"),
        _line("plugins", plugins or "—"),
    ]
    if prov.get("suite"):
        lines.append(_line("resolved", "the suite with every default filled in: harness show --json"))
    return "\n".join(lines) + "\n"


def data_lines(data: dict[str, Any], calibration: dict | None) -> list[str]:
    lines = []
    for label, prints in (data.get("evaluators") or {}).items():
        for name, sha in (prints or {}).items():
            lines.append(_line("data", f"{label}: {name}  sha256 {sha}"))
    for label, text in (data.get("texts") or {}).items():
        lines.append(
            _line("data", f"{label}: {text.get('source')} ({text.get('split')})  text sha256 {text.get('text_sha256')}")
        )
        for name, sha in (text.get("files") or {}).items():
            lines.append(_line("", f"file {name}  sha256 {sha}"))
    if calibration:
        settings = ", ".join(f"{k}={v}" for k, v in calibration.items() if k != "data")
        lines.append(_line("calibration", settings))
    return lines or [_line("data", "—")]


def draw_lines(result: CellRecord, path: Path) -> list[str]:
    """Where ``result`` is one of several calibration draws of its configuration (the records beside it,
    ``draws.group``): the draws with their cell ids, and the mean ± spread of each metric over them."""
    from harness.report import draws
    from harness.store import read_results

    path = Path(path)
    if path.parent.name != "cells":
        return []
    key = draws.series_key(result)
    siblings = [r for r in read_results(path.parent.parent, warn=None) if draws.series_key(r) == key]
    members = next((m for m in draws.group(siblings) if len(m) > 1), None)
    if members is None:
        return []
    listed = ", ".join(f"{draws.draw_of(r)} {r.cell_id[:12]}{'' if r.ok else ' (failed)'}" for r in members)
    lines = [_line("draw", f"{draws.draw_of(result)} of the configuration's {len(members)} draws: {listed}")]
    means, spreads = draws.metric_means(members)
    summary = [f"{k} {v:.6g} {draws.describe(spreads[k], '{:.4g}'.format)}" for k, v in means.items() if k in spreads]
    if summary:
        lines.append(_line("over draws", "; ".join(summary)))
    return lines
