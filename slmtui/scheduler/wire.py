"""What the scheduler service and its clients say to each other: JSON lines on a Unix socket.

From the service: protocol events exactly as the workers write them (``slmtui.protocol``), and
three kinds of line of its own, told apart by ``type``: ``reply`` (to a command, by ``id``),
``attached`` (the state of every run it knows, sent once when a client attaches and before any
event, so a late client misses nothing) and ``notice`` (one line for users, e.g. the store
refused a write). From a client: commands ``{"cmd": ..., "id": n, ...}`` — ``attach``,
``submit`` (``specs``), ``cancel`` (``run_id``), ``cancel_all``, ``status``, ``shutdown``.
"""

from __future__ import annotations

import json
from typing import Any

from slmtui.board import RunState
from slmtui.protocol import (
    PROTOCOL_VERSION,
    Event,
    RunFailed,
    RunFinished,
    RunProgress,
    RunQueued,
    RunStarted,
    parse_event,
)
from slmtui.spec import RunSpec

SERVICE_TYPES = ("reply", "attached", "notice")


def line(kind: str, **fields: Any) -> bytes:
    """One service line (``reply``, ``attached`` or ``notice``), newline included."""
    return (
        json.dumps({"v": PROTOCOL_VERSION, "type": kind, **fields}, default=str) + "\n"
    ).encode()


def command(cmd: str, request_id: int, **fields: Any) -> bytes:
    return (json.dumps({"cmd": cmd, "id": request_id, **fields}) + "\n").encode()


def event_line(event: Event) -> bytes:
    return (event.to_json() + "\n").encode()


def state_to_dict(state: RunState) -> dict[str, Any]:
    """A scheduler's RunState (its spec always known) as JSON-ready data, events kept in their
    wire form; the sparkline history is not sent."""
    return {
        "run_id": state.run_id,
        "spec": state.spec.to_dict(),  # type: ignore[union-attr]
        "status": state.status,
        "queued_at": state.queued_at,
        "gpu_ids": list(state.gpu_ids),
        "launched_at": state.launched_at,
        "started_at": state.started_at,
        "ended_at": state.ended_at,
        "progress": json.loads(state.progress.to_json()) if state.progress else None,
        "samples_done": state.samples_done,
        "samples_total": state.samples_total,
        "metrics": state.metrics,
        "error": json.loads(state.error.to_json()) if state.error else None,
        "hardware": state.hardware,
        "stopping": state.stopping,
        "non_event_lines": state.non_event_lines,
        "log_path": state.log_path,
    }


def state_from_dict(d: dict[str, Any]) -> RunState:
    progress = parse_event(json.dumps(d["progress"])) if d.get("progress") else None
    error = parse_event(json.dumps(d["error"])) if d.get("error") else None
    return RunState(
        run_id=d["run_id"],
        spec=RunSpec.from_dict(d["spec"]),
        status=d["status"],
        queued_at=d["queued_at"],
        gpu_ids=tuple(d.get("gpu_ids") or ()),
        launched_at=d.get("launched_at"),
        started_at=d.get("started_at"),
        ended_at=d.get("ended_at"),
        progress=progress if isinstance(progress, RunProgress) else None,
        samples_done=d.get("samples_done", 0),
        samples_total=d.get("samples_total", 0),
        metrics=d.get("metrics"),
        error=error if isinstance(error, RunFailed) else None,
        hardware=d.get("hardware") or {},
        stopping=d.get("stopping"),
        non_event_lines=d.get("non_event_lines", 0),
        log_path=d.get("log_path"),
    )


def replay(state: RunState) -> list[Event]:
    """Events that bring a view that has never seen a run to its state now (a late client):
    queued, started, the latest progress, and how it ended (a scheduler's run: spec known)."""
    spec = state.spec.to_dict()  # type: ignore[union-attr]
    events: list[Event] = [RunQueued(state.run_id, spec=spec, t=state.queued_at or 0.0)]
    if state.launched_at is not None:
        events.append(
            RunStarted(state.run_id, spec=spec, pid=0, hardware=state.hardware, t=state.launched_at)
        )
    if state.progress is not None:
        events.append(state.progress)
    if state.status == "finished":
        events.append(
            RunFinished(state.run_id, metrics=state.metrics or {}, t=state.ended_at or 0.0)
        )
    elif state.error is not None:
        events.append(state.error)
    return events
