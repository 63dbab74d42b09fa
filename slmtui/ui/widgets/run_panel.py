"""One running run: model, task, GPUs, progress bar with ETA, speed, memory and telemetry."""

from __future__ import annotations

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from slmtui.board import RunState
from slmtui.ui.cells import duration, num, spark, where


class RunPanel(Static):
    """Redrawn from a RunState only when its version changed (about once a second)."""

    DEFAULT_CSS = """
    RunPanel { height: auto; border: round $primary 50%; padding: 0 1; }
    RunPanel.-stopping { border: round $warning; }
    """

    def __init__(self, run: RunState, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run = run
        self.shown_version = -1

    def on_mount(self) -> None:
        self.show(self.run)

    def show(self, run: RunState) -> None:
        self.run = run
        if run.version == self.shown_version:
            return
        self.shown_version = run.version
        self.border_title = run.label
        self.update(self.render_run(run))

    @staticmethod
    def render_run(run: RunState) -> Group:
        spec = run.spec
        head = Text()
        head.append(f"{run.phase:<9}", style="bold cyan")
        if spec is not None:
            head.append(f" {where(spec.gpus)} · {spec.dtype} · batch {spec.batch_size}")
        step = run.progress.step if run.progress is not None else None
        if step and run.status == "running":
            head.append(f" · {step}", style="italic")  # e.g. "converting GGUF (one time)"

        bar = Table.grid(expand=True, padding=(0, 1))
        bar.add_column(ratio=1)
        bar.add_column(no_wrap=True)
        total = run.total
        done = min(run.done, total) if total else run.done
        # an unknown total draws an empty bar: rich pulses by the clock, and the panel redraws
        # only when the run changes
        progress = ProgressBar(total=total or 1, completed=done if total else 0)
        eta = run.eta_s
        bar.add_row(
            progress,
            f"{done}/{total or '?'} samples"
            + (f" · ETA {duration(eta)}" if eta is not None else ""),
        )

        p = run.progress
        speed = Text()
        if p is not None and p.samples_per_s is not None and p.tokens_per_s is None:
            speed.append(f"samples/s {num(p.samples_per_s, 2)} ", style="bold")
        else:
            speed.append(f"tokens/s {num(p.tokens_per_s if p else None)} ", style="bold")
        speed.append(spark(run.history.tokens_per_s), style="green")
        speed.append(f"  ms/token {num(p.ms_per_token if p else None)}", style="bold")
        speed.append(f"  mem {num(p.mem_mb if p else None, 0, 'MB')} ", style="bold")
        speed.append(spark(run.history.mem_mb), style="magenta")

        lines: list[object] = [head, bar, speed]
        telemetry = (p.telemetry if p else None) or {}
        if run.history.util_pct or run.history.power_w:
            gpu = Text()
            gpu.append(f"GPU util {num(telemetry.get('util_pct'), 0, '%')} ", style="bold")
            gpu.append(spark(run.history.util_pct), style="yellow")
            gpu.append(f"  power {num(telemetry.get('power_w'), 0, 'W')} ", style="bold")
            gpu.append(spark(run.history.power_w), style="red")
            lines.append(gpu)
        if degraded := telemetry.get("degraded"):
            lines.append(Text(f"telemetry degraded: {degraded}", style="yellow"))
        return Group(*lines)  # type: ignore[arg-type]
