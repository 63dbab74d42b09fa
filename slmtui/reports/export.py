"""PER rows as CSV, JSON or Markdown text. Stdlib only.

Every format carries the inputs (model, task, accuracy, THR, LAT, MEM, energy, CO2), PER and
PER-rel with their ranks, the Pareto flag, the normalised factors and the ratios to the best, so
an export can be re-checked by hand. Given the stored runs (``slmtui report``), CSV and JSON also
carry every stored metric, the settings, the hardware and the versions of each run; the JSON
holds each run as stored, so ``slmtui import`` can merge it into another store.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from slmtui.per import SCORE_LABELS, PerRow, lead, summarise_models
from slmtui.reports import columns

PER_NOTE = (
    "PER is relative to the models in this table: add or remove a model and every PER of "
    "that task can change."
)
SCORES_NOTE = (
    "PER (the study's) min-max normalises each factor over the models in view, so a model worst "
    "on any factor gets 0 (with two models, usually both). PER-rel divides each factor by the "
    "best in view instead: 1.0 is best on everything, it is 0 only for zero accuracy, and a "
    "model that joins worse on everything changes no other PER-rel."
)
FORMAT_NAME = "slmtui-report"
FORMAT_VERSION = 1
UNITS: dict[str, str] = {
    **columns.units(),
    "run.metrics": "names carry their unit: _s seconds, _ms, _mb, _j joules, _w watts, _pct",
}
"""What each exported number means, in which unit (the JSON export's ``units``)."""

COLUMNS: tuple[str, ...] = columns.export_keys()
"""Columns of the CSV export and keys of each JSON row, in this order (the CSV then adds the
stored run's settings, hardware and metrics when it has them): ``reports/columns.py``."""
CARBON_KEYS = columns.CARBON_KEYS


def row_record(row: PerRow) -> dict[str, Any]:
    """One PER row as a flat dict with the keys of ``COLUMNS`` (``None`` where unknown)."""
    return columns.record(row)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts as dotted keys; lists as JSON text (one CSV cell each)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list | tuple):
        return {prefix: json.dumps(value, default=str)}
    return {prefix: value}


def run_columns(run: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run (``Store.export_runs``) as flat CSV cells: settings, hardware, metrics."""
    skip = {"spec", "metrics", "hardware", "model", "task", "samples"}
    cells = {f"run.{k}": v for k, v in run.items() if k not in skip}
    cells.update(flatten(run.get("spec") or {}, "spec"))
    cells.update(flatten(run.get("hardware") or {}, "hardware"))
    cells.update(flatten(run.get("metrics") or {}, "metrics"))
    return cells


def to_csv(rows: Sequence[PerRow], runs: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """CSV with a header of ``COLUMNS`` (then, with ``runs`` by run id, each run's stored
    settings, hardware and metrics as ``spec.*``, ``hardware.*``, ``metrics.*`` columns);
    empty cells where a value is unknown."""
    records = [row_record(r) for r in rows]
    extra: list[dict[str, Any]] = []
    names: dict[str, None] = {}
    for record in records:
        run = (runs or {}).get(record["run_id"] or "")
        cells = run_columns(run) if run is not None else {}
        extra.append(cells)
        names.update(dict.fromkeys(cells))
    header = [*COLUMNS, *names]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for record, cells in zip(records, extra, strict=True):
        merged = {**record, **cells}
        writer.writerow([_csv_cell(merged.get(c)) for c in header])
    return out.getvalue()


def to_json(
    rows: Sequence[PerRow],
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    ranked_by: str = "per",
    rank_reason: str | None = None,
    grid: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """A JSON object: format, versions, units, the score that ranks (and why, when it was
    chosen automatically: ``ranked_by_reason``, else null), the grid and PER options used, and
    ``rows`` (objects with the keys of ``COLUMNS``, ``null`` where unknown; with ``runs``, each
    row's ``run`` holds the run as stored, for ``slmtui import``)."""
    from slmtui import __version__

    body = []
    for row in rows:
        record = row_record(row)
        run = (runs or {}).get(record["run_id"] or "")
        if run is not None:
            record["run"] = dict(run)
        body.append(record)
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "slmtui_version": __version__,
        "ranked_by": ranked_by,
        "ranked_by_reason": rank_reason,
        "per_options": dict(options or {}),
        "grid": dict(grid) if grid is not None else None,
        "units": UNITS,
        "rows": body,
    }
    return json.dumps(document, indent=2, default=str) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], align: str, body: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines; ``align`` holds 'l' or 'r' per column."""
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def to_markdown(rows: Sequence[PerRow], *, by: str = "per", reason: str | None = None) -> str:
    """One table per task (best first by ``by``, Pareto rows marked, the deciding factor
    named), then an overview across tasks; ``reason``: why ``by`` was chosen, when it was
    chosen automatically."""
    label = SCORE_LABELS[by]
    ranked = f"Ranked by {label}" + (f" ({reason})" if reason else "")
    lines: list[str] = ["# PER by task", "", f"{ranked}. {PER_NOTE}", "", SCORES_NOTE, ""]
    figures = columns.shown(columns.MARKDOWN_VIEW, rows)  # the same columns in every task
    for task, task_rows in group_by_task(rows).items():
        unit = common_unit(task_rows)
        header = ["#", "Model", *(c.header(unit, style="md") for c in figures), "Pareto"]
        body = [
            [
                str(r.rank_by(by)),
                _md_escape(r.model),
                *(columns.cell(c, r, unit) for c in figures),
                "yes" if r.pareto else "",
            ]
            for r in task_rows
        ]
        align = "rl" + "".join("l" if c.key == "limiting" else "r" for c in figures) + "l"
        lines += [f"## {_md_escape(task)}", "", *_md_table(header, align, body), ""]
        if (found := lead(task_rows)) is not None:
            lines += [found.sentence(), ""]
    tasks = list(group_by_task(rows))
    if len(tasks) > 1:
        summaries = summarise_models(rows, by)
        header = ["Model", f"Mean {label}", "Tasks", *map(_md_escape, tasks)]
        body = [
            [
                _md_escape(s.model),
                f"{s.mean(by):.3f}",
                str(s.tasks),
                *(f"{s.by_task(by)[t]:.3f}" if t in s.by_task(by) else "-" for t in tasks),
            ]
            for s in summaries
        ]
        lines += ["## Overview", "", *_md_table(header, "lrr" + "r" * len(tasks), body), ""]
    return "\n".join(lines)


# -- shared with the rich tables -----------------------------------------------------------------


def group_by_task(rows: Sequence[PerRow]) -> dict[str, list[PerRow]]:
    """Rows by task, tasks in order of first appearance, rows in the order given."""
    groups: dict[str, list[PerRow]] = {}
    for row in rows:
        groups.setdefault(row.task, []).append(row)
    return groups


def common_unit(rows: Sequence[PerRow]) -> str | None:
    """The throughput unit all rows share, else ``None`` (unknown or mixed)."""
    units = {r.input.throughput_unit for r in rows}
    return units.pop() if len(units) == 1 else None


def format_throughput(row: PerRow, *, with_unit: bool) -> str:
    text = f"{row.input.throughput:,.1f}"
    unit = row.input.throughput_unit
    return f"{text} {unit}" if with_unit and unit else text


def format_energy(energy_j: float | None) -> str:
    return "-" if energy_j is None else f"{energy_j:.3g}"


def format_grams(grams: float | None) -> str:
    """gCO2e with 3 significant digits; "-" when absent (no energy measured, e.g. on CPU)."""
    return "-" if grams is None else f"{grams:.3g}"
