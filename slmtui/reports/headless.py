"""`slmtui run PROFILE --headless`: run a profile without the console, then print PER tables.

Everything a user can get wrong (profile, --limit, --timeout, --data-dir, GPU counts, --db) is
checked before the store is opened, so a user error (exit 2) writes nothing. Live progress goes
to stderr (one row per run, about 4 refreshes a second; a line per run as it ends, which is all
a non-terminal log shows); the PER tables and the failures go to stdout.

The runs shown are the scheduler's board (``slmtui.board``: the same ``RunState``s, folded from
the same events, that the console shows); the scheduler's listener says when one has ended.

Exit codes: 0 every run finished (or was already stored), 1 some run failed or was cancelled,
2 a user error, 130 interrupted (finished runs are kept; the rest are cancelled).
"""

from __future__ import annotations

import argparse
import queue
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from slmtui import paths
from slmtui import profile as profiles
from slmtui.board import RunState
from slmtui.carbon import Grid
from slmtui.errors import UserError
from slmtui.per import automatic_rank_by, automatic_rank_reason, compute_per
from slmtui.plan import plan_runs
from slmtui.protocol import Event, RunFailed, RunFinished
from slmtui.reports.commands import build_per_inputs
from slmtui.reports.tables import render_per_tables
from slmtui.scheduler import Gpu, Scheduler, check_fits, detect_gpus
from slmtui.scheduler.scheduler import CommandFactory
from slmtui.spec import RunSpec
from slmtui.store import ResultRow, Store

_REFRESH_S = 0.25
_BAR_WIDTH = 16
"""Columns of a run's samples bar on a wide terminal."""
_MIN_BAR_WIDTH = 6
"""The narrowest the bar gets before the run's label has to wrap."""
_TAIL_LINES = 6


def run_headless(
    args: argparse.Namespace,
    *,
    command_factory: CommandFactory | None = None,
    inventory: Sequence[Gpu] | None = None,
    out: Console | None = None,
    err: Console | None = None,
) -> int:
    """Run the profile's runs not yet stored, show progress, print PER; return the exit code.

    ``command_factory``, ``inventory`` and the consoles are for embedding and tests.
    """
    out = out or Console()
    err = err or Console(stderr=True)
    specs, label, grid = _load_specs(args)
    gpus = detect_gpus() if inventory is None else list(inventory)
    check_fits(specs, gpus)
    db = Path(args.db).expanduser() if getattr(args, "db", None) else paths.default_db_path()

    with Store(db) as store:
        plan = plan_runs(specs, store, rerun=bool(getattr(args, "rerun", False)))
        err.print(_plan_line(label, specs, plan.to_run, len(plan.skipped), gpus, db))
        for run_id in store.recovered:
            err.print(f"[yellow]run {run_id} was left unfinished by an app that exited[/]")
        states: list[RunState] = []
        interrupted = False
        if plan.to_run:
            kwargs = {} if command_factory is None else {"command_factory": command_factory}
            ended: queue.SimpleQueue[str] = queue.SimpleQueue()
            scheduler = Scheduler(store, inventory=gpus, listener=_on_end(ended.put), **kwargs)
            try:
                scheduler.submit(plan.to_run)
                scheduler.start()
                _watch(scheduler, ended, err)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                scheduler.shutdown()
                states = scheduler.snapshot()
        keys = {spec.run_key for spec in specs}
        results = [r for r in store.results() if r.run_key in keys]

    _print_per(results, out, title=f"PER · {label} · {db}", grid=grid)
    failed = [s for s in states if s.status != "finished"]
    _print_failures(failed, out)
    if interrupted:
        err.print(
            f"[yellow]interrupted: {len(failed)} run(s) cancelled or failed; "
            f"finished runs are stored in {db}[/]"
        )
        return 130
    return 1 if failed else 0


