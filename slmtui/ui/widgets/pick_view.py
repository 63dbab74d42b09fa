"""The Pick tab: models, tasks, their settings, the GPUs, and what a launch would run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from slmtui.errors import UserError
from slmtui.plan import plan_runs
from slmtui.scheduler import Gpu
from slmtui.spec import RunSpec, model_label
from slmtui.ui.cells import gpus_text
from slmtui.ui.selection import Selection
from slmtui.ui.tables import fill_table
from slmtui.ui.widgets.gpu_box import GpuBox

CompletedKeys = Callable[[], set[str]]

MODEL_COLUMNS = (
    ("on", "✓"),
    ("name", "Model"),
    ("source", "Source"),
    ("gpus", "GPUs"),
    ("dtype", "dtype"),
    ("batch", "Batch"),
    ("stored", "Stored"),
)
TASK_COLUMNS = (
    ("on", "✓"),
    ("name", "Task"),
    ("limit", "Limit"),
    ("fewshot", "Few-shot"),
    ("mode", "Mode"),
)


class PickView(Vertical):
    """Edits the app's Selection; the app launches it (R) or saves it (w)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "toggle", "Select", id="pick.toggle", tooltip="Select or drop the row"),
        Binding("a", "add_model", "Add model", id="pick.add", tooltip="Hub id, local dir or .gguf"),
        Binding(
            "d,delete",
            "remove_model",
            "Remove",
            id="pick.remove",
            tooltip="Remove the model",
            show=False,
        ),
        Binding("g", "cycle_gpus", "GPUs", id="pick.gpus", tooltip="Next GPU count the box has"),
        Binding("t", "cycle_dtype", "dtype", id="pick.dtype", tooltip="Next dtype", show=False),
        Binding(
            "z",
            "cycle_quantize",
            "Quantize",
            id="pick.quantize",
            tooltip="Weights: full precision, int8 or int4 (torchao)",
            show=False,
        ),
        Binding(
            "b", "cycle_batch", "Batch", id="pick.batch", tooltip="Next batch size", show=False
        ),
        Binding(
            "l", "edit_limit", "Limit", id="pick.limit", tooltip="Samples per task", show=False
        ),
        Binding(
            "f",
            "edit_fewshot",
            "Few-shot",
            id="pick.fewshot",
            tooltip="Few-shot examples",
            show=False,
        ),
        Binding(
            "m",
            "cycle_mode",
            "Mode",
            id="pick.mode",
            tooltip="generate or loglikelihood",
            show=False,
        ),
    ]

    DEFAULT_CSS = """
    PickView { height: 1fr; }
    PickView .title { height: 1; padding: 0 1; text-style: bold; }
    PickView DataTable { height: auto; max-height: 12; margin: 0 0 1 0; }
    PickView #plan { height: auto; padding: 0 1; }
    """

    def __init__(
        self,
        selection: Selection,
        gpus: Sequence[Gpu],
        completed_keys: CompletedKeys,
        *,
        limit: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.selection = selection
        self.gpus = list(gpus)
        self.completed_keys = completed_keys
        self.limit = limit
        self.stored_keys: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Static(
            "Models  (space select · a add · d remove · g GPUs · t dtype · b batch)",
            classes="title",
        )
        yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
        yield Static(
            "Tasks  (space select · l sample limit · f few-shot · m mode)", classes="title"
        )
        yield DataTable(id="tasks", cursor_type="row", zebra_stripes=True)
        yield GpuBox(self.gpus, id="gpu-box")
        yield Static(id="plan")

    def on_mount(self) -> None:
        self.reload()

    # -- rendering ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Redraw both tables and the plan line from the selection (cursor rows kept)."""
        self.stored_keys = self.completed_keys()
        self._fill_models()
        self._fill_tasks()
        self._show_plan()

    def _fill_models(self) -> None:
        table = self.query_one("#models", DataTable)
        row = table.cursor_row
        stored = self._stored_by_model()
        rows = [
            (
                str(n),
                (
                    "✓" if m.selected else " ",
                    # the engine when it makes a variant (quantize shows beside the dtype)
                    model_label(m.entry.name, None, m.engine),
                    m.entry.source,
                    gpus_text(m.gpus),
                    m.dtype if m.quantize == "none" else f"{m.dtype} · {m.quantize}",
                    str(m.batch_size),
                    stored.get(n, ""),
                ),
            )
            for n, m in enumerate(self.selection.models)
        ]
        fill_table(table, MODEL_COLUMNS, rows, max_widths={"name": 34, "source": 30})
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1), animate=False)

    def _fill_tasks(self) -> None:
        table = self.query_one("#tasks", DataTable)
        row = table.cursor_row
        default_limit = self.selection.profile.settings.limit
        rows = []
        for n, t in enumerate(self.selection.tasks):
            limit = self.limit or t.limit or default_limit
            rows.append(
                (
                    str(n),
                    (
                        "✓" if t.selected else " ",
                        t.name,
                        str(limit) if limit else "all",
                        str(t.shown_fewshot),
                        t.shown_mode,
                    ),
                )
            )
        fill_table(table, TASK_COLUMNS, rows)
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1), animate=False)

    def _stored_by_model(self) -> dict[int, str]:
        """'3/5' per model row: its runs of the selection already in the store."""
        out: dict[int, str] = {}
        for n, m in enumerate(self.selection.models):
            if not m.selected:
                continue
            try:
                specs = self._specs_of(n)
            except UserError:
                out[n] = "?"
                continue
            done = sum(s.run_key in self.stored_keys for s in specs)
            out[n] = f"{done}/{len(specs)}" if specs else ""
        return out

    def _specs_of(self, index: int) -> list[RunSpec]:
        label = self.selection.models[index].label
        return [s for s in self._specs() if s.model_label == label]

    def _specs(self) -> list[RunSpec]:
        return self.selection.specs(limit=self.limit)

    def _show_plan(self) -> None:
        plan_line = self.query_one("#plan", Static)
        try:
            specs = self._specs()
        except UserError as exc:
            plan_line.update(Text(f"✗ {exc}", style="bold red"))
            return
        plan = plan_runs(specs, _Keys(self.stored_keys))
        text = Text()
        text.append(f"{len(specs)} runs selected", style="bold")
        text.append(f" · {len(plan.to_run)} to run")
        if plan.skipped:
            text.append(f" · {len(plan.skipped)} already stored (skipped unless you rerun them)")
        text.append(" · R launches, w saves as a profile")
        for note in self.selection.notes:
            text.append(f"\nnote: {note}", style="dim")
        plan_line.update(text)

    # -- actions ------------------------------------------------------------------------------

    def _focused_table(self) -> str:
        focused = self.app.focused
        return focused.id if isinstance(focused, DataTable) and focused.id else "models"

    def _row(self, table_id: str) -> int | None:
        table = self.query_one(f"#{table_id}", DataTable)
        return table.cursor_row if table.row_count else None

    def action_toggle(self) -> None:
        table_id = self._focused_table()
        row = self._row(table_id)
        if row is None:
            return
        items = self.selection.models if table_id == "models" else self.selection.tasks
        items[row].selected = not items[row].selected
        self.reload()

    def action_add_model(self) -> None:
        from slmtui.ui.screens.prompt import PromptScreen

        def add(source: str | None) -> None:
            if not source:
                return
            try:
                choice = self.selection.add_model(source)
            except UserError as exc:
                self.notify(str(exc), title="Model not added", severity="error", timeout=8)
                return
            self.reload()
            self.notify(f"added {choice.entry.name} ({choice.entry.source})", title="Models")

        self.app.push_screen(
            PromptScreen(
                "Add a model",
                "A catalog name (smollm2-135m-instruct, gemma-3-270m), a hub id (org/name), "
                "a local model folder or a .gguf file.",
                placeholder="Qwen/Qwen2.5-0.5B-Instruct",
            ),
            add,
        )

    def action_remove_model(self) -> None:
        row = self._row("models")
        if row is None or self._focused_table() != "models":
            return
        removed = self.selection.remove_model(row)
        self.reload()
        self.notify(f"removed {removed.entry.name}", title="Models")

    def _model_edit(self, edit: Callable[[int], object]) -> None:
        row = self._row("models")
        if row is None:
            return
        edit(row)
        self.reload()
        self.query_one("#models", DataTable).focus()

    def action_cycle_gpus(self) -> None:
        self._model_edit(self.selection.cycle_gpus)

    def action_cycle_dtype(self) -> None:
        self._model_edit(self.selection.cycle_dtype)

    def action_cycle_quantize(self) -> None:
        self._model_edit(self.selection.cycle_quantize)

    def action_cycle_batch(self) -> None:
        self._model_edit(self.selection.cycle_batch_size)

    def action_cycle_mode(self) -> None:
        row = self._row("tasks")
        if row is None:
            return
        task = self.selection.tasks[row]
        if len(task.modes) == 1:
            self.notify(f"{task.name} has one mode: {task.modes[0]}", title="Mode")
            return
        self.selection.cycle_mode(row)
        self.reload()
        self.query_one("#tasks", DataTable).focus()

    def _task_prompt(
        self, what: str, current: int | None, setter: Callable[[int, str], object]
    ) -> None:
        from slmtui.ui.screens.prompt import PromptScreen

        row = self._row("tasks")
        if row is None:
            return
        task = self.selection.tasks[row]

        def done(text: str | None) -> None:
            if text is None:
                return
            try:
                setter(row, text)
            except UserError as exc:
                self.notify(str(exc), title=f"{task.name}: {what}", severity="error", timeout=8)
                return
            self.reload()

        self.app.push_screen(
            PromptScreen(
                f"{task.name}: {what}",
                "An integer; empty takes the profile's default.",
                value="" if current is None else str(current),
            ),
            done,
        )

    def action_edit_limit(self) -> None:
        row = self._row("tasks")
        if row is not None:
            self._task_prompt(
                "sample limit", self.selection.tasks[row].limit, self.selection.set_limit
            )

    def action_edit_fewshot(self) -> None:
        row = self._row("tasks")
        if row is not None:
            self._task_prompt(
                "few-shot", self.selection.tasks[row].num_fewshot, self.selection.set_fewshot
            )

    @on(DataTable.RowSelected)
    def _select_row(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_toggle()


class _Keys:
    """Adapts a set of stored run keys to what ``plan_runs`` asks of a store."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = keys

    def completed_keys(self) -> set[str]:
        return self.keys
