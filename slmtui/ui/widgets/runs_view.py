"""The Runs tab: a panel per running run, and every run with its state and reason."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Static

from slmtui.board import Board, RunState
from slmtui.ui.cells import duration, num, where
from slmtui.ui.tables import fill_table
from slmtui.ui.widgets.run_panel import RunPanel

CURSOR_KEYS = frozenset({"up", "down", "pageup", "pagedown", "home", "end", "enter"})
"""Keys that move (or act on) the list's cursor: after one, updates keep the user's row."""

_STATE_STYLE = {
    "queued": ("…", "dim"),
    "running": ("▶", "cyan"),
    "finished": ("✓", "green"),
    "failed": ("✗", "red"),
    "cancelled": ("⊘", "yellow"),
}


LIST_COLUMNS = (
    ("state", ""),
    ("label", "Run"),
    ("status", "State"),
    ("samples", "Samples"),
    ("detail", "Result or reason"),
)


def _list_order(run: RunState) -> tuple[int, float]:
    rank = {"running": 0, "queued": 1}.get(run.status, 2)
    when = run.ended_at or run.started_at or run.queued_at or 0.0
    return (rank, when if rank < 2 else -when)


class RunsView(Vertical):
    """Shows the app's Board; ``refresh_runs`` after the board changed."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "cancel_run", "Cancel run", id="runs.cancel", tooltip="Cancel this run"),
        Binding("i", "inspect", "Inspect", id="runs.inspect", tooltip="Metrics, samples, log"),
    ]

    DEFAULT_CSS = """
    RunsView { height: 1fr; }
    RunsView #panels { height: auto; max-height: 60%; }
    RunsView.-wide #panels { layout: grid; grid-size: 2; grid-gutter: 0 1; grid-rows: auto; }
    RunsView #idle { height: auto; padding: 0 1; color: $text-muted; }
    RunsView #run-list { height: 1fr; }
    """

    class CancelRequested(Message):
        """The user asked to cancel a run."""

        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

    class InspectRequested(Message):
        """The user asked to inspect a run."""

        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

    def __init__(self, board: Board, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.board = board
        self.panels: dict[str, RunPanel] = {}
        """Panel per running run id (a removed panel lingers in queries until it is gone)."""
        self.touched = False
        """Whether the user moved the list's cursor (then updates keep it on their row)."""

    def compose(self) -> ComposeResult:
        yield Static(id="idle")
        yield VerticalScroll(id="panels")
        yield DataTable(id="run-list", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.refresh_runs()

    def on_resize(self) -> None:
        self.set_class(self.size.width >= 140, "-wide")

    def refresh_runs(self) -> None:
        """Sync panels (one per running run) and the list with the board."""
        self._sync_panels()
        self._sync_list()

    def _sync_panels(self) -> None:
        container = self.query_one("#panels", VerticalScroll)
        running = {r.run_id: r for r in self.board.running()}
        for run_id in [k for k in self.panels if k not in running]:
            self.panels.pop(run_id).remove()
        new = []
        for run_id, run in running.items():
            panel = self.panels.get(run_id)
            if panel is None:
                panel = self.panels[run_id] = RunPanel(run, id=f"panel-{run_id}")
                new.append(panel)
            else:
                panel.show(run)
        if new:
            container.mount_all(new)
        self.query_one("#idle", Static).update(self.headline())

    def headline(self) -> str:
        """One line over the panels: counts by state and what to do next."""
        c = self.board.counts()
        if not self.board.runs:
            return "No run yet: pick models and tasks (1), then launch them with R."
        ended = f"{c['finished']} done · {c['failed']} failed · {c['cancelled']} cancelled"
        if c["running"] or c["queued"]:
            return f"{c['running']} running · {c['queued']} queued · {ended} · c/C cancel"
        return f"Nothing running · {ended} · 1, R: launch more"

    def _sync_list(self) -> None:
        """Rebuild the list (running, queued, then ended newest first); the cursor stays on
        the user's run once they moved it, else on the top row."""
        table = self.query_one("#run-list", DataTable)
        keep = self._cursor_run() if self.touched else None
        rows = [
            (run.run_id, self.row_cells(run))
            for run in sorted(self.board.runs.values(), key=_list_order)
        ]
        fill_table(table, LIST_COLUMNS, rows, max_widths={"label": 48, "detail": 72})
        if not table.row_count:
            return
        row = table.get_row_index(keep) if keep in table.rows else 0
        table.move_cursor(row=row, animate=False)

    @staticmethod
    def row_cells(run: RunState) -> tuple[Text, str, Text, str, Text]:
        mark, style = _STATE_STYLE.get(run.status, ("?", ""))
        status = run.phase if run.status == "running" else run.status
        total = run.total
        samples = f"{run.done}/{total}" if total else (str(run.done) if run.done else "")
        if run.status == "finished" and run.metrics:
            m = run.metrics
            unit = m.get("throughput_unit") or ""
            detail = Text(
                f"acc {num(m.get('accuracy'), 3)} · {num(m.get('throughput'), 1, unit)} · "
                f"{num(m.get('latency_ms'), 1, 'ms')} · {num(m.get('peak_mem_mb'), 0, 'MB')}"
            )
            if m.get("engine_fallback"):
                detail.append(f" · ran {m.get('engine')} (see Inspect)", style="yellow")
        elif run.error is not None:
            detail = Text(run.reason, style=style)
        elif run.status == "running" and run.eta_s is not None:
            detail = Text(f"ETA {duration(run.eta_s)}")
        else:
            detail = Text("")
        label = (
            run.label
            if run.spec is None
            else (f"{run.spec.model_label} · {run.spec.task} · {where(run.spec.gpus)}")
        )
        return Text(mark, style=style), label, Text(status, style=style), samples, detail

    def _cursor_run(self) -> str | None:
        table = self.query_one("#run-list", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return key.value

    def on_key(self, event: events.Key) -> None:
        """A key that moves the list's cursor counts as the user taking it (``R`` to launch, or
        ``c`` to cancel, does not: the cursor then keeps following the newest runs)."""
        if event.key in CURSOR_KEYS:
            self.touched = True

    def on_click(self) -> None:
        self.touched = True

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value:
            self.post_message(self.InspectRequested(event.row_key.value))

    def action_cancel_run(self) -> None:
        run_id = self._cursor_run()
        if run_id is not None:
            self.post_message(self.CancelRequested(run_id))

    def action_inspect(self) -> None:
        run_id = self._cursor_run()
        if run_id is not None:
            self.post_message(self.InspectRequested(run_id))
