"""PER rows as CSV, JSON or Markdown text. Stdlib only.

Every format carries the inputs (model, task, accuracy, THR, LAT, MEM, energy), PER, its rank,
the Pareto flag and the normalised factors, so an export can be re-checked by hand.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from slmtui.per import PerRow, summarise_models

PER_NOTE = (
    "PER is relative to the models in this table: add or remove a model and every PER of "
    "that task can change."
)

COLUMNS: tuple[str, ...] = (
    "model",
    "task",
    "accuracy",
    "throughput",
    "throughput_unit",
    "latency_ms",
    "memory_mb",
    "energy_j",
    "per",
    "rank",
    "pareto",
    "acc_n",
    "thr_n",
    "lat_n",
    "mem_n",
    "energy_n",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "itl_p50_ms",
    "itl_p95_ms",
)
"""Columns of the CSV export and keys of each JSON object, in this order."""
LATENCY_COLUMNS = ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms")
"""Per-sequence latency (generate runs), from the run's metrics when the caller passes them."""

Metrics = Mapping[str, Mapping[str, Any]]
"""Run metrics by PER row key (the run id)."""


def row_record(row: PerRow, metrics: Metrics | None = None) -> dict[str, Any]:
    """One PER row as a flat dict with the keys of ``COLUMNS`` (``None`` where unknown)."""
    given = row.input
    found = (metrics or {}).get(given.key or "", {})
    return {
        "model": given.model,
        "task": given.task,
        "accuracy": given.accuracy,
        "throughput": given.throughput,
        "throughput_unit": given.throughput_unit,
        "latency_ms": given.latency_ms,
        "memory_mb": given.memory_mb,
        "energy_j": given.energy_j,
        "per": row.per,
        "rank": row.rank,
        "pareto": row.pareto,
        "acc_n": row.acc_n,
        "thr_n": row.thr_n,
        "lat_n": row.lat_n,
        "mem_n": row.mem_n,
        "energy_n": row.energy_n,
        **{k: found.get(k) for k in LATENCY_COLUMNS},
    }


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


def to_csv(rows: Sequence[PerRow], metrics: Metrics | None = None) -> str:
    """CSV with a header of ``COLUMNS``; empty cells where a value is unknown."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        record = row_record(row, metrics)
        writer.writerow([_csv_cell(record[c]) for c in COLUMNS])
    return out.getvalue()


def to_json(rows: Sequence[PerRow], metrics: Metrics | None = None) -> str:
    """A JSON array of objects with the keys of ``COLUMNS`` (``null`` where unknown)."""
    return json.dumps([row_record(r, metrics) for r in rows], indent=2) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], align: str, body: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines; ``align`` holds 'l' or 'r' per column."""
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def to_markdown(rows: Sequence[PerRow]) -> str:
    """One table per task (best first, Pareto rows marked), then an overview across tasks."""
    lines: list[str] = ["# PER by task", "", PER_NOTE, ""]
    energy = any(r.energy_n is not None for r in rows)
    for task, task_rows in group_by_task(rows).items():
        unit = common_unit(task_rows)
        header = [
            "#",
            "Model",
            "Accuracy",
            f"THR ({unit})" if unit else "THR",
            f"LAT ({latency_unit(unit)})",
            "MEM (MB)",
            *(["Energy (J)"] if energy else []),
            "PER",
            "Pareto",
        ]
        body = [
            [
                str(r.rank),
                _md_escape(r.model),
                f"{r.input.accuracy:.3f}",
                format_throughput(r, with_unit=unit is None),
                f"{r.input.latency_ms:.2f}",
                f"{r.input.memory_mb:,.0f}",
                *([format_energy(r.input.energy_j)] if energy else []),
                f"{r.per:.3f}",
                "yes" if r.pareto else "",
            ]
            for r in task_rows
        ]
        align = "rlrrrr" + ("r" if energy else "") + "rl"
        lines += [f"## {_md_escape(task)}", "", *_md_table(header, align, body), ""]
    tasks = list(group_by_task(rows))
    if len(tasks) > 1:
        summaries = summarise_models(rows)
        header = ["Model", "Mean PER", "Tasks", *map(_md_escape, tasks)]
        body = [
            [
                _md_escape(s.model),
                f"{s.mean_per:.3f}",
                str(s.tasks),
                *(f"{s.per_by_task[t]:.3f}" if t in s.per_by_task else "-" for t in tasks),
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


def latency_unit(throughput_unit: str | None) -> str:
    """LAT's unit that goes with a THR unit: ms/token for tokens/s, ms/sample for samples/s."""
    if throughput_unit and throughput_unit.endswith("/s"):
        return "ms/" + throughput_unit.removesuffix("/s").removesuffix("s")
    return "ms"


def format_throughput(row: PerRow, *, with_unit: bool) -> str:
    text = f"{row.input.throughput:,.1f}"
    unit = row.input.throughput_unit
    return f"{text} {unit}" if with_unit and unit else text


def format_energy(energy_j: float | None) -> str:
    return "-" if energy_j is None else f"{energy_j:.3g}"
