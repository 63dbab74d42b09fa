"""One run's state, wherever it is seen, and the one fold of engine events into it. Stdlib only.

``RunState`` is the record of a run: what the scheduler knows of its runs, what the console and
the headless run show, what the store's ``runs()`` returns. ``Board`` folds events into
RunStates; the scheduler keeps its runs on one (the headless run shows it), the console folds
the events it is sent into one of its own. A new per-run figure is a field (or a property) of
RunState, filled in ``Board.apply`` when an event carries it.

Events can arrive late, twice or out of order (a progress after the result, a result before
the start): the board applies the rules the store applies, so no view contradicts the store.
A run in a terminal state never changes again; a progress older than the one held is dropped;
how a run ended is ``RunFailed.status`` (the one place that rule is written).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

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

RunStatus = Literal["queued", "running", "finished", "failed", "cancelled"]
RUN_STATUSES: tuple[str, ...] = ("queued", "running", "finished", "failed", "cancelled")
TERMINAL_STATUSES: tuple[str, ...] = ("finished", "failed", "cancelled")

HISTORY_POINTS = 60
"""Points kept per sparkline (about one a second: the last minute)."""

SpecLookup = Callable[[str], RunSpec | None]
"""Finds the spec of a run first seen through a later event (the store knows it)."""


def _points() -> deque[float]:
    return deque(maxlen=HISTORY_POINTS)


@dataclass
class History:
    """The last ``HISTORY_POINTS`` live figures of a run, oldest first (the console's
    sparklines): one point per progress event applied."""

    tokens_per_s: deque[float] = field(default_factory=_points)
    """Generated tokens/s, or samples/s for a run that scores choices."""
    mem_mb: deque[float] = field(default_factory=_points)
    util_pct: deque[float] = field(default_factory=_points)
    power_w: deque[float] = field(default_factory=_points)

    def copy(self) -> History:
        points = (self.tokens_per_s, self.mem_mb, self.util_pct, self.power_w)
        return History(*(deque(d, maxlen=HISTORY_POINTS) for d in points))


@dataclass
class RunState:
    """One run: its spec, where it stands, its latest progress, and how it ended.

    Fields are filled by what the holder has seen: every holder gets the events; the
    scheduler adds what only it knows (``gpu_ids``, ``launched_at``, ``log_path``,
    ``stopping``, ``non_event_lines``); the store adds nothing live (no progress, no history).
    """

    run_id: str
    spec: RunSpec | None = None
    """``None`` only on a console board, for a run first seen through a later event whose spec
    the store does not know yet."""
    status: RunStatus = "queued"
    """queued, running, finished, failed or cancelled. The scheduler marks a run running when
    it launches its worker; a board fed only by events (the console's) when the worker says it
    started (``RunStarted``) or sends progress, the store at ``RunStarted``."""
    queued_at: float | None = None
    """Unix seconds (every time here is from the events or the scheduler, never a view's clock)."""
    launched_at: float | None = None
    """When the scheduler started its worker process (or handed it to a serving worker)."""
    started_at: float | None = None
    """When the worker said it was alive (``RunStarted``)."""
    ended_at: float | None = None
    progress: RunProgress | None = None
    """The latest progress event."""
    samples_done: int = 0
    """Sample events seen (a console that attached mid-run saw only the later ones); for a
    run read from the store, the samples it holds."""
    samples_total: int = 0
    """Samples in the run as the store last heard (0: unknown); a run read from the store has
    no progress to say it."""
    metrics: dict[str, Any] | None = None
    """The result's metrics (``slmtui.metrics.RunMetrics`` as a dict) once finished."""
    error: RunFailed | None = None
    """How it ended without a result."""
    hardware: dict[str, Any] = field(default_factory=dict)
    """What the worker reported in ``RunStarted`` (GPU, driver, versions)."""
    gpu_ids: tuple[int, ...] = ()
    """NVML indices the scheduler gave it (empty: the CPU, or not launched)."""
    log_path: str | None = None
    """The worker's stderr log, once launched."""
    stopping: str | None = None
    """Why the scheduler is stopping its processes ("timeout", "cancelled", "hung", ...)."""
    non_event_lines: int = 0
    """Lines on the worker's stdout that were not events (skipped, copied to the log)."""
    history: History = field(default_factory=History)
    version: int = 0
    """Bumped on every change, so a view redraws only what changed."""

    def copy(self) -> RunState:
        """A copy that later changes to this one do not reach (for another thread)."""
        return replace(self, history=self.history.copy())

    @property
    def label(self) -> str:
        return self.spec.label if self.spec is not None else self.run_id

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def done(self) -> int:
        """Samples answered: the result's count once finished (a view that attached mid-run
        saw only the later sample events), else the most any event has said."""
        if self.status == "finished" and self.metrics and self.metrics.get("n_samples"):
            return int(self.metrics["n_samples"])
        return max(self.progress.done if self.progress else 0, self.samples_done)

    @property
    def total(self) -> int:
        """Samples in the run; 0 while unknown."""
        if self.status == "finished" and self.metrics and self.metrics.get("n_samples"):
            return int(self.metrics["n_samples"])
        if self.progress is not None and self.progress.total:
            return self.progress.total
        return self.samples_total

    @property
    def phase(self) -> str:
        """The status, or for a running run what it is doing: starting, loading, warmup,
        measuring."""
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

    # -- the headline figures (the store's flat columns), from the result's metrics ----------

    @property
    def accuracy(self) -> float | None:
        return self._figure("accuracy")

    @property
    def throughput(self) -> float | None:
        """THR per GPU (CPU counts as one), in ``throughput_unit``."""
        return self._figure("throughput")

    @property
    def throughput_unit(self) -> str | None:
        unit = (self.metrics or {}).get("throughput_unit")
        return unit if isinstance(unit, str) else None

    @property
    def latency_ms(self) -> float | None:
        """ms per generated token (generate) or per sample (loglikelihood)."""
        return self._figure("latency_ms")

    @property
    def memory_mb(self) -> float | None:
        """Peak memory in MB (``metrics['peak_mem_mb']``; ``mem_source`` says which counter)."""
        return self._figure("peak_mem_mb")

    @property
    def energy_j(self) -> float | None:
        """Energy over the measured window in J; ``None`` on CPU."""
        return self._figure("energy_j")

    def _figure(self, key: str) -> float | None:
        return finite((self.metrics or {}).get(key))


def finite(value: Any) -> float | None:
    """A finite float, else None (missing, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Board:
    """Runs by id, in the order first seen. Not thread-safe: one thread applies (the console's
    event loop; the scheduler under its lock) and hands out ``copy()``s to others."""

    def __init__(self, lookup: SpecLookup | None = None) -> None:
        self.runs: dict[str, RunState] = {}
        self.lookup = lookup

    def get(self, run_id: str) -> RunState:
        """The run, first seen now if it is new (its spec from ``lookup``)."""
        run = self.runs.get(run_id)
        if run is None:
            spec = self.lookup(run_id) if self.lookup is not None else None
            run = self.runs[run_id] = RunState(run_id, spec)
        return run

    def add(self, runs: Iterable[RunState]) -> None:
        """Runs known whole (the store's rows, a run just submitted); one already here is
        replaced in its place."""
        for run in runs:
            self.runs[run.run_id] = run

    def apply(self, event: Event) -> RunState | None:
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
            run.hardware = event.hardware
        elif isinstance(event, RunProgress):
            return run if self._progress(run, event) else None
        elif isinstance(event, SampleScored):
            run.samples_done += 1
        elif isinstance(event, RunFinished):
            run.status = "finished"
            run.metrics = event.metrics
            run.ended_at = event.t
        elif isinstance(event, RunFailed):
            run.status = event.status  # type: ignore[assignment]
            run.error = event
            run.ended_at = event.t
        else:
            return None
        run.version += 1
        return run

    def apply_snapshot(
        self, progress: Iterable[RunProgress], samples: dict[str, int] | None = None
    ) -> list[RunState]:
        """Apply a batch of the latest progress per run (and sample counts); the runs changed."""
        changed: dict[str, RunState] = {}
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

    def _progress(self, run: RunState, event: RunProgress) -> bool:
        if run.progress is not None and event.t < run.progress.t:
            return False  # older than the one held
        if run.status == "queued":
            run.status = "running"
        run.progress = event
        history = run.history
        if event.tokens_per_s is not None:
            history.tokens_per_s.append(event.tokens_per_s)
        elif event.samples_per_s is not None:
            history.tokens_per_s.append(event.samples_per_s)
        if event.mem_mb is not None:
            history.mem_mb.append(event.mem_mb)
        telemetry = event.telemetry or {}
        if isinstance(telemetry.get("util_pct"), int | float):
            history.util_pct.append(float(telemetry["util_pct"]))
        if isinstance(telemetry.get("power_w"), int | float):
            history.power_w.append(float(telemetry["power_w"]))
        run.version += 1
        return True

    # -- what only the scheduler knows (no event carries it) ----------------------------------

    def launched(
        self, run_id: str, *, gpu_ids: Sequence[int], log_path: str | None, t: float
    ) -> None:
        """Its worker process started (or a serving worker took it): it is running."""
        run = self.runs.get(run_id)
        if run is None or run.ended:
            return
        run.status = "running"
        run.gpu_ids = tuple(gpu_ids)
        run.log_path = log_path
        run.launched_at = t
        run.version += 1

    def stopping(self, run_id: str, reason: str) -> None:
        """Its processes are being stopped, for ``reason``."""
        run = self.runs.get(run_id)
        if run is not None and not run.ended:
            run.stopping = reason
            run.version += 1

    def stray_line(self, run_id: str) -> None:
        """Its worker wrote a line that was not one of its events."""
        run = self.runs.get(run_id)
        if run is not None:
            run.non_event_lines += 1
            run.version += 1

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self) -> list[RunState]:
        """Copies of every run, in the order first seen."""
        return [run.copy() for run in self.runs.values()]

    def running(self) -> list[RunState]:
        return [r for r in self.runs.values() if r.status == "running"]

    def counts(self) -> dict[str, int]:
        """Runs per status."""
        out = dict.fromkeys(RUN_STATUSES, 0)
        for run in self.runs.values():
            out[run.status] = out.get(run.status, 0) + 1
        return out
