"""The reports of a suite's results directory: leaderboard, Pareto plots, report.html.

``write_all`` is what ``harness run`` calls at the end (before trackers end, so
MLflow can log the files) and ``harness report`` calls on stored results:

    leaderboard.md | leaderboard.json   harness/report/leaderboard.py
    pareto_bytes.png | pareto_params.png  harness/report/pareto.py
    report.html                         one static file: the tables (with the
                                        significance marks), the plots embedded
                                        as base64 PNG, the paired tests and the
                                        provenance of every cell; no script, no
                                        network, opens from disk

A cell computed over calibration draws is one row of each table (the
leaderboard's mean ± spread; one provenance row naming every draw's cell id)
and one point of each plot (the caption says "mean ± spread over K draws");
only the paired tests stay per draw, each draw tested on its own.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.provenance import hardware_label
from harness.report import draws, leaderboard, pareto, significance
from harness.store import atomic_write_text

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
tr.baseline td { font-weight: 600; } tr.failed td { color: #a00; }
img { max-width: 100%; border: 1px solid #eee; } .scroll { overflow-x: auto; }
code { font-size: 0.9em; } footer { color: #666; font-size: 0.8em; }
"""


def write_all(results: Sequence[dict], directory: Path, title: str) -> str:
    """Leaderboard, plots and report.html under ``directory``; returns the leaderboard's markdown."""
    board = leaderboard.build(list(results))
    text = leaderboard.write(list(results), directory, title, board)
    write_report(results, directory, title, board)
    return text


def write_report(results: Sequence[dict], directory: Path, title: str, board: dict | None = None) -> Path:
    """Pareto PNGs and report.html under ``directory``; returns the HTML file's path."""
    directory = Path(directory)
    plots = pareto.write_pareto(results, directory, title)
    board = leaderboard.build(list(results)) if board is None else board
    path = directory / "report.html"
    atomic_write_text(path, render_html(board, results, plots, title, directory))
    return path


# ---------------------------------------------------------------- html
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(
    columns: Sequence[str],
    rows: Sequence[dict],
    marks: Sequence[dict] | None = None,
    table_id: str = "",
    spreads: Sequence[dict] | None = None,
) -> str:
    """An HTML table of ``rows``; ``marks`` the significance marks, ``spreads`` the spread over calibration
    draws of the rows that are means (``leaderboard.marked``)."""
    marks = marks or [{} for _ in rows]
    spreads = spreads or [{} for _ in rows]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row, mark, spread in zip(rows, marks, spreads, strict=True):
        kind = "failed" if "status" in row else ("baseline" if row.get("method") == "baseline" else "")
        cells = []
        for c in columns:
            value = row.get(c)
            text = leaderboard.marked(value, mark.get(c), spread.get(c))
            cells.append(f"<td{'' if isinstance(value, (int, float)) else ' class=text'}>{esc(text)}</td>")
        body.append(f'<tr class="{kind}">' + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return (
        f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def leaderboard_html(board: dict) -> str:
    columns = board["columns"] + (["status"] if any("status" in r for r in board["rows"]) else [])
    parts = [
        "<h2>Leaderboard</h2>",
        table(columns, board["rows"], board.get("marks"), "leaderboard", spreads(board)),
    ]
    for i, hw in enumerate(board.get("hardware_tables", [])):
        parts.append(f"<h3>Hardware-bound metrics on {esc(hw['hardware'])}</h3>")
        parts.append(table(hw["columns"], hw["rows"], table_id=f"hardware-{i}", spreads=spreads(hw)))
    parts.append("<ul class=footer>" + "".join(f"<li>{esc(line)}</li>" for line in board["footer"]) + "</ul>")
    return "\n".join(parts)


def spreads(board: dict) -> list[dict] | None:
    """The spreads over calibration draws a table of ``board`` writes (``draws.shown``), or None."""
    return draws.shown(board["spread"], board["metrics"]) if board.get("spread") else None


def plots_html(plots: Sequence[Path], caption: str = "") -> str:
    if not plots:
        return "<h2>Pareto plots</h2><p>No plottable metric.</p>"
    parts = ["<h2>Pareto plots</h2>"]
    for plot in plots:
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="{esc(plot.stem)}"><img alt="{esc(plot.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(plot.name)}{esc(': ' + caption) if caption else ''}</figcaption></figure>"
        )
    return "\n".join(parts)


def significance_html(board: dict) -> str:
    rows = []
    for row, tests in zip(board["rows"], board.get("significance", []), strict=False):
        label = f"{row['model']} {row['method']} {row['allocator']} {row['target']}"
        for metric, summary in tests.items():
            # a row of calibration draws: one line per draw, each draw tested on its own
            for t in summary.get("draws") or [summary]:
                rows.append(significance_row(f"{label} draw={t['draw']}" if "draw" in t else label, metric, t))
    if not rows:
        return ""
    columns = list(rows[0])
    return "<h2>Paired tests against the baseline</h2>\n" + table(columns, rows, table_id="significance")


def significance_row(label: str, metric: str, t: dict) -> dict[str, Any]:
    return {
        "cell": label,
        "metric": metric,
        "n": t["n"],
        "Δ vs baseline": t["diff"],
        "95% CI": f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]",
        "McNemar p": t["mcnemar_p"],
        "bootstrap p": t["bootstrap_p"],
        "significant": "yes" if t["significant"] else f"no {significance.mark_of(t)}",
        "resolves (80% power)": "—" if "resolvable" not in t else f"{t['resolvable'] * 100:.1f} points",
    }


