"""The console's main screens on fixed data, for snapshot tests and README screenshots.

    python tests/ui/screens.py [OUT_DIR]     # writes OUT_DIR/<screen>.svg (default screenshots/)

Everything shown is fixed: the store's rows and event times, the store path, no GPU detection,
notifications cleared, so two runs give identical SVGs.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from textual.pilot import Pilot

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui_fixtures import T0, ScriptedScheduler, fill_store, make_app, metrics, spec

from slmtui.protocol import RunFailed, RunFinished, RunProgress, RunStarted, SampleScored
from slmtui.scheduler import Gpu
from slmtui.store import Store
from slmtui.ui.app import SlmApp

GPUS = [
    Gpu(0, "NVIDIA H100 80GB HBM3", 81_559, 80_702),
    Gpu(1, "NVIDIA H100 80GB HBM3", 81_559, 79_120),
]
STORE_DIR = Path(tempfile.gettempdir()) / "slmtui-screens"
"""A fixed store path: the status line shows it."""


def fresh_app(name: str) -> tuple[SlmApp, ScriptedScheduler]:
    """An app on a store holding the fixture's results, with two (pretend) H100s."""
    STORE_DIR.mkdir(exist_ok=True)
    path = STORE_DIR / "results.sqlite"
    for stale in STORE_DIR.glob("results.sqlite*"):
        stale.unlink()
    store = Store(path)
    fill_store(store)
    scheduler = ScriptedScheduler(store)
    return make_app(store, scheduler, gpus=GPUS, tmp_path=STORE_DIR), scheduler


def _live_events(ids: list[str]) -> list[list[object]]:
    """Three runs measuring (with GPU telemetry), one loading, one failed; fixed times. One
    list per second of the runs' life, so the sparklines get a point each."""
    batches: list[list[object]] = [
        [
            RunStarted(
                run_id,
                spec=spec(f"m{n}", "gsm8k", gpus=1, limit=200).to_dict(),
                pid=100 + n,
                t=T0 + 150,
            )
            for n, run_id in enumerate(ids[:4])
        ]
    ]
    for step in range(1, 13):
        batches.append(
            [
                RunProgress(
                    run_id,
                    phase="measuring",
                    done=step * (4 + n),
                    total=200,
                    elapsed_s=step * 2.0,
                    tokens_per_s=900.0 + 40 * n + (step % 4) * 25,
                    ms_per_token=1.1 + 0.1 * n,
                    mem_mb=1800.0 + 300 * n + step * 10,
                    telemetry={
                        "util_pct": 60.0 + (step * 7 + n * 5) % 35,
                        "power_w": 250.0 + step * 9,
                    },
                    t=T0 + 200 + step,
                )
                for n, run_id in enumerate(ids[:3])
            ]
        )
    batches.append(
        [
            RunProgress(ids[3], phase="loading", mem_mb=640.0, t=T0 + 214),
            RunFailed(
                ids[5],
                reason="oom",
                message="CUDA out of memory at batch 64 (halved to 1, still failing)",
                log_tail="torch.OutOfMemoryError: CUDA out of memory",
                t=T0 + 215,
            ),
        ]
    )
    return batches


async def show_pick(pilot: Pilot[int]) -> None:
    await started(pilot)
    await pilot.pause()


async def show_runs(pilot: Pilot[int]) -> None:
    await started(pilot)
    app: SlmApp = pilot.app  # type: ignore[assignment]
    scheduler: ScriptedScheduler = app.scheduler  # type: ignore[assignment]
    ids = app.submit([spec(f"m{n}", "gsm8k", gpus=1, limit=200) for n in range(6)])
    for batch in _live_events(ids):
        scheduler.play(batch)  # type: ignore[arg-type]
        await pilot.pause(app.bridge.interval_s * 1.5)
    await _settle(pilot, lambda: app.board.runs[ids[5]].ended)
    app.action_show_tab("runs")
    app.query_one("#run-list").focus()


async def show_rank(pilot: Pilot[int]) -> None:
    await started(pilot)
    await pilot.press("3", "v", "v")


async def show_plot(pilot: Pilot[int]) -> None:
    await started(pilot)
    await pilot.press("3", "v", "v", "g")  # gsm8k's accuracy against throughput


async def show_inspect(pilot: Pilot[int]) -> None:
    await started(pilot)
    app: SlmApp = pilot.app  # type: ignore[assignment]
    scheduler: ScriptedScheduler = app.scheduler  # type: ignore[assignment]
    app.submit([spec("alpha-135m", "imdb")])
    s = spec("alpha-135m", "imdb").to_dict()
    outputs = [("positive", "positive"), ("negative", "positive"), ("negative", "negative")]
    events: list[object] = [RunStarted("live-00", spec=s, pid=7, t=T0 + 150)]
    for n, (out, gold) in enumerate(outputs):
        events.append(
            SampleScored(
                "live-00",
                index=n,
                item_id=f"imdb-{n}",
                prompt=f"Review {n}: a film I keep thinking about.\nSentiment:",
                output=out,
                gold=gold,
                score=float(out == gold),
                t=T0 + 160 + n,
            )
        )
    m = metrics(0.667, 31.5, 31.7, 612.0, task_metrics={"acc": 0.667}, tokens_out=6)
    events.append(RunFinished("live-00", metrics=m, t=T0 + 190))
    scheduler.play(events)  # type: ignore[arg-type]
    await _settle(pilot, lambda: "live-00" in app.board.runs and app.board.runs["live-00"].ended)
    await pilot.press("3", "v")  # arc_easy's table, where the run is not; imdb's is last
    await pilot.press("v", "v")
    await pilot.press("i")


async def show_help(pilot: Pilot[int]) -> None:
    await started(pilot)
    await pilot.press("question_mark")


SCREENS: dict[str, Callable[[Pilot[int]], Awaitable[None]]] = {
    "pick": show_pick,
    "runs": show_runs,
    "rank": show_rank,
    "plot": show_plot,
    "inspect": show_inspect,
    "help": show_help,
}


async def started(pilot: Pilot[int]) -> None:
    """Let start-up land first: the first focus makes TabbedContent show its pane late, which
    would undo a tab switched to before it."""
    await pilot.pause(0.1)
    await pilot.pause()


async def _settle(pilot: Pilot[int], condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            break
        await pilot.pause(0.05)
    await pilot.pause()


async def finish(pilot: Pilot[int]) -> None:
    """Clear the toasts (they would hide part of the screen) and let the last redraw land."""
    pilot.app.clear_notifications()
    await pilot.pause(0.2)
    await pilot.pause()


async def write_all(out_dir: Path, size: tuple[int, int] = (120, 36)) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, show in SCREENS.items():
        app, _ = fresh_app(name)
        async with app.run_test(size=size) as pilot:
            await show(pilot)
            await finish(pilot)
            written.append(Path(app.save_screenshot(f"{name}.svg", path=str(out_dir))))
        app.store.close()  # type: ignore[attr-defined]
    shutil.rmtree(STORE_DIR, ignore_errors=True)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("screenshots")
    for path in asyncio.run(write_all(target)):
        print(path)
