"""Fault-table rows the console shows (docs/reliability.md): NVML going silent mid-run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ui_fixtures import T0, ScriptedScheduler, make_app, spec

from slmtui.protocol import RunFinished, RunProgress, RunStarted
from slmtui.store import Store
from slmtui.ui.widgets.run_panel import RunPanel

pytestmark = pytest.mark.anyio

DEGRADED = "NVML failed 10 times in a row (fake): GPU memory, power and energy not measured"


async def test_nvml_going_silent_marks_the_telemetry_degraded_and_the_run_completes(
    store: Store, tmp_path: Path
) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause(0.1)
        app.submit([spec("alpha-135m")])
        await pilot.pause(0.2)
        s = spec("alpha-135m").to_dict()
        scheduler.play([RunStarted("live-00", spec=s, pid=7, t=T0 + 150)])
        answering = {"util_pct": 55.0, "power_w": 120.0, "degraded": None}
        silent = {"util_pct": None, "power_w": None, "degraded": DEGRADED}
        scheduler.play(
            [
                RunProgress(
                    "live-00", phase="measuring", done=1, total=4, t=T0 + 151, telemetry=answering
                ),
                RunProgress(
                    "live-00", phase="measuring", done=2, total=4, t=T0 + 152, telemetry=silent
                ),
            ]
        )
        deadline = time.monotonic() + 10
        while app.board.runs["live-00"].done < 2 and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.1)
        lines = RunPanel.render_run(app.board.runs["live-00"]).renderables
        panel_text = "\n".join(getattr(line, "plain", "") for line in lines)
        assert "telemetry degraded: NVML failed 10 times in a row" in panel_text
        metrics = {
            "accuracy": 0.5,
            "throughput": 80.0,
            "throughput_unit": "tokens/s",
            "latency_ms": 12.5,
            "peak_mem_mb": 600.0,
            "telemetry_degraded": DEGRADED,
        }
        scheduler.play([RunFinished("live-00", metrics=metrics, t=T0 + 300)])
        deadline = time.monotonic() + 10
        while app.board.runs["live-00"].status != "finished" and time.monotonic() < deadline:
            await pilot.pause(0.05)
    row = store.run("live-00")
    assert row.status == "finished" and row.metrics["telemetry_degraded"] == DEGRADED