def _load_specs(args: argparse.Namespace) -> tuple[list[RunSpec], str, Grid]:
    """The profile's runs with the command line's overrides; every check that can fail."""
    if getattr(args, "db", None) and Path(args.db).expanduser().is_dir():
        raise UserError(f"--db {args.db}: is a directory; give a file path such as results.sqlite")
    path = getattr(args, "profile", None)
    profiles.check_overrides(
        getattr(args, "limit", None),
        getattr(args, "timeout", None),
        getattr(args, "data_dir", None),
    )
    profile = profiles.load_profile(path) if path else profiles.embedded_default()
    specs = profiles.checked_runs(
        profile,
        where=f"profile {path}" if path else "embedded profile",
        limit=getattr(args, "limit", None),
        data_dir=getattr(args, "data_dir", None),
        timeout_s=getattr(args, "timeout", None),
    )
    return specs, f"profile {profile.name}", profile.settings.grid


def _plan_line(
    label: str, specs: list[RunSpec], to_run: list[RunSpec], skipped: int, gpus: list[Gpu], db: Path
) -> str:
    box = f"{len(gpus)} × {gpus[0].name}" if gpus else "CPU only"
    line = f"[bold]{label}[/]: {len(specs)} runs, {len(to_run)} to run"
    if skipped:
        line += f", {skipped} already stored (skipped; --rerun runs them again)"
    return f"{line} · {box} · store {db}"


def _on_end(tell: Callable[[str], object]) -> Callable[[Event], None]:
    """A scheduler listener that tells ``tell`` the id of each run as it ends (once each: a
    run ends exactly once, and the board holds it ended before the listener hears of it)."""

    def listen(event: Event) -> None:
        if isinstance(event, RunFinished | RunFailed):
            tell(event.run_id)

    return listen


def _watch(scheduler: Scheduler, ended: queue.SimpleQueue[str], err: Console) -> None:
    """Live table until every run has ended; one printed line per run as it ends."""

    def report_ended() -> None:
        while True:
            try:
                run = scheduler.state(ended.get_nowait())
            except queue.Empty:
                return
            if run is not None:
                err.print(_ended_line(run))

    with Live(
        get_renderable=lambda: progress_table(scheduler.snapshot()),
        console=err,
        refresh_per_second=1 / _REFRESH_S,
        transient=True,
    ):
        while not scheduler.wait(timeout=_REFRESH_S):
            report_ended()
    report_ended()


def progress_table(runs: Sequence[RunState], now: float | None = None) -> RenderableType:
    """One row per run: label, a samples bar and done/total, speed, latency, memory, accuracy,
    state; fitted to the terminal when it is printed (``_FittedProgress``)."""
    return _FittedProgress(list(runs), time.time() if now is None else now)


class _FittedProgress:
    """The progress table at the console's width: the count ("3/10") is a column of its own
    that never wraps or shrinks; where the table is too wide the bar beside it narrows first
    (from ``_BAR_WIDTH`` to ``_MIN_BAR_WIDTH``), then the run's label wraps."""

    def __init__(self, runs: list[RunState], now: float) -> None:
        self.runs = runs
        self.now = now

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = self.table(_BAR_WIDTH)
        natural = Measurement.get(console, options.update_width(10_000), table).maximum
        excess = natural - options.max_width
        if excess > 0:
            table = self.table(max(_MIN_BAR_WIDTH, _BAR_WIDTH - excess))
        yield table
        ended = sum(run.ended for run in self.runs)
        yield Text(f"{ended}/{len(self.runs)} runs ended", style="dim")

    def table(self, bar_width: int) -> Table:
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("Run")
        table.add_column("", max_width=bar_width)  # the bar, which fills its column
        table.add_column("Samples", no_wrap=True)  # the count beside it
        table.add_column("Speed", justify="right")
        table.add_column("Latency", justify="right")
        table.add_column("Mem MB", justify="right")
        table.add_column("Acc", justify="right")
        table.add_column("State")
        for run in self.runs:
            table.add_row(
                run.label,
                *_samples_cells(run),
                *_speed_cells(run),
                _memory_cell(run),
                _accuracy_cell(run),
                _state_cell(run, self.now),
            )
        return table


def _samples_cells(run: RunState) -> tuple[RenderableType, Text]:
    """The bar (as wide as its column) and the count ("3/10"; empty while the total is
    unknown)."""
    done, total = run.done, run.total
    if run.status == "finished":
        done = total = max(done, total, 1)
    if total:
        bar = ProgressBar(total=total, completed=done)
    elif run.status == "running":
        bar = ProgressBar(total=None, pulse=True)  # started, its size not known yet
    else:  # queued, or ended before it knew: empty (rich draws an unknown total as full)
        bar = ProgressBar(total=1, completed=0)
    return bar, Text(f"{done}/{total}" if total else "", style="dim")