def provenance_html(results: Sequence[dict]) -> str:
    rows = [provenance_row(members) for members in draws.group(sorted(results, key=leaderboard.order_key))]
    parts = ["<h2>Provenance</h2>", table(list(rows[0]) if rows else [], rows, table_id="provenance")]
    last = (results[-1].get("provenance") or {}) if results else {}
    if last:
        items = {
            "command": last.get("command"),
            "suite file": last.get("suite_file"),
            "hardware": last.get("hardware"),
            "libraries": last.get("libraries"),
            "plugins": last.get("plugins"),
        }
        parts.append(
            "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd><code>{esc(v)}</code></dd>" for k, v in items.items()) + "</dl>"
        )
    return "\n".join(parts)


def provenance_row(members: Sequence) -> dict[str, Any]:
    """One record's provenance; for one configuration's draws (``draws.group``) one row: ``draws=0,1,..``
    beside the label, every draw's cell id, and each other column's values where the draws differ."""
    first = members[0]

    def joined(values: list) -> Any:
        distinct = list(dict.fromkeys(values))
        return distinct[0] if len(distinct) == 1 else "; ".join(str(v) for v in distinct)

    def column(of) -> Any:
        return joined([of(r) for r in members])

    label = leaderboard.row_label(first)
    if len(members) == 1:
        label += f" draw={d}" if (d := getattr(first, "draw", 0)) else ""
    else:
        label += " draws=" + ",".join(str(draws.draw_of(r)) for r in members)
    statuses = [r.status for r in members]
    return {
        "cell": label,
        "model": first.model_id,
        "cell id": " ".join(r.cell_id for r in members),
        "status": statuses[0] if len(set(statuses)) == 1 else ", ".join(statuses),
        "created": column(lambda r: r.provenance.get("created")),
        "git": column(lambda r: r.provenance.get("git")),
        "hardware": column(lambda r: hardware_label(r.provenance["hardware"]) if r.provenance.get("hardware") else "—"),
        "seed": column(lambda r: r.provenance.get("seed")),
        "limit": column(lambda r: r.provenance.get("limit")),
    }


def render_html(board: dict, results: Sequence[dict], plots: Sequence[Path], title: str, directory: Path) -> str:
    created = datetime.now(UTC).isoformat(timespec="seconds")
    body = "\n".join(
        [
            f"<h1>{esc(title)}</h1>",
            f"<p>{len(results)} cells from <code>{esc(directory)}</code>.</p>",
            leaderboard_html(board),
            plots_html(plots, pareto.caption(results)),
            significance_html(board),
            provenance_html(results),
            f"<footer>Written by harness report at {esc(created)}.</footer>",
        ]
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
