"""The worker's event stream: versioned JSON lines on stdout. Stdlib only.

This is the one module the worker and the app both import. Every line is one JSON object::

    {"v": 1, "type": "progress", "run_id": "...", "t": 1732350000.1, ...fields}

The worker writes events and nothing else to stdout (libraries print to stderr). A reader
skips lines that are not events (and counts them), so a stray print never kills a run.
Events are past tense facts; fields carry their unit in their name.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

PROTOCOL_VERSION = 1

ErrorReason = Literal[
    "oom", "load_failed", "data_failed", "crashed", "timeout", "cancelled", "bad_spec", "hung"
]
ERROR_REASONS: tuple[str, ...] = (
    "oom",
    "load_failed",
    "data_failed",
    "crashed",
    "timeout",
    "cancelled",
    "bad_spec",
    "hung",
)
"""``hung``: no event (not even the heartbeat) for the scheduler's grace; the scheduler stops it."""

SERVE_GOES_ON_AFTER: tuple[str, ...] = ("bad_spec", "data_failed", "load_failed")
"""Failures after which a worker serving a group of runs (``--serve``) takes the next run: they
leave the process sound. After any other failure it exits and the group goes on in a fresh one."""


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    run_id: str
    t: float = field(default_factory=time.time, kw_only=True)
    """Wall-clock time the event was made (Unix seconds)."""

    def to_json(self) -> str:
        d = {"v": PROTOCOL_VERSION, "type": self.type}
        d.update(asdict(self))
        return json.dumps(d, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class RunStarted(Event):
    """The worker is alive and about to load the model."""

    type: ClassVar[str] = "started"
    spec: dict[str, Any]
    pid: int
    hardware: dict[str, Any] = field(default_factory=dict)
    """GPU name/count, driver, CUDA, torch, transformers, python, cpu."""


@dataclass(frozen=True)
class RunProgress(Event):
    """Emitted at least once a second while the run is alive, in every phase."""

    type: ClassVar[str] = "progress"
    phase: Literal["loading", "warmup", "measuring"]
    done: int = 0
    """Samples finished."""
    total: int = 0
    """Samples in the run (0 while still unknown)."""
    elapsed_s: float = 0.0
    """Seconds since the measured phase began (0 before it)."""
    tokens_per_s: float | None = None
    """Generated tokens per second so far, over all the run's GPUs (not per GPU); counted as the
    engine generates them, not when a sample completes."""
    ms_per_token: float | None = None
    samples_per_s: float | None = None
    mem_mb: float | None = None
    """Current memory of the run: GPU memory when on GPU, else process RSS."""
    telemetry: dict[str, Any] = field(default_factory=dict)
    """Live GPU telemetry (utilisation %, power W, per-GPU memory MB) when NVML is available."""
    step: str | None = None
    """What the phase is doing now, in words (loading: "converting GGUF (one time)", "loading
    weights"; warmup: "warming up / capturing graphs"); None when it does not say."""


@dataclass(frozen=True)
class SampleScored(Event):
    """One benchmark item: what went in, what came out, and how it scored."""

    type: ClassVar[str] = "sample"
    index: int
    item_id: str
    prompt: str
    output: str
    gold: str
    score: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFinished(Event):
    """The run's result. ``metrics`` holds every number; see ``slmtui.metrics_doc``."""

    type: ClassVar[str] = "result"
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RunFailed(Event):
    """The run ended without a result; ``reason`` classifies why."""

    type: ClassVar[str] = "error"
    reason: ErrorReason
    message: str
    log_tail: str = ""

    @property
    def status(self) -> str:
        """The run's final status: "cancelled" when it was stopped on purpose, else "failed".
        The one place this rule is written (store, scheduler and console all read it)."""
        return "cancelled" if self.reason == "cancelled" else "failed"


@dataclass(frozen=True)
class RunQueued(Event):
    """The scheduler accepted the run; it waits for free GPUs. Made by the scheduler only."""

    type: ClassVar[str] = "queued"
    spec: dict[str, Any]
    """The RunSpec as a dict (``RunSpec.from_dict`` reads it back)."""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (RunQueued, RunStarted, RunProgress, SampleScored, RunFinished, RunFailed)
}


class ProtocolError(ValueError):
    """A line that is not a valid event of this protocol version."""


def parse_event(line: str) -> Event:
    """Parse one line into an Event; raise ProtocolError for anything else."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {line[:80]!r}") from exc
    if not isinstance(d, dict) or "type" not in d:
        raise ProtocolError(f"not an event: {line[:80]!r}")
    if d.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {d.get('v')!r}, expected {PROTOCOL_VERSION}")
    cls = EVENT_TYPES.get(d["type"])
    if cls is None:
        raise ProtocolError(f"unknown event type {d['type']!r}")
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    _check_shape(d["type"], kwargs)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProtocolError(f"bad {d['type']} event: {exc}") from exc


_DICT_FIELDS = ("spec", "hardware", "telemetry", "metrics", "extra")
_NUMBER_FIELDS = ("t", "pid", "done", "total", "index", "elapsed_s", "score")


def _check_shape(kind: str, kwargs: dict[str, Any]) -> None:
    """The fields a reader relies on have the right JSON type (a str run id, dict payloads,
    numbers), so a garbled event is refused here rather than failing later in the store."""
    if not isinstance(kwargs.get("run_id"), str):
        raise ProtocolError(f"bad {kind} event: run_id must be a string")
    for name, value in kwargs.items():
        if name in _DICT_FIELDS and not isinstance(value, dict):
            raise ProtocolError(f"bad {kind} event: {name} must be an object")
        if name in _NUMBER_FIELDS and not isinstance(value, int | float):
            raise ProtocolError(f"bad {kind} event: {name} must be a number")


def is_malformed_event(line: str) -> bool:
    """Whether a line that ``parse_event`` refused claims to be an event of this protocol (a
    garbled or truncated event, a fault) rather than a stray print (skipped and counted)."""
    text = line.strip()
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        compact = text.replace(" ", "")
        return compact.startswith('{"v":' + str(PROTOCOL_VERSION))
    return isinstance(d, dict) and d.get("v") == PROTOCOL_VERSION and d.get("type") in EVENT_TYPES
