"""PER as rich tables: one per task, then an overview across tasks (headless output)."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from slmtui.per import SCORE_LABELS, PerRow, lead, summarise_models
from slmtui.reports import columns
from slmtui.reports.export import PER_NOTE, SCORES_NOTE, common_unit, group_by_task

PARETO_MARK = "★"
BEST_STYLE = "bold green"


FACTORS_MIN_WIDTH = 110
"""Terminal width from which the normalised factors get their own columns."""


def task_table(
    task: str, rows: Sequence[PerRow], *, factors: bool = True, by: str = "per"
) -> Table:
    """One task's rows, best first by ``by`` (PER or PER-rel); the best row in bold green,
    Pareto rows starred.

    ``factors`` adds the normalised factors (ACCn, THRn, LATn, MEMn, En) that PER multiplies,
    the factor limiting each row's PER-rel, and CO2 per correct answer.
    """
    unit = common_unit(rows)
    table = Table(
        title=f"{task} · {len(rows)} model{'s' if len(rows) != 1 else ''} · "
        f"ranked by {SCORE_LABELS[by]}",
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    figures = columns.shown(columns.TABLE_VIEW, rows)
    if factors:
        figures += columns.shown(columns.TABLE_FACTORS_VIEW, rows)
    scores = [columns.BY_KEY["per"], columns.BY_KEY["per_rel"]]
    if factors:
        scores += columns.shown(("limiting", "acc_n", "thr_n", "lat_n", "mem_n", "energy_n"), rows)
    shown = [*figures, *scores]
    headers = ["#", PARETO_MARK, "Model", *(c.header(unit, style="table") for c in shown)]
    body = [
        [
            str(row.rank_by(by)),
            PARETO_MARK if row.pareto else "",
            row.model,
            *(columns.cell(c, row, unit) for c in shown),
        ]
        for row in rows
    ]
    active = SCORE_LABELS[by]
    for index, header in enumerate(headers):
        # numbers are never cut: each column is at least as wide as its widest cell
        widest = max((len(cells[index]) for cells in body), default=1)
        table.add_column(
            header,
            justify="left" if header in ("Model", "Limited\nby") else "right",
            no_wrap=True,
            min_width=min(widest, 40),
            style="dim" if header.endswith("n") else ("bold" if header == active else None),
        )
    for row, cells in zip(rows, body, strict=True):
        table.add_row(*cells, style=BEST_STYLE if row.rank_by(by) == 1 else None)
    return table


def _model_width(rows: Sequence[PerRow]) -> int:
    """Model names are what a reader scans for: keep them whole up to 40 characters."""
    return min(40, max((len(r.model) for r in rows), default=5))


def overview_table(rows: Sequence[PerRow], by: str = "per") -> Table:
    """Mean PER (or PER-rel) per model over its tasks, with each task's and the tasks counted."""
    label = SCORE_LABELS[by]
    tasks = list(group_by_task(rows))
    table = Table(
        title="Overview across tasks",
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("Model", no_wrap=True, min_width=_model_width(rows))
    table.add_column(f"Mean {label}", justify="right", style="bold")
    table.add_column("Tasks", justify="right")
    table.add_column(f"On {PARETO_MARK}", justify="right")
    for task in tasks:
        table.add_column(task, justify="right")
    summaries = summarise_models(rows, by)
    best = summaries[0].mean(by) if summaries else None
    for s in summaries:
        scores = s.by_task(by)
        table.add_row(
            s.model,
            f"{s.mean(by):.3f}",
            str(s.tasks),
            str(s.pareto_tasks),
            *(f"{scores[t]:.3f}" if t in scores else "-" for t in tasks),
            style=BEST_STYLE if s.mean(by) == best else None,
        )
    return table


def render_per_tables(
    rows: Sequence[PerRow],
    console: Console,
    *,
    title: str | None = None,
    by: str = "per",
    grid_label: str | None = None,
    reason: str | None = None,
) -> None:
    """Print a table per task with the factor that decides it, an overview when there are
    several tasks, and the notes (which score ranks and, given ``reason``, why it was chosen;
    why the study's PER can be 0; the grid behind CO2)."""
    if title:
        console.print(Text(title, style="bold"))
    groups = group_by_task(rows)
    factors = console.width >= FACTORS_MIN_WIDTH
    for task, task_rows in groups.items():
        console.print(task_table(task, task_rows, factors=factors, by=by))
        if (found := lead(task_rows)) is not None:
            console.print(Text(found.sentence(), style="italic"))
    if len(groups) > 1:
        console.print(overview_table(rows, by))
    carbon = any(r.input.extra.get("co2_run_g") is not None for r in rows)
    console.print(
        Text(
            f"Ranked by {SCORE_LABELS[by]} ({f'{reason}; ' if reason else ''}"
            f"--rank-by per or per-rel). {SCORES_NOTE} "
            f"{PARETO_MARK} on the Pareto front: no other model of the task is at least as good "
            "on every factor and better on one. "
            + PER_NOTE
            + (
                f" CO2 at {grid_label}; '-' where no energy was measured."
                if carbon and grid_label
                else ""
            )
            + ("" if factors else " Widen the terminal to see the normalised factors."),
            style="dim",
        )
    )
