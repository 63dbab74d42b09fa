"""Inspect one run: metrics, settings, hardware, timing split, samples beside gold, failure log."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from slmtui.board import RunState
from slmtui.carbon import Grid, carbon_of, parse_grid
from slmtui.store import SampleRow
from slmtui.ui.cells import num
from slmtui.ui.tables import fill_table

SAMPLE_COLUMNS = (("index", "#"), ("score", "Score"), ("output", "Output"), ("gold", "Gold"))
_TIMING = (("load_s", "load"), ("warmup_s", "warm-up"), ("measured_s", "measured"))


class InspectScreen(Screen[None]):
    """Everything stored about one run (read from the store when opened)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "close", "Back", id="inspect.close", tooltip="Back to the console"),
        Binding("1", "show('summary')", "Summary", id="inspect.summary"),
        Binding("2", "show('samples')", "Samples", id="inspect.samples"),
        Binding("3", "show('log')", "Log", id="inspect.log"),
    ]

    DEFAULT_CSS = """
    InspectScreen #title { height: auto; padding: 0 1; text-style: bold; background: $boost; }
    InspectScreen TabbedContent { height: 1fr; }
    InspectScreen TabPane { height: 1fr; padding: 0 1; }
    InspectScreen #sample-table { height: 1fr; }
    InspectScreen #sample-detail { height: auto; max-height: 50%; border-top: solid $primary; }
    """

    def __init__(self, run: RunState, samples: list[SampleRow], grid: Grid | None = None) -> None:
        """``grid``: the carbon intensity for the CO2 lines (default: world)."""
        super().__init__()
        self.run = run
        self.samples = samples
        self.grid = grid or parse_grid(None)

    def compose(self) -> ComposeResult:
        run = self.run
        title = Text(f"{run.label}  ", style="bold")
        title.append(run.status, style="green" if run.status == "finished" else "red")
        title.append(f"   run {run.run_id}", style="dim")
        yield Static(title, id="title")
        with TabbedContent(initial="summary" if run.status == "finished" else "log"):
            with TabPane("Summary", id="summary"), VerticalScroll(id="summary-scroll"):
                yield Static(self.summary(), id="summary-body")
            with TabPane(f"Samples ({len(self.samples)})", id="samples"):
                yield DataTable(id="sample-table", cursor_type="row", zebra_stripes=True)
                with VerticalScroll(id="sample-detail"):
                    yield Static(id="sample-text")
            with TabPane("Log", id="log"), VerticalScroll(id="log-scroll"):
                yield Static(self.failure(), id="log-body")
        yield Footer()

    def on_mount(self) -> None:
        rows = [
            (
                str(s.index),
                (
                    str(s.index),
                    Text(f"{s.score:.2f}", style="green" if s.score >= 1 else "red"),
                    _short(s.output),
                    _short(s.gold),
                ),
            )
            for s in self.samples
        ]
        fill_table(
            self.query_one("#sample-table", DataTable),
            SAMPLE_COLUMNS,
            rows,
            max_widths={"output": 48, "gold": 32},
        )
        if self.samples:
            self._show_sample(0)
        self._focus(self.query_one(TabbedContent).active)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self._focus(tab)

    @on(TabbedContent.TabActivated)
    def _tab_shown(self, event: TabbedContent.TabActivated) -> None:
        self._focus(event.pane.id or "")

    def _focus(self, tab: str) -> None:
        """Focus what the tab scrolls, so the arrow keys work at once."""
        target = {"summary": "#summary-scroll", "samples": "#sample-table", "log": "#log-scroll"}
        if tab in target:
            self.query_one(target[tab]).focus(scroll_visible=False)

    @on(DataTable.RowHighlighted, "#sample-table")
    def _sample_moved(self, event: DataTable.RowHighlighted) -> None:
        self._show_sample(event.cursor_row)

    def _show_sample(self, row: int) -> None:
        if not 0 <= row < len(self.samples):
            return
        s = self.samples[row]
        text = Text()
        text.append(f"item {s.item_id} · score {s.score:.3f}\n", style="bold")
        text.append("prompt\n", style="bold cyan")
        text.append(s.prompt.strip()[-1500:] + "\n")
        text.append("output\n", style="bold cyan")
        text.append(s.output + "\n")
        text.append("gold\n", style="bold cyan")
        text.append(s.gold)
        if s.extra:
            text.append("\nextra ", style="bold cyan")
            text.append(json.dumps(s.extra, default=str)[:500])
        self.query_one("#sample-text", Static).update(text)

    # -- content ------------------------------------------------------------------------------

    def summary(self) -> Group:
        run, m = self.run, self.run.metrics or {}
        parts: list[Any] = []
        headline = _grid()
        unit = run.throughput_unit or ""
        headline.add_row("accuracy", num(run.accuracy, 3))
        headline.add_row("throughput (per GPU)", num(run.throughput, 2, unit))
        headline.add_row("latency", num(run.latency_ms, 2, "ms"))
        headline.add_row("peak memory", num(run.memory_mb, 0, f"MB ({m.get('mem_source', '?')})"))
        headline.add_row("energy", num(run.energy_j, 1, "J"))
        carbon = carbon_of(run.energy_j, m, self.grid)
        if carbon.run_g is None:
            headline.add_row("CO2e", "– (no energy measured on this hardware)")
        else:
            headline.add_row(
                "CO2e",
                f"{carbon.run_g:.3g} g per run · "
                + (
                    f"{carbon.per_1k_tokens_g:.3g} g per 1k tokens · "
                    if carbon.per_1k_tokens_g is not None
                    else ""
                )
                + (
                    f"{carbon.per_correct_g:.3g} g per correct answer"
                    if carbon.per_correct_g is not None
                    else "no correct answer"
                )
                + f"  ({self.grid.label})",
            )
        parts += [Text("Result", style="bold underline"), headline]

        timing = _grid()
        total = sum(v for k, _ in _TIMING if isinstance(v := m.get(k), int | float))
        for key, label in _TIMING:
            value = m.get(key)
            share = f" ({value / total:.0%})" if isinstance(value, int | float) and total else ""
            timing.add_row(label, num(value, 2, "s") + share)
        measured = m.get("measured_s")
        for key, label, rate, rate_label in (
            ("prefill_s", "  prefill", "prefill_tokens_per_s", "prompt tokens/s"),
            ("decode_s", "  decode", "decode_tokens_per_s", "tokens/s"),
        ):
            value = m.get(key)
            if isinstance(value, int | float) and isinstance(measured, int | float) and measured:
                timing.add_row(
                    label,
                    f"{num(value, 2, 's')} ({value / measured:.0%} of measured) · "
                    f"{num(m.get(rate), 1, rate_label)}",
                )
        for label, p50, p95 in (
            ("time to first token", "ttft_p50_ms", "ttft_p95_ms"),
            ("inter-token latency", "itl_p50_ms", "itl_p95_ms"),
        ):
            if m.get(p50) is not None:
                timing.add_row(
                    f"  {label}", f"p50 {num(m.get(p50), 2, 'ms')} · p95 {num(m.get(p95), 2, 'ms')}"
                )
        parts += [
            Text("\nTiming (THR and LAT use the measured part only)", style="bold underline"),
            timing,
        ]

        spec = run.spec
        settings = _grid()
        for label, value in (
            ("model", f"{spec.model.name} ({spec.model.kind}: {spec.model.source})"),
            ("task", spec.task),
            ("GPUs", "CPU" if spec.gpus == 0 else f"{spec.gpus} ({spec.parallel})"),
            ("dtype", spec.dtype),
            *((("quantize", _quantize_line(spec.quantize, m)),) if spec.quantize != "none" else ()),
            ("batch size", str(spec.batch_size)),
            ("engine", _engine_line(spec.engine, m)),
            ("limit", str(spec.options.limit or "all")),
            ("few-shot", _opt(spec.options.num_fewshot)),
            ("mode", _opt(spec.options.mode or m.get("mode"))),
            ("max new tokens", _opt(spec.options.max_new_tokens)),
            ("data", f"{m.get('data_source', '?')}: {m.get('data_location', '?')}"),
            ("run key", spec.run_key),
        ):
            settings.add_row(label, value)
        parts += [Text("\nSettings", style="bold underline"), settings]

        hardware = _grid()
        for key, value in (run.hardware or m.get("hardware") or {}).items():
            hardware.add_row(str(key), str(value))
        parts += [Text("\nHardware", style="bold underline"), hardware]

        shown = {"hardware", "telemetry", "task_metrics"}
        every = _grid()
        for key in sorted(k for k in m if k not in shown):
            value = m[key]
            every.add_row(key, num(value, 4) if isinstance(value, float) else str(value))
        for key, value in (m.get("task_metrics") or {}).items():
            every.add_row(f"task_metrics.{key}", num(value, 4))
        if m.get("telemetry"):
            every.add_row("telemetry", json.dumps(m["telemetry"], default=str)[:800])
        parts += [Text("\nAll metrics", style="bold underline"), every]
        if not m:
            parts.append(Text("(no metrics: the run did not finish; see Log)", style="dim"))
        return Group(*parts)

    def failure(self) -> Text:
        run, error = self.run, self.run.error
        if error is None:
            return Text(f"The run is {run.status}; no failure to show.", style="dim")
        text = Text()
        text.append(f"{error.reason}", style="bold red")
        text.append(f": {error.message}\n\n")
        text.append("log tail\n", style="bold")
        text.append(error.log_tail or "(empty)")
        return text


def _grid() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    return table


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _engine_line(requested: str, metrics: dict) -> str:
    """The engine that ran, and why when it is not the one the spec asked for."""
    fallback = metrics.get("engine_fallback")
    if not fallback:
        return str(metrics.get("engine") or requested)
    return f"{metrics.get('engine')} (asked: {requested}) — {fallback}"


def _quantize_line(quantize: str, m: dict[str, Any]) -> str:
    """'int4: torchao int4 weight-only, ...; 3,912 MiB of weights' (what the run recorded)."""
    parts = [f"{quantize}: {m.get('quantize_scheme') or 'not recorded'}"]
    if isinstance(m.get("weight_bytes"), int):
        parts.append(f"{m['weight_bytes'] / 2**20:,.0f} MiB of weights")
    return "; ".join(parts)


def _opt(value: object) -> str:
    return "task default" if value is None else str(value)
