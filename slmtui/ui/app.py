"""The console: pick, launch, watch live, rank. A small App; the views live in ``widgets/``.

The app is given its engine (a Store and a Scheduler, or test doubles with the same methods);
``slmtui.ui.launch`` builds the real ones: a client of the store's scheduler service, whose runs
outlive the console (``outlives_console``: quitting asks whether to leave them running). Engine
events reach it only as messages posted by the ``Bridge`` from the scheduler's (or the client's)
thread; commands go back as plain method calls (submit, cancel), which only queue work. Nothing
here waits on a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane

from slmtui.board import Board, RunState
from slmtui.errors import UserError
from slmtui.per import automatic_rank_reason
from slmtui.plan import plan_runs
from slmtui.profile import Profile, check_runs, save_profile
from slmtui.protocol import Event, RunFailed, RunFinished
from slmtui.scheduler import Gpu
from slmtui.spec import RunSpec
from slmtui.ui.bridge import Bridge
from slmtui.ui.messages import ProgressSnapshot, RunChanged
from slmtui.ui.selection import Selection
from slmtui.ui.widgets.pick_view import PickView
from slmtui.ui.widgets.rank_view import RankView
from slmtui.ui.widgets.runs_view import RunsView

EXPORT_FORMATS = {".csv": "csv", ".json": "json", ".md": "markdown", ".markdown": "markdown"}
EARLIER_RUNS_SHOWN = 200
"""Runs of earlier sessions listed in the Runs tab (the newest)."""


def runs_are(n: int) -> str:
    """'1 run is', '3 runs are'."""
    return "1 run is" if n == 1 else f"{n} runs are"


class SchedulerLike(Protocol):
    """What the app asks of ``slmtui.scheduler.Scheduler`` (tests pass scripted doubles)."""

    listener: Any

    def submit(self, specs: Iterable[RunSpec]) -> list[str]: ...
    def cancel(self, run_id: str) -> bool: ...
    def cancel_all(self) -> None: ...
    def start(self) -> None: ...
    def shutdown(self) -> None: ...


class StoreLike(Protocol):
    """What the app asks of ``slmtui.store.Store``."""

    path: Path
    recovered: list[str]

    def completed_keys(self) -> set[str]: ...
    def results(self) -> list[Any]: ...
    def runs(self) -> list[RunState]: ...
    def run(self, run_id: str) -> RunState | None: ...
    def samples(self, run_id: str) -> list[Any]: ...
    def export_runs(self, run_ids: Any = None) -> dict[str, dict[str, Any]]: ...


class ConsoleTabs(TabbedContent):
    """TabbedContent that follows a focused pane only while the focus is still in it.

    Focusing a widget in a hidden pane makes TabbedContent show that pane, through a message
    that lands later: after start-up's first focus, a launch that shows Runs was undone.
    """

    def _on_tab_pane_focused(self, event: TabPane.Focused) -> None:
        focused = self.app.focused
        if focused is None or event.tab_pane in focused.ancestors_with_self:
            super()._on_tab_pane_focused(event)
        else:
            event.stop()


class SlmApp(App[int]):
    """slmtui's console (see the module docstring)."""

    CSS_PATH = Path(__file__).with_name("app.tcss")
    """Absolute, so subclasses (tests, scripts/cold_start.py) find it too."""
    TITLE = "slmtui"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(
            "1",
            "show_tab('pick')",
            "Pick",
            id="app.pick",
            tooltip="Models, tasks, GPUs",
            show=False,
        ),
        Binding("2", "show_tab('runs')", "Runs", id="app.runs", tooltip="Live runs", show=False),
        Binding("3", "show_tab('rank')", "Rank", id="app.rank", tooltip="PER tables", show=False),
        Binding("R", "launch", "Launch", id="app.launch", tooltip="Run the selection (queued)"),
        Binding(
            "C",
            "cancel_all",
            "Cancel all",
            id="app.cancel_all",
            tooltip="Cancel every run",
            show=False,
        ),
        Binding("e", "export", "Export", id="app.export", tooltip="Table as csv, json or markdown"),
        Binding(
            "p", "screenshot", "Screenshot", id="app.screenshot", tooltip="Save an SVG", show=False
        ),
        Binding(
            "w",
            "save_profile",
            "Save profile",
            id="app.save",
            tooltip="Selection as TOML",
            show=False,
        ),
        Binding("question_mark,f1", "help", "Help", id="app.help", tooltip="Every key"),
        Binding(
            "q",
            "quit",
            "Quit",
            id="app.quit",
            tooltip="Quit; with runs live, leave them running or stop them",
        ),
    ]

    def __init__(
        self,
        *,
        store: StoreLike,
        scheduler: SchedulerLike,
        profile: Profile,
        gpus: Sequence[Gpu] = (),
        limit: int | None = None,
        data_dir: str | None = None,
        timeout_s: float | None = None,
        export_dir: Path | None = None,
        progress_interval_s: float = 1.0,
        preflight: Callable[[list[RunSpec], str], None] = check_runs,
    ) -> None:
        """``export_dir``: where exports and screenshots go by default (the working folder)."""
        super().__init__()
        self.store = store
        self.scheduler = scheduler
        self.profile = profile
        self.gpus = list(gpus)
        self.limit = limit
        self.export_dir = export_dir or Path.cwd()
        self.preflight = preflight
        """The checks a launch passes before anything is queued (``profile.check_runs``, the
        headless run's: a hub model missing offline, a bad local data line)."""
        self.selection = Selection.from_profile(
            profile, gpus_available=len(self.gpus), data_dir=data_dir, timeout_s=timeout_s
        )
        self.board = Board(lookup=self._spec_of)
        self.bridge = Bridge(self.post_message, interval_s=progress_interval_s)
        self.started_at = time.perf_counter()
        self.first_paint_s: float | None = None
        self.stopping = False
        self.wanted_tab: str | None = None
        """The tab last asked for by key or command, until it is shown."""

    @property
    def main_screen(self) -> Screen[Any]:
        """The console's own screen. ``App.query`` searches the screen on top, which is the
        help, a prompt or an inspected run while events keep arriving."""
        return self.screen_stack[0]

    # -- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with ConsoleTabs(initial="pick", id="tabs"):
            with TabPane("1 Pick", id="pick"):
                yield PickView(
                    self.selection,
                    self.gpus,
                    self.store.completed_keys,
                    limit=self.limit,
                    id="pick-view",
                )
            with TabPane("2 Runs", id="runs"):
                yield RunsView(self.board, id="runs-view")
            with TabPane("3 Rank", id="rank"):
                yield RankView(self.store.results, grid=self.profile.settings.grid, id="rank-view")
        yield Static(self._status_text(), id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"profile {self.profile.name}"
        self.title = f"slmtui · profile {self.profile.name}"
        self._load_earlier_runs()
        self.scheduler.listener = self.bridge
        if hasattr(self.scheduler, "on_notice"):
            self.scheduler.on_notice = self._notice_from_engine
        self.scheduler.start()
        if getattr(self.scheduler, "attached", False):
            live = sum(r.status in ("queued", "running") for r in self.board.runs.values())
            if live:
                self.notify(
                    f"attached to the scheduler service: {runs_are(live)} queued or running",
                    title="Runs",
                )
        if self.store.recovered:
            n = len(self.store.recovered)
            self.notify(
                f"{n} run{'s' * (n != 1)} left unfinished by a scheduler that exited "
                "(a killed app or service, a reboot) were marked crashed; Launch (R) offers "
                f"{'it' if n == 1 else 'them'} again.",
                title="Store",
                severity="warning",
            )
        self.call_after_refresh(self._painted)

    def _notice_from_engine(self, message: str) -> None:
        """From the client's thread: the store refused a write, the service went away."""
        self.call_from_thread(self.notify, message, title="Scheduler", severity="error", timeout=15)

    def _painted(self) -> None:
        self.first_paint_s = time.perf_counter() - self.started_at
        self.log.info(f"first paint after {self.first_paint_s:.3f} s")

    def _status_text(self) -> str:
        box = f"{len(self.gpus)} × {self.gpus[0].name}" if self.gpus else "CPU only"
        return f"profile {self.profile.name} · {box} · store {self.store.path} · ? help · q quit"

    def _load_earlier_runs(self) -> None:
        self.board.add(self.store.runs()[-EARLIER_RUNS_SHOWN:])
        for view in self.main_screen.query(RunsView):
            view.refresh_runs()

    def _spec_of(self, run_id: str) -> RunSpec | None:
        row = self.store.run(run_id)
        return row.spec if row is not None else None

    # -- engine events ------------------------------------------------------------------------

    def on_run_changed(self, message: RunChanged) -> None:
        event: Event = message.event
        run = self.board.apply(event)
        if run is None or not self.screen_stack:  # (no screen: the app is closing)
            return
        for runs in self.main_screen.query(RunsView):
            runs.refresh_runs()
        self._update_tab_labels()
        if isinstance(event, RunFinished):
            for rank in self.main_screen.query(RankView):
                rank.show_results(self.store.results())
            self.main_screen.query_one(PickView).reload()
        elif isinstance(event, RunFailed) and event.reason != "cancelled":
            self.notify(f"{run.label}: {run.reason}", title="Run failed", severity="error")

    def on_progress_snapshot(self, message: ProgressSnapshot) -> None:
        changed = self.board.apply_snapshot(message.progress.values(), message.samples)
        if changed and self.screen_stack:
            for runs in self.main_screen.query(RunsView):
                runs.refresh_runs()

    def _update_tab_labels(self) -> None:
        counts = self.board.counts()
        active = counts["running"] + counts["queued"]
        label = f"2 Runs ({counts['running']}▶ {counts['queued']}…)" if active else "2 Runs"
        self.main_screen.query_one(TabbedContent).get_tab("runs").label = label

    # -- commands -----------------------------------------------------------------------------

    def action_show_tab(self, tab: str) -> None:
        self.wanted_tab = tab
        self.main_screen.query_one(TabbedContent).active = tab
        self._focus_tab(tab)

    @on(TabbedContent.TabActivated, "#tabs")
    def _tab_shown(self, event: TabbedContent.TabActivated) -> None:
        """TabbedContent syncs with its Tabs through messages, so after two quick switches
        (launch shows Runs, then the user presses 3) the first one's late message switches
        back; a tab asked for by key wins until its own activation arrives."""
        shown = event.pane.id or ""
        if self.wanted_tab and shown != self.wanted_tab:
            event.tabbed_content.active = self.wanted_tab
            return
        self.wanted_tab = None
        self._focus_tab(shown)

    def _focus_tab(self, tab: str) -> None:
        """Focus the tab's main table, so its keys work at once (keyboard only, over SSH)."""
        target = {"pick": "#models", "runs": "#run-list", "rank": "#rank-table"}.get(tab)
        if target and not self.stopping and self.screen_stack:
            for widget in self.main_screen.query(target):
                widget.focus(scroll_visible=False)

    def action_launch(self) -> None:
        """Queue the selection's runs; runs already stored are skipped unless asked."""
        from slmtui.ui.screens.prompt import ChoiceScreen

        try:
            specs = self.selection.specs(limit=self.limit)
            # the headless run's checks too: a hub model missing offline, a bad data line
            self.preflight(specs, "selection")
        except UserError as exc:
            self.notify(str(exc), title="Cannot launch", severity="error", timeout=8)
            return
        in_flight = {
            r.spec.run_key
            for r in self.board.runs.values()
            if r.spec is not None and r.status in ("queued", "running")
        }
        busy = sum(s.run_key in in_flight for s in specs)
        if busy:
            self.notify(
                f"{busy} of the selected runs {'is' if busy == 1 else 'are'} already queued "
                "or running; not queued again.",
                title="Launch",
            )
            specs = [s for s in specs if s.run_key not in in_flight]
            if not specs:
                return
        plan = plan_runs(specs, self.store)
        if not plan.skipped:
            self.submit(plan.to_run)
            return
        n_new, n_stored = len(plan.to_run), len(plan.skipped)
        choices = [("all", f"Run all {n_new + n_stored} again"), ("cancel", "Cancel")]
        if n_new:
            choices.insert(0, ("new", f"Run the {n_new} new"))

        def chosen(answer: str | None) -> None:
            # After the prompt is gone: the console's screen restores its focus (a Pick table)
            # when it resumes, which would show Pick again over the Runs tab submit shows.
            if answer == "new":
                self.call_after_refresh(self.submit, plan.to_run)
            elif answer == "all":
                self.call_after_refresh(
                    self.submit, plan_runs(specs, self.store, rerun=True).to_run
                )

        self.push_screen(
            ChoiceScreen(
                "Launch",
                f"{n_stored} of the {n_new + n_stored} runs are already stored (marked in "
                "Pick's Stored column). Run only the new ones, or all again?",
                choices,
            ),
            chosen,
        )

    def submit(self, specs: list[RunSpec]) -> list[str]:
        """Queue ``specs`` and show the Runs tab (a box too small for a run is one message)."""
        if not specs:
            self.notify("Nothing to run.", title="Launch")
            return []
        try:
            run_ids = self.scheduler.submit(specs)
        except UserError as exc:
            self.notify(str(exc), title="Cannot launch", severity="error", timeout=10)
            return []
        self.notify(f"{len(run_ids)} run{'s' * (len(run_ids) != 1)} queued.", title="Launch")
        self.action_show_tab("runs")
        return run_ids

    def on_runs_view_cancel_requested(self, message: RunsView.CancelRequested) -> None:
        run = self.board.runs.get(message.run_id)
        if run is None or run.ended:
            self.notify("That run has already ended.", title="Cancel")
            return
        if self.scheduler.cancel(message.run_id):
            self.notify(f"cancelling {run.label}", title="Cancel")

    def action_cancel_all(self) -> None:
        from slmtui.ui.screens.prompt import ChoiceScreen

        active = [r for r in self.board.runs.values() if r.status in ("queued", "running")]
        if not active:
            self.notify("No run is queued or running.", title="Cancel all")
            return

        def chosen(answer: str | None) -> None:
            if answer == "yes":
                self.scheduler.cancel_all()
                self.notify(f"cancelling {len(active)} runs", title="Cancel all")

        self.push_screen(
            ChoiceScreen(
                "Cancel all runs?",
                f"{runs_are(len(active))} queued or running. Finished results stay stored.",
                [("yes", "Cancel them"), ("no", "Keep running")],
            ),
            chosen,
        )

    @on(RunsView.InspectRequested)
    @on(RankView.InspectRequested)
    def _inspect(self, message: RunsView.InspectRequested | RankView.InspectRequested) -> None:
        self.inspect(message.run_id)

    def inspect(self, run_id: str) -> None:
        from slmtui.ui.screens.inspect import InspectScreen

        row = self.store.run(run_id)
        if row is None:
            self.notify(f"run {run_id} is not in the store yet.", title="Inspect")
            return
        self.push_screen(
            InspectScreen(row, self.store.samples(run_id), grid=self.profile.settings.grid)
        )

    def action_export(self) -> None:
        from slmtui.ui.screens.prompt import PromptScreen

        rank = self.main_screen.query_one(RankView)
        if not rank.per_rows:
            self.notify("No ranked result to export yet.", title="Export", severity="warning")
            return

        def chosen(path: str | None) -> None:
            if path:
                self.export(Path(path).expanduser())

        self.push_screen(
            PromptScreen(
                "Export the PER table",
                "The format follows the extension: .csv, .json or .md. The rows in view "
                "(filter applied), every task.",
                value=str(self.export_dir / "slmtui-per.csv"),
            ),
            chosen,
        )

    def export(self, path: Path) -> Path | None:
        """Write the rows in view to ``path`` in the format of its extension."""
        from slmtui.reports import export

        fmt = EXPORT_FORMATS.get(path.suffix.lower())
        if fmt is None:
            self.notify(
                f"{path.name}: unknown extension; use .csv, .json or .md",
                title="Export",
                severity="error",
            )
            return None
        rank = self.main_screen.query_one(RankView)
        rows = rank.rows_in_view()
        runs = self.store.export_runs([r.input.key for r in rows if r.input.key])
        grid = self.profile.settings.grid
        # why the score ranks, when the user did not choose it (as the Rank tab says)
        reason = automatic_rank_reason(rank.rank_by) if rank.rank_choice is None else None
        if fmt == "csv":
            text = export.to_csv(rows, runs)
        elif fmt == "json":
            facts = {"g_per_kwh": grid.g_per_kwh, "label": grid.label}
            text = export.to_json(
                rows, runs, ranked_by=rank.rank_by, rank_reason=reason, grid=facts
            )
        else:
            text = export.to_markdown(rows, by=rank.rank_by, reason=reason)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.notify(f"{path}: {exc.strerror}", title="Export", severity="error")
            return None
        self.notify(f"{len(rows)} row{'s' * (len(rows) != 1)} written to {path}", title="Export")
        return path

    def action_screenshot(self) -> None:
        try:
            path = self.save_screenshot(path=str(self.export_dir))
        except OSError as exc:
            self.notify(
                f"screenshot not saved: {exc.strerror}", title="Screenshot", severity="error"
            )
            return
        self.notify(f"saved {path}", title="Screenshot")

    def action_save_profile(self) -> None:
        from slmtui.ui.screens.prompt import PromptScreen

        default = self.profile.path or self.export_dir / f"{self.profile.name}.toml"

        def chosen(path: str | None) -> None:
            if path:
                self.save_selection(Path(path).expanduser())

        self.push_screen(
            PromptScreen(
                "Save the selection as a profile", "A .toml file path.", value=str(default)
            ),
            chosen,
        )

    def save_selection(self, path: Path) -> Path | None:
        try:
            profile = self.selection.to_profile(name=path.stem)
            save_profile(profile, path)
        except UserError as exc:
            self.notify(str(exc), title="Profile not saved", severity="error", timeout=8)
            return None
        except OSError as exc:
            self.notify(f"{path}: {exc.strerror}", title="Profile not saved", severity="error")
            return None
        self.notify(f"saved {path}", title="Profile")
        return path

    def action_help(self) -> None:
        from slmtui.ui.screens.help import HelpScreen
        from slmtui.ui.screens.inspect import InspectScreen

        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(
            HelpScreen(
                [
                    ("Console", SlmApp),
                    ("Pick tab", PickView),
                    ("Runs tab", RunsView),
                    ("Rank tab", RankView),
                    ("Inspect screen", InspectScreen),
                ]
            )
        )

    async def action_quit(self) -> None:
        """Quit. With runs queued or running: leave them running in the scheduler service (the
        console re-attaches later) or stop them; an in-process scheduler can only stop them."""
        from slmtui.ui.screens.prompt import ChoiceScreen

        if self.stopping:
            return
        active = [r for r in self.board.runs.values() if r.status in ("queued", "running")]
        if not active:
            self._stop_engine()
            return
        if getattr(self.scheduler, "outlives_console", False):

            def answered(answer: str | None) -> None:
                if answer in ("leave", "stop"):
                    self._stop_engine(stop_runs=answer == "stop")

            it = "it" if len(active) == 1 else "them"
            self.push_screen(
                ChoiceScreen(
                    "Quit?",
                    f"{runs_are(len(active))} queued or running. Leave {it} running (`slmtui` "
                    f"shows {it} again, `slmtui status` too) or stop {it}? "
                    "Finished results are stored.",
                    [("leave", "Leave running"), ("stop", "Stop runs"), ("stay", "Stay")],
                ),
                answered,
            )
            return

        def chosen(answer: str | None) -> None:
            if answer == "quit":
                self._stop_engine()

        self.push_screen(
            ChoiceScreen(
                "Quit?",
                f"{runs_are(len(active))} queued or running: quitting cancels "
                f"{'it' if len(active) == 1 else 'them'}. "
                "Finished results are stored.",
                [("quit", "Cancel runs and quit"), ("stay", "Stay")],
            ),
            chosen,
        )

    def _stop_engine(self, stop_runs: bool = True) -> None:
        self.stopping = True
        self.notify("stopping workers…" if stop_runs else "leaving the runs running…", title="Quit")
        self._stop_then_exit(stop_runs)

    @work(thread=True, exclusive=True, group="shutdown")
    def _stop_then_exit(self, stop_runs: bool = True) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after the grace period), or with the service
        and ``stop_runs`` False only detach from it; then exit."""
        stop = getattr(self.scheduler, "stop_runs", None)
        if stop_runs and stop is not None:
            try:
                stop()
            except Exception as exc:  # the service is gone: nothing left to stop
                self.log.warning(f"stopping the runs: {exc!r}")
        self.scheduler.shutdown()
        self.bridge.close()
        self.call_from_thread(self.exit, 0)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        rank = self.main_screen.query(RankView).first()
        for title, help_text, callback in (
            ("Launch selection", "Queue the selected runs (R)", self.action_launch),
            ("Cancel all runs", "Cancel queued and running runs (C)", self.action_cancel_all),
            ("Show Pick", "Models, tasks, GPUs (1)", lambda: self.action_show_tab("pick")),
            ("Show Runs", "Live runs (2)", lambda: self.action_show_tab("runs")),
            ("Show Rank", "PER tables (3)", lambda: self.action_show_tab("rank")),
            ("Export table", "csv, json or markdown (e)", self.action_export),
            ("Save screenshot", "SVG of the screen (p)", self.action_screenshot),
            ("Save profile", "The selection as TOML (w)", self.action_save_profile),
            ("Filter rank tables", "By model or task (/)", rank.action_filter),
            ("Next rank table", "Overview, then each task (v)", rank.action_next_view),
            ("Help", "Every key binding (?)", self.action_help),
        ):
            yield SystemCommand(title, help_text, callback)

    def live_runs(self) -> list[RunState]:
        """Every run the console shows (tests and the status line read it)."""
        return list(self.board.runs.values())
