"""The live state of every run the console has seen, built from engine events. Textual-free.

Events can arrive late, twice or out of order (a progress after the result, a result before
the start): the board applies the rules the store applies, so the view never contradicts it.
A run in a terminal state never changes again; a progress older than the one shown is dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from slmtui.protocol import (
    Event,
    RunFailed,
    RunFinished,
    RunProgress,
    RunQueued,
    RunStarted,
    SampleScored,
)
from slmtui.spec import RunSpec

HISTORY_POINTS = 60
"""Points kept per sparkline (about one a second: the last minute)."""

ENDED = ("finished", "failed", "cancelled")

SpecLookup = Callable[[str], RunSpec | None]
"""Finds the spec of a run first seen through a later event (the store knows it)."""


@dataclass
class LiveRun:
    """One run as the Runs tab shows it."""

    run_id: str
    spec: RunSpec | None
    status: str = "queued"
    queued_at: float | None = None
    """Unix seconds, from the events (never the app's clock)."""
    started_at: float | None = None
    ended_at: float | None = None
    progress: RunProgress | None = None
    samples_done: int = 0
    metrics: dict[str, Any] | None = None
    error: RunFailed | None = None
    tokens_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    mem_mb: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    util_pct: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    power_w: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    version: int = 0
    """Bumped on every change, so a widget redraws only what changed."""

    @property
    def label(self) -> str:
        return self.spec.label if self.spec is not None else self.run_id

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def done(self) -> int:
        """Samples answered: the result's count once finished (a console that attached
        mid-run saw only the later sample events), else the most any event has said."""
        if self.status == "finished" and self.metrics and self.metrics.get("n_samples"):
            return int(self.metrics["n_samples"])
        return max(self.progress.done if self.progress else 0, self.samples_done)

    @property
    def total(self) -> int:
        if self.status == "finished" and self.metrics and self.metrics.get("n_samples"):
            return int(self.metrics["n_samples"])
        return self.progress.total if self.progress else 0

    @property
    def phase(self) -> str:
        if self.status != "running":
            return self.status
        return self.progress.phase if self.progress else "starting"

    @property
    def eta_s(self) -> float | None:
        """Seconds left in the measured phase at its rate so far; ``None`` until it is known."""
        p = self.progress
        if p is None or p.phase != "measuring" or not p.total or not p.done or p.elapsed_s <= 0:
            return None
        return max(0.0, (p.total - p.done) * p.elapsed_s / p.done)

    @property
    def reason(self) -> str:
        """Why it ended without a result ('oom: ...'), or ''."""
        if self.error is None:
            return ""
        return f"{self.error.reason}: {self.error.message}"


class Board:
    """Runs by id, in the order first seen."""

    def __init__(self, lookup: SpecLookup | None = None) -> None:
        self.runs: dict[str, LiveRun] = {}
        self.lookup = lookup

    def get(self, run_id: str) -> LiveRun:
        run = self.runs.get(run_id)
        if run is None:
            spec = self.lookup(run_id) if self.lookup is not None else None
            run = self.runs[run_id] = LiveRun(run_id, spec)
        return run

    def apply(self, event: Event) -> LiveRun | None:
        """Apply one event; the run it changed, or ``None`` when it changed nothing."""
        run = self.get(event.run_id)
        if run.ended:
            return None
        if isinstance(event, RunQueued):
            run.spec = run.spec or RunSpec.from_dict(event.spec)
            run.queued_at = run.queued_at or event.t
        elif isinstance(event, RunStarted):
            if run.spec is None:
                run.spec = RunSpec.from_dict(event.spec)
            run.status = "running"
            run.started_at = event.t
        elif isinstance(event, RunProgress):
            return run if self._progress(run, event) else None
        elif isinstance(event, SampleScored):
            run.samples_done += 1
        elif isinstance(event, RunFinished):
            run.status = "finished"
            run.metrics = event.metrics
            run.ended_at = event.t
        elif isinstance(event, RunFailed):
            run.status = event.status
            run.error = event
            run.ended_at = event.t
        else:
            return None
        run.version += 1
        return run

    def apply_snapshot(
        self, progress: Iterable[RunProgress], samples: dict[str, int] | None = None
    ) -> list[LiveRun]:
        """Apply a batch of the latest progress per run (and sample counts); the runs changed."""
        changed: dict[str, LiveRun] = {}
        for event in progress:
            run = self.get(event.run_id)
            if not run.ended and self._progress(run, event):
                changed[run.run_id] = run
        for run_id, count in (samples or {}).items():
            run = self.get(run_id)
            if not run.ended and count:
                run.samples_done += count
                run.version += 1
                changed[run_id] = run
        return list(changed.values())

    def _progress(self, run: LiveRun, event: RunProgress) -> bool:
        if run.progress is not None and event.t < run.progress.t:
            return False  # older than the one shown
        if run.status == "queued":
            run.status = "running"
        run.progress = event
        if event.tokens_per_s is not None:
            run.tokens_per_s.append(event.tokens_per_s)
        elif event.samples_per_s is not None:
            run.tokens_per_s.append(event.samples_per_s)
        if event.mem_mb is not None:
            run.mem_mb.append(event.mem_mb)
        telemetry = event.telemetry or {}
        if isinstance(telemetry.get("util_pct"), int | float):
            run.util_pct.append(float(telemetry["util_pct"]))
        if isinstance(telemetry.get("power_w"), int | float):
            run.power_w.append(float(telemetry["power_w"]))
        run.version += 1
        return True

    def running(self) -> list[LiveRun]:
        return [r for r in self.runs.values() if r.status == "running"]

    def counts(self) -> dict[str, int]:
        """Runs per status, for the tab title and the status line."""
        out = {s: 0 for s in ("queued", "running", *ENDED)}
        for run in self.runs.values():
            out[run.status] = out.get(run.status, 0) + 1
        return out
