"""Inspect's timing split: prefill and decode shown as parts of the measured window."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from ui_fixtures import T0, metrics, spec

from slmtui.protocol import RunFinished, RunQueued, RunStarted
from slmtui.store import Store
from slmtui.ui.screens.inspect import InspectScreen


def summary_text(tmp_path: Path, **extra: float) -> str:
    with Store(tmp_path / "s.sqlite") as store:
        s = spec("alpha-135m").to_dict()
        store.record(RunQueued("r", spec=s, t=T0))
        store.record(RunStarted("r", spec=s, pid=1, t=T0 + 1))
        store.record(RunFinished("r", metrics=metrics(0.5, 10.0, 100.0, 400.0, **extra), t=T0 + 9))
        row = store.run("r")
    assert row is not None
    console = Console(width=120, record=True, color_system=None)
    console.print(InspectScreen(row, []).summary())
    return console.export_text()


def test_prefill_and_decode_are_shown_as_shares_of_the_measured_window(tmp_path: Path) -> None:
    text = summary_text(
        tmp_path,
        prefill_s=1.5,
        prefill_tokens_per_s=800.0,
        decode_s=6.0,
        decode_tokens_per_s=42.0,
    )
    assert "prefill" in text and "1.50 s (20% of measured)" in text
    assert "800.0 prompt tokens/s" in text
    assert "6.00 s (80% of measured)" in text and "42.0 tokens/s" in text


def test_runs_without_the_split_show_no_prefill_line(tmp_path: Path) -> None:
    text = summary_text(tmp_path)
    assert "of measured" not in text
