"""The console under Pilot with a scripted scheduler: the feature list, one test each."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input
from ui_fixtures import T0, ScriptedScheduler, make_app, metrics, notices_of, spec

from slmtui.profile import load_profile
from slmtui.protocol import Event, RunFailed, RunFinished, RunProgress, RunStarted, SampleScored
from slmtui.scheduler import Gpu
from slmtui.store import Store
from slmtui.ui.app import SlmApp
from slmtui.ui.screens.help import HelpScreen
from slmtui.ui.screens.inspect import InspectScreen
from slmtui.ui.screens.prompt import ChoiceScreen, PromptScreen
from slmtui.ui.widgets.rank_view import RankView
from slmtui.ui.widgets.run_panel import RunPanel

pytestmark = pytest.mark.anyio

SMALL = (80, 24)


def screen_text(app: SlmApp) -> str:
    """What the terminal shows, as plain text (the active tab first, for failure messages)."""
    return (
        app.main_screen.query_one("#tabs").active
        + "\n"
        + "\n".join(strip.text for strip in app.screen._compositor.render_strips())
    )


def notices(app: SlmApp) -> list[str]:
    """The notifications shown so far, oldest first."""
    return [n.message for n in app._notifications]


def column(table: DataTable, key: str) -> list[str]:
    return [str(getattr(c, "plain", c)) for c in table.get_column(key)]


async def started(pilot: object) -> None:
    """Let start-up land: its first focus shows the Pick pane through a late message, which
    would undo a tab switched to before it (a person is never that quick)."""
    await pilot.pause(0.1)  # type: ignore[attr-defined]
    await pilot.pause()  # type: ignore[attr-defined]


async def settle(pilot: object, seconds: float = 0.15) -> None:
    """Let the bridge's timer fire and the app handle what it posted."""
    await pilot.pause(seconds)  # type: ignore[attr-defined]
    await pilot.pause()  # type: ignore[attr-defined]