def _speed_cells(run: RunState) -> tuple[str, str]:
    if run.metrics:
        unit = run.throughput_unit or ""
        per_item = "ms/sample" if unit == "samples/s" else "ms/token"
        return _num(run.throughput, f" {unit}".rstrip(), 1), _num(run.latency_ms, f" {per_item}", 1)
    progress = run.progress
    if progress is None or run.ended:
        return "", ""  # a run that failed or was cancelled has no speed to stand by
    if progress.tokens_per_s is not None:
        return _num(progress.tokens_per_s, " tokens/s", 1), _num(
            progress.ms_per_token, " ms/token", 1
        )
    if progress.samples_per_s is not None:
        ms = 1000 / progress.samples_per_s if progress.samples_per_s else None
        return _num(progress.samples_per_s, " samples/s", 2), _num(ms, " ms/sample", 1)
    return "", ""


def _memory_cell(run: RunState) -> str:
    if run.metrics:
        return _num(run.memory_mb, "", 0)
    return _num(run.progress.mem_mb if run.progress else None, "", 0)


def _accuracy_cell(run: RunState) -> str:
    return _num(run.accuracy, "", 3)


def _state_cell(run: RunState, now: float) -> Text:
    since = run.launched_at or run.queued_at or now
    elapsed = f" {(run.ended_at or now) - since:.0f}s"
    if run.status == "queued":
        return Text("queued", style="dim")
    if run.status == "finished":
        return Text("✓ finished" + elapsed, style="green")
    if run.ended:
        reason = run.error.reason if run.error else run.status
        return Text(f"✗ {reason}" + elapsed, style="red")
    if run.stopping:
        return Text(f"stopping ({run.stopping})", style="yellow")
    return Text(run.phase + elapsed, style="cyan")


def _ended_line(run: RunState) -> Text:
    since = run.launched_at or run.queued_at or 0.0
    took = f" ({(run.ended_at or time.time()) - since:.0f} s)" if run.launched_at else ""
    if run.status == "finished":
        speed, latency = _speed_cells(run)
        parts = [f"acc {_accuracy_cell(run)}", speed, latency, f"{_memory_cell(run)} MB"]
        if (run.metrics or {}).get("engine_fallback"):
            parts.append(f"ran {run.metrics['engine']}: {run.metrics['engine_fallback']}")
        return Text(f"✓ {run.label}: " + ", ".join(p for p in parts if p.strip()) + took, "green")
    return Text(f"✗ {run.label}: {run.reason or run.status}{took}", style="red")


def _print_per(results: list[ResultRow], out: Console, *, title: str, grid: Grid) -> None:
    if not results:
        out.print("No finished results for this profile yet.")
        return
    built = build_per_inputs(results, grid=grid)
    for note in built.notes:
        out.print(Text(f"note: {note}", style="dim"))
    for row in results:
        if fallback := (row.metrics or {}).get("engine_fallback"):
            out.print(Text(f"note: {row.model} · {row.task} ran plain: {fallback}", style="yellow"))
    if built.inputs:
        by = automatic_rank_by(built.inputs)
        render_per_tables(
            compute_per(built.inputs, rank_by=by),
            out,
            title=title,
            by=by,
            grid_label=grid.label,
            reason=automatic_rank_reason(by),
        )


def _print_failures(failed: list[RunState], out: Console) -> None:
    if not failed:
        return
    out.print(Text(f"{len(failed)} run(s) did not finish:", style="bold red"))
    for run in failed:
        out.print(Text(f"  ✗ {run.label} (run {run.run_id}) — {run.reason or run.status}", "red"))
        if run.log_path:
            out.print(Text(f"    log: {run.log_path}", style="dim"))
        tail = (run.error.log_tail if run.error else "").strip().splitlines()[-_TAIL_LINES:]
        for line in tail:
            out.print(Text(f"    | {line}", style="dim"))


def _num(value: object, unit: str, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:,.{digits}f}{unit}"
