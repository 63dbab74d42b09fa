"""The Rank tab: PER and PER-rel per task and an overview across tasks, sortable, filterable,
and the same as plots (accuracy against throughput or energy, the overview as bars).

PER comes from the same ``build_per_inputs`` + ``compute_per`` that ``slmtui report`` prints, over
the rows in view: a filter changes the set, so it changes PER (the note line says so). ``n``
switches the score that ranks (the study's PER or PER-rel), ``g`` the table for a plot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Static, Tab, Tabs

from slmtui.carbon import Grid
from slmtui.errors import UserError
from slmtui.per import (
    SCORE_LABELS,
    PerRow,
    automatic_rank_by,
    automatic_rank_reason,
    compute_per,
    lead,
    summarise_models,
)
from slmtui.reports import columns
from slmtui.reports.columns import CARBON_KEYS, RANK_TASK_VIEW
from slmtui.reports.commands import build_per_inputs
from slmtui.reports.export import common_unit, group_by_task
from slmtui.store import ResultRow
from slmtui.ui.cells import num
from slmtui.ui.tables import fill_table
from slmtui.ui.widgets.plot_view import PlotView

if TYPE_CHECKING:
    from slmtui.reports.plots import Chart

OVERVIEW = "overview"


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    higher_is_better: bool | None = None
    """Which end is best, for marking the best cell; ``None``: not marked."""


def task_columns(rows: Sequence[PerRow], unit: str | None) -> list[Column]:
    """The columns of one task's table, from the column registry (``reports/columns.py``)."""
    return [Column(c.key, c.header(unit), c.better) for c in columns.shown(RANK_TASK_VIEW, rows)]


@dataclass
class Line:
    """One table row: raw values to sort by, and the row's key (a run id for a task row)."""

    key: str
    values: dict[str, Any]


