"""What the Runs list and Inspect say about a finished run: the engine that ran, every sample."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from ui_fixtures import T0, metrics, spec

from slmtui.board import RunState
from slmtui.protocol import RunFinished, RunQueued, RunStarted
from slmtui.store import Store
from slmtui.ui.screens.inspect import InspectScreen
from slmtui.ui.widgets.runs_view import RunsView

FALLBACK = "fast engine: architecture 'gpt2' is not one it is verified on (llama, …); ran plain"


def fallback_metrics() -> dict:
    return metrics(
        0.5, 10.0, 100.0, 400.0, engine="plain", engine_requested="fast", engine_fallback=FALLBACK
    )


def test_the_runs_list_names_the_engine_that_ran() -> None:
    run = RunState("r", spec("alpha-135m"), status="finished", metrics=fallback_metrics())
    detail = RunsView.row_cells(run)[-1].plain
    assert detail.startswith("acc 0.500") and detail.endswith("ran plain (see Inspect)")
    plain_run = RunState("r", spec("alpha-135m"), status="finished", metrics=metrics(0.5, 1, 1, 1))
    assert "ran" not in RunsView.row_cells(plain_run)[-1].plain


def test_inspect_shows_the_engine_asked_for_and_why_it_did_not_run(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        s = spec("alpha-135m").to_dict() | {"engine": "fast"}
        store.record(RunQueued("r", spec=s, t=T0))
        store.record(RunStarted("r", spec=s, pid=1, t=T0 + 1))
        store.record(RunFinished("r", metrics=fallback_metrics(), t=T0 + 9))
        row = store.run("r")
    assert row is not None
    console = Console(width=200, record=True, color_system=None)
    console.print(InspectScreen(row, []).summary())
    text = console.export_text()
    assert f"plain (asked: fast) — {FALLBACK}" in text


def test_a_finished_run_counts_every_sample_even_when_the_console_attached_late() -> None:
    """A console that re-attaches mid-run saw only the later sample events."""
    from slmtui.protocol import RunProgress

    run = RunState("r", spec("alpha-135m"), status="finished", metrics=metrics(0.5, 1, 1, 1))
    run.progress = RunProgress("r", phase="measuring", done=2, total=4)
    run.samples_done = 2
    assert RunsView.row_cells(run)[3] == "4/4"  # the result's n_samples (4), not the 2 seen


def test_a_running_panel_names_the_step_under_way() -> None:
    """The first run on a fresh box spends its load converting the GGUF: the panel says so."""
    from rich.console import Console as RichConsole

    from slmtui.protocol import RunProgress
    from slmtui.ui.widgets.run_panel import RunPanel

    run = RunState("r", spec("alpha-135m"), status="running")
    run.progress = RunProgress("r", phase="loading", step="converting GGUF (one time)")
    console = RichConsole(width=100, record=True, color_system=None)
    console.print(RunPanel.render_run(run))
    text = console.export_text()
    assert "loading   CPU" in text and "· converting GGUF (one time)" in text


def test_the_runs_list_shows_how_far_a_stored_run_got_whatever_its_state(tmp_path: Path) -> None:
    """The console loads earlier runs from the store: a run cancelled mid-way, or running in a
    detached worker, says how many samples were scored of how many."""
    from slmtui.protocol import RunFailed, RunProgress, SampleScored

    with Store(tmp_path / "s.sqlite") as store:
        s = spec("alpha-135m").to_dict()
        for run_id in ("cancelled", "running"):
            store.record(RunQueued(run_id, spec=s, t=T0))
            store.record(RunStarted(run_id, spec=s, pid=1, t=T0 + 1))
            store.record(RunProgress(run_id, phase="measuring", total=8, t=T0 + 2))
            for i in range(3):
                store.record(
                    SampleScored(
                        run_id,
                        index=i,
                        item_id=f"i{i}",
                        prompt="p",
                        output="o",
                        gold="g",
                        score=1.0,
                    )
                )
        store.record(RunFailed("cancelled", reason="cancelled", message="stopped", t=T0 + 5))
        runs = {r.run_id: r for r in store.runs()}
    assert RunsView.row_cells(runs["cancelled"])[3] == "3/8"
    assert RunsView.row_cells(runs["running"])[3] == "3/8"
