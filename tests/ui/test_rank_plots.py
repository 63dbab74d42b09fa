"""Rank with two models (PER-rel, the deciding factor), the plot view, and CO2 in the console."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_app import column, screen_text, started
from textual.widgets import DataTable
from ui_fixtures import fill_store, make_app, metrics

from slmtui.store import Store
from slmtui.ui.screens.inspect import InspectScreen
from slmtui.ui.widgets.plot_view import PlotView
from slmtui.ui.widgets.rank_view import RankView

pytestmark = pytest.mark.anyio

# The case: two models, each worst on something, so the study's PER is 0 for both.
#   small: acc 0.40, 200 tok/s, 4 ms, 600 MB      big: acc 0.50, 100 tok/s, 10 ms, 1000 MB
#   PER-rel small = (0.4/0.5)^(1/4) = 0.946; big = (1 * 0.5 * 0.4 * 0.6)^(1/4) = 0.589
#   latency decides: small's 4 ms is 2.5x better than big's 10 ms.
TWO = [
    (
        "small-135m",
        "hellaswag",
        metrics(0.40, 200.0, 4.0, 600.0, energy_j=360.0, energy_per_token_j=0.18, tokens_out=2000),
    ),
    ("big-270m", "hellaswag", metrics(0.50, 100.0, 10.0, 1000.0)),
]


async def test_two_models_rank_by_per_rel_and_say_which_factor_decides(
    store: Store, tmp_path: Path
) -> None:
    fill_store(store, TWO)
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=(160, 50)) as pilot:
        await started(pilot)
        await pilot.press("3", "v")
        rank = app.query_one(RankView)
        table = app.query_one("#rank-table", DataTable)
        assert rank.view == "hellaswag"
        assert rank.rank_by == "per_rel"  # two models: a small set, PER-rel by default
        assert column(table, "model") == ["small-135m", "big-270m"]
        assert column(table, "per_rel") == ["0.946", "0.589"]
        assert column(table, "rank") == ["★1", " 2"]
        assert column(table, "limiting") == ["accuracy", "latency"]
        text = screen_text(app)
        assert "Ranked by PER-rel (automatic: fewer than 4 models per task)" in text
        assert "small-135m leads big-270m: latency decides (2.50× better" in text
        # CO2: measured for the GPU run at the world default, absent for the CPU-like one
        assert column(table, "co2_run_g") == ["0.0481", "–"]
        await pilot.press("n")
        assert rank.rank_by == "per" and rank.rank_choice == "per"
        assert column(table, "per") == ["0.000", "0.000"]
        assert column(table, "rank") == ["★1", "★1"]  # the study's PER ranks nothing
        assert "Ranked by PER  (n: PER-rel)" in screen_text(app)
        await pilot.press("n")
        assert rank.rank_by == "per_rel" and rank.rank_choice == "per_rel"


async def test_plot_view_shows_the_task_and_the_overview(filled_store: Store, tmp_path: Path):
    app = make_app(filled_store, tmp_path=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await pilot.press("3", "g")
        plot = app.query_one(PlotView)
        assert plot.display and not app.query_one("#rank-table").display
        assert plot.chart is not None and plot.chart.is_bars  # the overview: mean score bars
        await pilot.press("v", "v")  # gsm8k
        await pilot.pause()
        assert plot.chart.title == "gsm8k: accuracy against throughput per GPU"
        text = screen_text(app)
        assert "gsm8k: accuracy against throughput" in text and "◆ beta-270m" in text
        await pilot.press("g")
        assert app.query_one("#rank-table").display and not plot.display


async def test_inspect_shows_co2_or_says_it_is_absent(store: Store, tmp_path: Path):
    fill_store(store, TWO)
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await started(pilot)
        app.inspect("run-00")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, InspectScreen)
        # 360 J at 481 g/kWh = 0.0481 g; 2,000 tokens -> 0.024 g per 1k tokens
        assert "CO2e" in screen_text(app) and "0.0481 g per run" in screen_text(app)
        assert "0.024 g per 1k tokens" in screen_text(app)
        await pilot.press("escape")
        app.inspect("run-01")
        await pilot.pause()
        assert "no energy measured" in screen_text(app)