class RankView(Vertical):
    """Set ``results`` with ``show_results``; the rest is driven by the keys below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "sort", "Sort", id="rank.sort", tooltip="Sort by the cursor's column"),
        Binding("v", "next_view", "Next table", id="rank.view", tooltip="Overview, then each task"),
        Binding("slash", "filter", "Filter", id="rank.filter", tooltip="Filter models and tasks"),
        Binding("i", "inspect", "Inspect", id="rank.inspect", tooltip="The run behind the row"),
        Binding(
            "n",
            "switch_score",
            "PER/PER-rel",
            id="rank.score",
            tooltip="Rank by the study's PER or by PER-rel (ratios to the best)",
        ),
        Binding("g", "toggle_plot", "Plot", id="rank.plot", tooltip="The table as a plot"),
        Binding(
            "x",
            "next_chart",
            "Next plot",
            id="rank.chart",
            tooltip="Accuracy against throughput, then against energy per correct answer",
            show=False,
        ),
        Binding("escape", "clear_filter", "Clear filter", id="rank.clear", show=False),
    ]

    DEFAULT_CSS = """
    RankView { height: 1fr; }
    RankView Tabs { height: 2; }
    RankView #filter { display: none; height: 3; }
    RankView.-filtering #filter { display: block; }
    RankView #note { height: auto; padding: 0 1; color: $text-muted; }
    RankView #rank-table { height: 1fr; }
    RankView #rank-plot { display: none; }
    RankView.-plotting #rank-plot { display: block; }
    RankView.-plotting #rank-table { display: none; }
    """

    class InspectRequested(Message):
        """The user asked to inspect the run behind a row."""

        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

    def __init__(
        self,
        load_results: Callable[[], Sequence[ResultRow]] | None = None,
        *,
        grid: Grid | None = None,
        **kwargs: object,
    ) -> None:
        """``load_results``: read once on mount (the store's results); ``grid``: the carbon
        intensity behind the CO2 columns (default: world)."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.load_results = load_results
        self.grid = grid
        self.rank_by = "per"
        """The score that orders and ranks: "per" (the study's) or "per_rel"."""
        self.rank_choice: str | None = None
        """The score the user chose with ``n``; None: ``automatic_rank_by`` (PER-rel for a
        small set, the study's PER otherwise)."""
        self.plotting = False
        self.chart_index = 0
        """Which of the task's charts the plot shows (throughput, then energy)."""
        self.results: list[ResultRow] = []
        self.per_rows: list[PerRow] = []
        self.notes: list[str] = []
        """Quantised run id -> accuracy change against its full-precision run."""
        self.view = OVERVIEW
        self.filter_text = ""
        self.sort_by: dict[str, tuple[str, bool]] = {}
        """Per view: (column key, descending)."""
        self.touched = False
        """Whether the user moved the cursor (then updates keep it on their row)."""
        self.lines: list[Line] = []
        self.columns: list[Column] = []
        self.tab_tasks: dict[str, str] = {}
        """Task label per tab id, in the order the tabs were added."""

    def compose(self) -> ComposeResult:
        yield Tabs(Tab("Overview", id=OVERVIEW), id="views")
        yield Input(placeholder="filter: words matching model or task names", id="filter")
        yield Static(id="note")
        yield DataTable(id="rank-table", cursor_type="cell", zebra_stripes=True, fixed_columns=2)
        yield PlotView(id="rank-plot")

    def on_mount(self) -> None:
        self.show_results(self.load_results() if self.load_results is not None else [])

    # -- data ---------------------------------------------------------------------------------

    def show_results(self, results: Sequence[ResultRow]) -> None:
        """New stored results (a run finished): recompute PER and redraw, cursor kept."""
        self.results = list(results)
        self._recompute()

    def _in_view(self) -> list[ResultRow]:
        """The results the filter keeps: each word names models or tasks (a part of the name
        is enough); rows of any named model, on any named task ("qwen llama gsm8k")."""
        words = self.filter_text.lower().split()
        if not words:
            return self.results
        models = {r.model.lower() for r in self.results}
        tasks = {r.task.lower() for r in self.results}
        model_words = [w for w in words if any(w in m for m in models)]
        task_words = [w for w in words if any(w in t for t in tasks)]
        if len(set(model_words) | set(task_words)) < len(set(words)):
            return []  # a word that names nothing keeps nothing
        return [
            r
            for r in self.results
            if (not model_words or any(w in r.model.lower() for w in model_words))
            and (not task_words or any(w in r.task.lower() for w in task_words))
        ]

    def _recompute(self) -> None:
        built = build_per_inputs(self._in_view(), grid=self.grid)
        self.notes = built.notes
        self.rank_by = self.rank_choice or automatic_rank_by(built.inputs)
        try:
            self.per_rows = compute_per(built.inputs, rank_by=self.rank_by)
        except UserError as exc:
            self.per_rows = []
            self.notes = [*self.notes, str(exc)]
        self._sync_tabs()
        self._fill()

    def _sync_tabs(self) -> None:
        """A tab per task seen; tabs are only ever added (removing one while it is active, or
        adding it back before the removal lands, breaks Tabs), so a filter leaves them."""
        tabs = self.query_one("#views", Tabs)
        for task in group_by_task(self.per_rows):
            tab_id = _tab_id(task)
            if tab_id not in self.tab_tasks:
                self.tab_tasks[tab_id] = task
                tabs.add_tab(Tab(task, id=tab_id))

    @on(Tabs.TabActivated)
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        event.stop()
        tab_id = event.tab.id or OVERVIEW
        view = self.tab_tasks.get(tab_id, OVERVIEW)
        if view != self.view:
            self.view = view
            self.touched = False
            self._fill()

    def _fill(self) -> None:
        table = self.query_one("#rank-table", DataTable)
        keep = self._cursor_key() if self.touched else None
        column = table.cursor_column
        if self.view == OVERVIEW:
            self.columns, self.lines = self._overview_lines()
        else:
            self.columns, self.lines = self._task_lines(self.view)
        key, descending = self.sort_by.get(self.view, ("", False))
        if key:
            self.lines.sort(key=lambda line: _sort_key(line.values.get(key)), reverse=descending)
        best = self._best_values()
        labels = [
            (c.key, c.label + ((" ▼" if descending else " ▲") if c.key == key else ""))
            for c in self.columns
        ]
        rows = [
            (line.key, [self._cell(c, line, best) for c in self.columns]) for line in self.lines
        ]
        fill_table(table, labels, rows, max_widths={"model": 32})
        self._show_note()
        self._show_plot()
        if not table.row_count:
            return
        row = 0
        if keep is not None:
            row = next((n for n, line in enumerate(self.lines) if line.key == keep), 0)
        table.move_cursor(row=row, column=min(column, len(self.columns) - 1), animate=False)

    def _overview_lines(self) -> tuple[list[Column], list[Line]]:
        tasks = list(group_by_task(self.per_rows))
        label = SCORE_LABELS[self.rank_by]
        columns = [
            Column("rank", "#"),
            Column("model", "Model"),
            Column("mean_per", "Mean PER", True),
            Column("mean_per_rel", "Mean PER-rel", True),
            Column("tasks", "Tasks"),
            Column("pareto", "Pareto tasks"),
            *(Column(f"per:{t}", f"{label} {t}", True) for t in tasks),
        ]
        lines = []
        for n, s in enumerate(summarise_models(self.per_rows, self.rank_by), start=1):
            values: dict[str, Any] = {
                "rank": n,
                "model": s.model,
                "mean_per": s.mean_per,
                "mean_per_rel": s.mean_per_rel,
                "tasks": s.tasks,
                "pareto": s.pareto_tasks,
            }
            for t in tasks:
                values[f"per:{t}"] = s.by_task(self.rank_by).get(t)
            lines.append(Line(f"model:{s.model}", values))
        return columns, lines

    def _task_lines(self, task: str) -> tuple[list[Column], list[Line]]:
        rows = group_by_task(self.per_rows).get(task, [])
        shown = task_columns(rows, common_unit(rows))
        lines = []
        for n, r in enumerate(rows):
            values = {c.key: columns.BY_KEY[c.key].read(r) for c in shown}
            values["rank"] = r.rank_by(self.rank_by)
            lines.append(Line(r.input.key or f"{r.model}:{n}", values))
        return shown, lines

    def _best_values(self) -> dict[str, Any]:
        best: dict[str, Any] = {}
        for col in self.columns:
            values = [line.values.get(col.key) for line in self.lines]
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if col.higher_is_better is None or len(numbers) < 2:
                continue
            best[col.key] = max(numbers) if col.higher_is_better else min(numbers)
        return best

    def _cell(self, col: Column, line: Line, best: dict[str, Any]) -> Text:
        value = line.values.get(col.key)
        if col.key == "rank":
            return Text(
                f"★{value}" if value == 1 else f" {value}", style="bold" if value == 1 else ""
            )
        if col.key == "model":
            return Text(str(value), style="bold" if line.values.get("rank") == 1 else "")
        if col.key == "pareto":
            if isinstance(value, bool):
                return Text("◆ front" if value else "", style="green")
            return Text(str(value), justify="right")
        if col.key == "tasks":
            return Text(str(value), justify="right")
        if col.key == "limiting":
            return Text(value or "–", style="dim" if value is None else "")
        if col.key in CARBON_KEYS:
            return Text("–" if value is None else f"{value:.3g}", justify="right")
        registered = columns.BY_KEY.get(col.key)
        text = Text(num(value, registered.digits if registered else 3), justify="right")
        if col.key in (self.rank_by, f"mean_{self.rank_by}"):
            text.stylize("bold")
        if col.key in best and value == best[col.key]:
            text.stylize("bold green underline")
        return text

    def _show_note(self) -> None:
        models = len({r.model for r in self.per_rows})
        note = Text()
        if not self.results:
            note.append("No finished run stored yet: launch runs from Pick (1, then R).")
        else:
            label = SCORE_LABELS[self.rank_by]
            other = SCORE_LABELS["per" if self.rank_by == "per_rel" else "per_rel"]
            note.append(f"Ranked by {label}", style="bold")
            if self.rank_choice is None and self.rank_by == "per_rel":
                note.append(f" ({automatic_rank_reason(self.rank_by)})")
            note.append(
                f"  (n: {other}), relative to the {models} model{'s' * (models != 1)} in view. "
                "PER is 0 for a model worst on any factor; PER-rel divides each by the best.\n"
            )
            found = None
            if self.view != OVERVIEW:
                found = lead(group_by_task(self.per_rows).get(self.view, []))
            if found is not None:
                note.append(found.sentence() + "\n", style="italic")
            if self.grid is not None and any(
                r.input.extra.get("co2_run_g") is not None for r in self.per_rows
            ):
                note.append(f"CO2 at {self.grid.label} · ", style="")
            note.append(f"★ best {label} · ◆ Pareto front · ")
            note.append("underlined", style="bold green underline")
            note.append(": best in column")
            if self.filter_text:
                kept = "nothing matches it" if not self.lines else f"{len(self.lines)} rows"
                note.append(
                    f"\nfilter {self.filter_text!r}: {kept} (/ edits, escape clears)",
                    style="bold",
                )
        self.query_one("#note", Static).update(note)

    # -- actions ------------------------------------------------------------------------------

    def _cursor_key(self) -> str | None:
        table = self.query_one("#rank-table", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def sort(self, column_key: str) -> None:
        """Sort by ``column_key``; again on the same column flips the order."""
        current, descending = self.sort_by.get(self.view, ("", False))
        col = next((c for c in self.columns if c.key == column_key), None)
        if col is None:
            return
        # a new column starts best first; the same column again flips
        descending = not descending if current == column_key else bool(col.higher_is_better)
        self.sort_by[self.view] = (column_key, descending)
        self._fill()

    def action_sort(self) -> None:
        table = self.query_one("#rank-table", DataTable)
        if self.columns:
            self.sort(self.columns[min(table.cursor_column, len(self.columns) - 1)].key)

    @on(DataTable.HeaderSelected)
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort(str(event.column_key.value))

    def action_next_view(self) -> None:
        tabs = self.query_one("#views", Tabs)
        tabs.action_next_tab()

    def action_filter(self) -> None:
        self.add_class("-filtering")
        field = self.query_one("#filter", Input)
        field.value = self.filter_text
        field.focus()

    def action_clear_filter(self) -> None:
        self.remove_class("-filtering")
        if self.filter_text:
            self.set_filter("")
        self.query_one("#rank-table", DataTable).focus()

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        self.touched = False
        self._recompute()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.remove_class("-filtering")
        self.set_filter(event.value)
        self.query_one("#rank-table", DataTable).focus()

    @on(DataTable.CellHighlighted)
    def _moved(self, event: DataTable.CellHighlighted) -> None:
        if event.coordinate.row != 0:
            self.touched = True

    @on(DataTable.CellSelected)
    def _selected(self, event: DataTable.CellSelected) -> None:
        event.stop()
        self.action_inspect()

    def action_inspect(self) -> None:
        key = self._cursor_key()
        if key is None:
            return
        if key.startswith("model:"):
            self.notify("Open a task's table (v) to inspect a run.", title="Inspect")
            return
        self.post_message(self.InspectRequested(key))

    def action_switch_score(self) -> None:
        """Rank by the other score: the study's PER or PER-rel."""
        self.rank_choice = "per_rel" if self.rank_by == "per" else "per"
        self.sort_by.clear()
        self._recompute()

    def action_toggle_plot(self) -> None:
        self.plotting = not self.plotting
        self.set_class(self.plotting, "-plotting")
        self._show_plot()
        if not self.plotting:
            self.query_one("#rank-table", DataTable).focus()

    def action_next_chart(self) -> None:
        self.chart_index += 1
        if not self.plotting:
            self.action_toggle_plot()
        else:
            self._show_plot()

    def charts(self) -> list[Chart]:
        """The charts of the current view: the overview's bars, or a task's scatters."""
        from slmtui.reports.plots import overview_chart, task_charts

        if not self.per_rows:
            return []
        if self.view == OVERVIEW:
            return [overview_chart(self.per_rows, self.rank_by)]
        return task_charts(self.view, group_by_task(self.per_rows).get(self.view, []))

    def _show_plot(self) -> None:
        if not self.plotting:
            return
        charts = self.charts()
        chart = charts[self.chart_index % len(charts)] if charts else None
        self.query_one("#rank-plot", PlotView).show(chart)

    def rows_in_view(self) -> list[PerRow]:
        """The PER rows the tables show (all tasks), for export."""
        return list(self.per_rows)


def _tab_id(task: str) -> str:
    return "task-" + "".join(ch if ch.isalnum() else "-" for ch in task)


def _sort_key(value: Any) -> tuple[int, Any]:
    """Missing values sort as the smallest; text without case."""
    if value is None:
        return (0, 0)
    if isinstance(value, str):
        return (1, value.lower())
    return (1, value)