async def until(pilot: object, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition`` holds (a loaded CI box can be slow), then one more pause."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    await pilot.pause(0.1)  # type: ignore[attr-defined]  # the next frame is painted
    await pilot.pause()  # type: ignore[attr-defined]


def progress(run_id: str, done: int, total: int = 4, t: float = 0.0, **kw: object) -> RunProgress:
    return RunProgress(
        run_id,
        phase="measuring",
        done=done,
        total=total,
        elapsed_s=float(done),
        tokens_per_s=100.0 + done,
        ms_per_token=10.0 - done,
        mem_mb=500.0 + done,
        t=T0 + 200 + t + done,
        **kw,  # type: ignore[arg-type]
    )


# -- opening ----------------------------------------------------------------------------------


async def test_opens_with_stored_results_ranked(filled_store: Store, tmp_path: Path) -> None:
    app = make_app(filled_store, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        await pilot.press("3")
        rank = app.query_one(RankView)
        assert {r.model for r in rank.per_rows} == {"alpha-135m", "beta-270m", "gamma-1b"}
        table = app.query_one("#rank-table", DataTable)
        # three models: a small set, ranked by PER-rel unless the user chooses. Mean PER-rel by
        # hand: alpha gsm8k (0.25/0.75)^(1/4) = 0.760, arc (0.4/0.6)^(1/4) = 0.904 -> 0.832;
        # beta 0.521 and 0.577 -> 0.549; gamma (gsm8k only) 0.258.
        assert rank.rank_by == "per_rel" and rank.rank_choice is None
        assert column(table, "model") == ["alpha-135m", "beta-270m", "gamma-1b"]
        text = screen_text(app)
        assert "relative to the 3 models in view" in text
        assert "Ranked by PER-rel (automatic: fewer than 4 models per task)" in text
        assert app.focused is table
        await pilot.press("n")  # the study's PER: the others score 0 somewhere
        assert rank.rank_by == "per" and column(table, "model")[0] == "beta-270m"


async def test_gpus_detected_are_shown_and_counts_limited(store: Store, tmp_path: Path) -> None:
    gpus = [Gpu(0, "NVIDIA H100", 81_559, 80_000), Gpu(1, "NVIDIA H100", 81_559, 70_123)]
    app = make_app(store, tmp_path=tmp_path, gpus=gpus)
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot)
        text = screen_text(app)
        assert "GPU 1 NVIDIA H100 · 70,123 of 81,559 MiB free" in text
        models = app.query_one("#models", DataTable)
        models.focus()
        seen = []
        for _ in range(4):
            await pilot.press("g")
            seen.append(column(models, "gpus")[0])
        assert seen == ["1", "2", "CPU", "1"]  # never 4 or 8 on a 2-GPU box


# -- pick -------------------------------------------------------------------------------------


async def test_pick_edits_reach_the_launched_specs(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        models = app.query_one("#models", DataTable)
        assert app.focused is models
        await pilot.press("down", "space")  # drop beta-270m
        await pilot.press("up", "t", "t", "b")  # alpha: dtype auto -> bfloat16 -> float16, batch 16
        await pilot.press("tab")
        assert app.focused is app.query_one("#tasks", DataTable)
        await pilot.press("down", "down", "space")  # hellaswag on
        await pilot.press("m")  # hellaswag has one mode: says so
        assert "hellaswag has one mode: loglikelihood" in notices(app)[-1]
        await pilot.press("down", "m")  # arc_easy: generate -> loglikelihood
        await pilot.press("up", "l")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press("3", "enter")
        await pilot.press("f")
        await pilot.press("1", "enter")
        await pilot.press("R")
        await settle(pilot)
    by_task = {s.task: s for s in scheduler.submitted}
    assert set(by_task) == {"gsm8k", "arc_easy", "hellaswag"}
    assert {s.model.name for s in scheduler.submitted} == {"alpha-135m"}
    hs = by_task["hellaswag"]
    assert (hs.options.limit, hs.options.num_fewshot) == (3, 1)
    assert by_task["arc_easy"].options.mode == "loglikelihood"
    assert (hs.dtype, hs.batch_size) == ("float16", 16)
    assert by_task["gsm8k"].options.num_fewshot == 2  # the profile's, untouched


async def test_bad_limit_is_one_line_and_changes_nothing(store: Store, tmp_path: Path) -> None:
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        await pilot.press("tab", "l", "ctrl+a", "x", "enter")
        assert app.selection.tasks[0].limit is None  # the profile's 4 stays
        assert "sample limit 'x': must be an integer >= 1" in notices(app)[-1]


async def test_add_and_remove_models(store: Store, tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        for source in ("Qwen/Qwen2.5-0.5B-Instruct", str(local), str(gguf)):
            await pilot.press("a")
            app.screen.query_one(Input).value = source
            await pilot.press("enter")
        names = column(app.query_one("#models", DataTable), "name")
        assert names == ["alpha-135m", "beta-270m", "Qwen2.5-0.5B-Instruct", "my-model", "tiny.Q4"]
        kinds = {m.entry.name: m.entry.source for m in app.selection.models}
        assert kinds["tiny.Q4"] == str(gguf.resolve())
        await pilot.press("a")
        app.screen.query_one(Input).value = "not a model!"
        await pilot.press("enter")
        assert len(app.selection.models) == 5
        assert "is not a catalog name" in notices(app)[-1]
        await pilot.press("home", "d")
        assert column(app.query_one("#models", DataTable), "name")[0] == "beta-270m"


async def test_selection_saves_as_a_profile(store: Store, tmp_path: Path) -> None:
    app = make_app(store, tmp_path=tmp_path)
    target = tmp_path / "mine.toml"
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        await pilot.press("down", "g", "w")
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
    saved = load_profile(target)
    assert saved.name == "mine"
    assert [m.name for m in saved.models] == ["alpha-135m", "beta-270m"]
    assert [t.name for t in saved.tasks] == ["gsm8k", "arc_easy"]


# -- launch -----------------------------------------------------------------------------------


async def test_stored_runs_are_skipped_unless_asked(filled_store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(filled_store)
    app = make_app(filled_store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        # arc_easy at limit 4 is stored for both models; gsm8k with 2-shot is not
        assert column(app.query_one("#models", DataTable), "stored") == ["1/2", "1/2"]
        assert "2 already stored (skipped unless you rerun them)" in screen_text(app)
        await pilot.press("R")
        assert isinstance(app.screen, ChoiceScreen)
        await pilot.press("escape")
        assert scheduler.submitted == []
        await pilot.press("R")
        await pilot.press("enter")  # the default: only the new ones
        await settle(pilot)
        assert {s.task for s in scheduler.submitted} == {"gsm8k"}
        await pilot.press("1", "R")  # gsm8k is queued now: not again; arc_easy is stored
        assert "2 of the selected runs are already queued or running" in notices(app)[-1]
        assert "2 of the 2 runs are already stored" in screen_text(app)
        await pilot.click("#all")
        await settle(pilot)
        assert [s.task for s in scheduler.submitted] == ["gsm8k"] * 2 + ["arc_easy"] * 2
        assert app.query_one("#tabs").active == "runs"


async def test_cancel_one_and_all(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        await pilot.press("R")
        await settle(pilot)
        assert [r.status for r in app.live_runs()] == ["queued"] * 4
        await pilot.press("c")  # the list's top row
        await settle(pilot)
        assert scheduler.cancelled == ["live-00"]
        assert app.board.runs["live-00"].status == "cancelled"
        await pilot.press("C")
        assert "3 runs are queued or running" in screen_text(app)
        await pilot.press("enter")
        assert scheduler.cancelled[-1] == "*"


async def test_list_cursor_follows_the_top_until_the_user_moves_it(
    store: Store, tmp_path: Path
) -> None:
    """``c`` twice cancels the two newest runs (the cursor stays on the top row, now the next
    queued run); only a key that moves the cursor pins it to the user's row."""
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        await pilot.press("R")
        await settle(pilot)
        await pilot.press("c")
        await settle(pilot)
        await pilot.press("c")
        await settle(pilot)
        assert scheduler.cancelled == ["live-00", "live-01"]
        table = app.query_one("#run-list", DataTable)
        await pilot.press("down")
        pinned = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        await pilot.press("c")
        await settle(pilot)
        assert scheduler.cancelled[-1] == pinned
        assert table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == pinned


# -- watch live -------------------------------------------------------------------------------


async def test_live_panel_then_rank_recomputes(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await started(pilot)
        app.submit([spec("alpha-135m")])
        await settle(pilot)
        s = spec("alpha-135m").to_dict()
        telemetry = {"util_pct": 55.0, "power_w": 120.0}
        scheduler.play([RunStarted("live-00", spec=s, pid=7, t=T0 + 150)])
        scheduler.play([progress("live-00", n, telemetry=telemetry) for n in (1, 2)])
        await until(pilot, lambda: app.board.runs["live-00"].done == 2)
        panel = app.query_one(RunPanel)
        text = screen_text(app)
        assert "2/4 samples · ETA 2s" in text
        assert "tokens/s 102.0" in text and "ms/token 8.0" in text and "mem 502 MB" in text
        assert "GPU util 55 %" in text and "power 120 W" in text
        assert list(panel.run.history.tokens_per_s)[-1] == 102.0  # history: one point per snapshot
        assert "2 Runs (1▶ 0…)" in text
        m = metrics(0.5, 80.0, 12.5, 600.0)
        scheduler.play([RunFinished("live-00", metrics=m, t=T0 + 300)])
        await until(pilot, lambda: not app.query(RunPanel))
        assert not app.query(RunPanel)
        assert "acc 0.500 · 80.0 tokens/s · 12.5 ms · 600 MB" in screen_text(app)
        assert [r.model for r in app.query_one(RankView).per_rows] == ["alpha-135m"]


async def test_failure_mid_run_shows_reason(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        app.submit([spec("alpha-135m")])
        await settle(pilot)
        s = spec("alpha-135m").to_dict()
        scheduler.play([RunStarted("live-00", spec=s, pid=7, t=T0 + 150), progress("live-00", 1)])
        scheduler.play(
            [
                RunFailed(
                    "live-00",
                    reason="oom",
                    message="out of memory at batch 8",
                    log_tail="RuntimeError: CUDA out of memory",
                    t=T0 + 260,
                )
            ]
        )
        await settle(pilot)
        assert app.board.runs["live-00"].status == "failed"
        text = screen_text(app)
        assert "oom: out of memory at batch 8" in text
        await pilot.press("i")
        assert isinstance(app.screen, InspectScreen)
        assert "RuntimeError: CUDA out of memory" in screen_text(app)


async def test_out_of_order_events_never_contradict_the_store(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        app.submit([spec("alpha-135m"), spec("beta-270m")])
        await settle(pilot)
        s = spec("alpha-135m").to_dict()
        # a newer progress before an older one: the older is dropped
        scheduler.play([progress("live-00", 3), progress("live-00", 1)], thread=False)
        # the result before the start, then a late progress: the run stays finished
        scheduler.play(
            [
                RunFinished("live-00", metrics=metrics(0.5, 80, 12, 600, n_samples=3), t=T0 + 400),
                RunStarted("live-00", spec=s, pid=7, t=T0 + 150),
                progress("live-00", 4),
            ]
        )
        # a progress for a run the app never saw queued: its spec comes from the store
        scheduler.play([progress("live-01", 2)])
        await settle(pilot)
        a, b = app.board.runs["live-00"], app.board.runs["live-01"]
        assert (a.status, a.done) == ("finished", 3)
        assert (b.status, b.done, b.label) == ("running", 2, "beta-270m · gsm8k · CPU")
        assert store.run("live-00").status == "finished"


async def test_eight_concurrent_runs_stream_without_lag(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path, interval_s=0.1)
    snapshots: list[object] = []

    def hook(message: object) -> None:
        if type(message).__name__ == "ProgressSnapshot":
            snapshots.append(message)

    async with app.run_test(size=(160, 50), message_hook=hook) as pilot:
        await started(pilot)
        ids = app.submit([spec(f"m{n}-1b", "gsm8k", limit=200) for n in range(8)])
        await settle(pilot)
        scheduler.play(
            [
                RunStarted(r, spec=spec(f"m{n}-1b", limit=200).to_dict(), pid=n, t=T0 + 150)
                for n, r in enumerate(ids)
            ]
        )
        events: list[Event] = []
        for step in range(1, 101):  # 800 progress and 800 sample events
            for r in ids:
                events.append(progress(r, step, total=200))
                events.append(sample(r, step))
        scheduler.play(events)
        await until(pilot, lambda: all(r.done == 100 for r in app.live_runs()))
        assert len(app.query(RunPanel)) == 8
        assert all(r.done == 100 for r in app.live_runs())
        assert app.board.counts()["running"] == 8
        assert "8 running · 0 queued" in screen_text(app)
    assert len(snapshots) < 20  # 1,600 events, redrawn a few times, not 1,600


def sample(run_id: str, index: int, score: float = 1.0) -> SampleScored:
    return SampleScored(
        run_id,
        index=index,
        item_id=f"item-{index}",
        prompt=f"Question {index}?",
        output=f"answer {index}",
        gold=f"gold {index}",
        score=score,
        t=T0 + 200 + index,
    )


# -- rank -------------------------------------------------------------------------------------


async def test_sort_by_key_and_by_header_click(filled_store: Store, tmp_path: Path) -> None:
    app = make_app(filled_store, tmp_path=tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await started(pilot)
        await pilot.press("3", "v", "v")  # overview -> arc_easy -> gsm8k
        rank = app.query_one(RankView)
        assert rank.view == "gsm8k"
        table = app.query_one("#rank-table", DataTable)
        assert column(table, "model")[0] == "alpha-135m"  # by PER-rel: 0.760, 0.521, 0.258
        # memory: the cursor's column, lowest first is best for a cost
        table.move_cursor(column=[c.key for c in rank.columns].index("memory_mb"))
        await pilot.press("s")
        assert column(table, "memory_mb") == ["400", "900", "2,500"]
        await pilot.press("s")  # again: the other way
        assert column(table, "memory_mb") == ["2,500", "900", "400"]
        assert str(table.columns["memory_mb"].label) == "MEM MB ▼"
        keys = [c.key.value for c in table.ordered_columns]
        x = sum(c.get_render_width(table) for c in table.ordered_columns[: keys.index("accuracy")])
        await pilot.click("#rank-table", offset=(x + 2, 0))  # the Accuracy header
        assert rank.sort_by["gsm8k"] == ("accuracy", True)
        assert column(table, "accuracy") == ["0.750", "0.500", "0.250"]


async def test_best_rows_marked_and_filter_recomputes_per(
    filled_store: Store, tmp_path: Path
) -> None:
    app = make_app(filled_store, tmp_path=tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await started(pilot)
        await pilot.press("3")
        rank = app.query_one(RankView)
        table = app.query_one("#rank-table", DataTable)
        assert column(table, "rank")[0] == "★1"
        await pilot.press("v", "v")
        best = table.get_cell_at(table.cursor_coordinate._replace(column=4))  # accuracy
        assert "underline" not in str(best.style)  # alpha's accuracy is the worst
        per_all = {r.model: r.per for r in rank.per_rows if r.task == "gsm8k"}
        await pilot.press("slash")
        assert app.focused is app.query_one("#filter", Input)
        await pilot.press(*"alpha beta", "enter")
        assert rank.filter_text == "alpha beta" and app.focused is table
        per_two = {r.model: r.per for r in rank.per_rows if r.task == "gsm8k"}
        assert set(per_two) == {"alpha-135m", "beta-270m"}
        assert per_two != {m: per_all[m] for m in per_two}  # relative to the set in view
        assert "relative to the 2 models in view" in screen_text(app)
        await pilot.press("escape")
        assert rank.filter_text == ""


# -- inspect ----------------------------------------------------------------------------------


async def test_inspect_shows_metrics_timing_and_samples(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await started(pilot)
        app.submit([spec("alpha-135m")])
        s = spec("alpha-135m").to_dict()
        scheduler.play(
            [
                RunStarted("live-00", spec=s, pid=7, t=T0 + 150),
                sample("live-00", 0, 1.0),
                sample("live-00", 1, 0.0),
                RunFinished("live-00", metrics=metrics(0.5, 80, 12.5, 600), t=T0 + 300),
            ]
        )
        await settle(pilot)
        await pilot.press("3", "v", "i")
        assert isinstance(app.screen, InspectScreen)
        text = screen_text(app)
        for expected in (
            "accuracy",
            "0.500",
            "load",
            "2.00 s (20%)",
            "measured",
            "7.50 s (75%)",
            "org/alpha-135m",
            "test cpu",
        ):
            assert expected in text
        await pilot.press("2")
        text = screen_text(app)
        assert "answer 1" in text and "gold 1" in text and "0.00" in text
        await pilot.press("down")
        assert "Question 1?" in screen_text(app)
        await pilot.press("escape")
        assert not isinstance(app.screen, InspectScreen)


# -- export, help, palette, quit --------------------------------------------------------------


async def test_export_three_formats_and_a_screenshot(filled_store: Store, tmp_path: Path) -> None:
    app = make_app(filled_store, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        await pilot.press("3")
        for name in ("per.csv", "per.json", "per.md"):
            await pilot.press("e")
            app.screen.query_one(Input).value = str(tmp_path / name)
            await pilot.press("enter")
        await pilot.press("e")
        app.screen.query_one(Input).value = str(tmp_path / "per.xlsx")
        await pilot.press("enter")
        assert "unknown extension; use .csv, .json or .md" in notices(app)[-1]
        await pilot.press("p")
        await pilot.press("n")  # the user picks the score: no reason to give
        await pilot.press("e")
        app.screen.query_one(Input).value = str(tmp_path / "chosen.json")
        await pilot.press("enter")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "per.csv").read_text())))
    assert {(r["model"], r["task"]) for r in rows} >= {("gamma-1b", "gsm8k")}
    assert len(rows) == 5
    document = json.loads((tmp_path / "per.json").read_text())
    assert len(document["rows"]) == 5 and document["rows"][0]["run"]["run_id"]
    # fewer than 4 models per task: PER-rel, chosen automatically, and the exports say why
    assert document["ranked_by"] == "per_rel"
    assert document["ranked_by_reason"] == "automatic: fewer than 4 models per task"
    markdown = (tmp_path / "per.md").read_text()
    assert "gamma-1b" in markdown
    assert "Ranked by PER-rel (automatic: fewer than 4 models per task)" in markdown
    chosen = json.loads((tmp_path / "chosen.json").read_text())
    assert (chosen["ranked_by"], chosen["ranked_by_reason"]) == ("per", None)
    assert list(tmp_path.glob("*.svg"))


async def test_help_lists_every_binding(store: Store, tmp_path: Path) -> None:
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=(120, 60)) as pilot:
        await started(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        for key in ("space", "R", "C", "c", "i", "s", "v", "/", "e", "p", "w", "q", "ctrl+p"):
            assert f"  {key} " in text or f"  {key} /" in text, key
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_command_palette_knows_the_actions(store: Store, tmp_path: Path) -> None:
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=SMALL):
        titles = {c.title for c in app.get_system_commands(app.screen)}
    assert {
        "Launch selection",
        "Cancel all runs",
        "Export table",
        "Save screenshot",
        "Save profile",
        "Filter rank tables",
        "Help",
    } <= titles


async def test_quit_stops_the_workers_first(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot)
        app.submit([spec("alpha-135m")])
        await settle(pilot)
        await pilot.press("q")
        assert "1 run is queued or running: quitting cancels it" in screen_text(app)
        app.screen.dismiss("quit")  # the default button; the app exits from a thread
        await app.workers.wait_for_complete()
    assert scheduler.shut_down
    assert app.return_code == 0


async def test_no_color_is_honoured(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=SMALL):
        assert app.no_color
        assert any(type(f).__name__ == "Monochrome" for f in app._filters)


async def test_launch_makes_the_headless_runs_checks_before_anything_is_queued(
    store: Store, tmp_path: Path
) -> None:
    """A bad line in a local data file is the same one-line error as in `slmtui run`."""
    from slmtui.profile import check_runs

    data = tmp_path / "gsm8k.jsonl"
    data.write_text('{"question": "2+2?", "answer": "#### 4"}\n{"question": 5}\n', encoding="utf-8")
    toml = (
        '[[models]]\nname = "tiny"\nsource = "' + str(tmp_path) + '"\n'
        f'[tasks.gsm8k]\ndata_file = "{data}"\n'
    )
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path, profile_toml=toml, preflight=check_runs)
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot)
        await pilot.press("R")
        await pilot.pause()
        assert scheduler.submitted == []
        notice = " ".join(notices_of(app))
        assert "gsm8k.jsonl" in notice and "line 2" in notice
