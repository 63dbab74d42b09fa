"""``python -m slmtui.worker --spec-json J --run-id R [--serve]``: runs, events on stdout.

Without ``--serve`` the worker does one run and exits. With ``--serve`` it then reads further
runs from stdin, one JSON line each (``{"run_id": ..., "spec": {...}}``), and runs them one
after another with the model kept loaded (``runner.Models``: the scheduler sends only runs of the
same model, dtype, engine and GPU count); each run has its own events, window and result. It
exits at end of input, and after any run that failed otherwise than by a reason in
``protocol.SERVE_GOES_ON_AFTER`` (a crash or an OOM may have left the process in a bad state:
the rest of the group goes to a fresh worker).

stdout carries protocol events and nothing else. Before torch or transformers are imported, the
real stdout file descriptor is duplicated for the events and fd 1 / ``sys.stdout`` are pointed
at stderr, so whatever a library prints (even from C) lands in the log, not in the stream.

Exit code 0 after ``RunFinished``, 1 after ``RunFailed``. SIGTERM ends the run at once with
``RunFailed(reason="cancelled")``. Under torchrun only rank 0 writes events; the other ranks run
silently. A broken event pipe (the app is gone) ends the worker on its next event, and a worker
whose parent dies (the scheduler, or torchrun for a rank: ranks run in sessions of their own and
may never write an event) ends within ``PARENT_CHECK_S``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from slmtui.protocol import SERVE_GOES_ON_AFTER, Event, RunFailed, RunFinished
from slmtui.spec import RunSpec

if TYPE_CHECKING:
    from slmtui.worker.runner import Models

LOG_TAIL_LINES = 30
PARENT_CHECK_S = 0.5


class Cancelled(BaseException):
    """Raised in the main thread by SIGTERM; a BaseException so no ``except Exception`` eats it."""


class BadSpec(ValueError):
    """The spec given on the command line cannot be read."""


class EventWriter:
    """Writes events as JSON lines to the saved stdout, one flush per event, thread-safe."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if self.stream is None:
            return
        line = event.to_json() + "\n"
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                os._exit(1)  # nobody reads the events any more: stop working for no one


def exit_with_parent(period_s: float = PARENT_CHECK_S) -> None:
    """End this process soon after its parent is gone (a daemon thread polls ``getppid``)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="slmtui-parent-watch", daemon=True).start()


def claim_stdout() -> TextIO:
    """A stream on the real stdout for events; fd 1 and ``sys.stdout`` now go to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slmtui.worker", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec-json", help="the RunSpec as JSON")
    source.add_argument("--spec-file", help="a file holding the RunSpec as JSON")
    parser.add_argument("--run-id", default="run", help="id carried by every event")
    parser.add_argument(
        "--serve", action="store_true", help="then read more runs from stdin (JSON lines)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    exit_with_parent()
    events = claim_stdout()
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    emit = EventWriter(events if rank == 0 else None)
    current: dict[str, str | None] = {"run_id": args.run_id}
    """The run under way (None between the runs of ``--serve``: a SIGTERM then cancels none)."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one cancellation is enough
        raise Cancelled

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        try:
            spec = read_spec(args)
        except BadSpec as exc:
            emit(RunFailed(args.run_id, reason="bad_spec", message=str(exc)))
            return 1
        from slmtui.worker.runner import Models  # imports torch: after the redirect

        models = Models()
        run: tuple[str, RunSpec] | None = (args.run_id, spec)
        while run is not None:
            current["run_id"] = run[0]
            reason = run_one(*run, emit, models)
            current["run_id"] = None
            if not args.serve or (reason is not None and reason not in SERVE_GOES_ON_AFTER):
                return 0 if reason is None else 1
            run = next_run(sys.stdin, emit)
        return 0
    except Cancelled:
        print("slmtui: cancelled (SIGTERM)", file=sys.stderr)
        run_id = current["run_id"]
        if run_id is not None:
            emit(RunFailed(run_id, reason="cancelled", message="the run was cancelled (SIGTERM)"))
        sys.stderr.flush()
        os._exit(1)  # now: not after library atexit hooks or non-daemon threads


def run_one(run_id: str, spec: RunSpec, emit: EventWriter, models: Models) -> str | None:
    """One run, ended by ``RunFinished`` or ``RunFailed``; the failure reason, None on success."""
    from slmtui.worker.runner import RunError, run_spec

    try:
        metrics = run_spec(spec, run_id, emit, models)
    except RunError as exc:
        print(f"slmtui: run failed ({exc.reason}): {exc}", file=sys.stderr)
        emit(RunFailed(run_id, reason=exc.reason, message=str(exc)))  # type: ignore[arg-type]
        return exc.reason
    except Exception as exc:
        text = traceback.format_exc()
        print(text, file=sys.stderr)
        reason = "oom" if _is_oom(exc) else "crashed"
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        tail = "\n".join(text.rstrip().splitlines()[-LOG_TAIL_LINES:])
        emit(RunFailed(run_id, reason=reason, message=message, log_tail=tail))
        return reason
    if metrics is not None:  # None: a torchrun rank other than 0, which reports nothing
        emit(RunFinished(run_id, metrics=metrics))
    return None


def next_run(stream: TextIO, emit: EventWriter) -> tuple[str, RunSpec] | None:
    """The next run sent on ``stream`` (skipping unreadable lines, each answered with
    ``RunFailed("bad_spec")`` when it names its run); None at end of input."""
    for line in stream:
        if not line.strip():
            continue
        try:
            message = json.loads(line)
            run_id = str(message["run_id"])
        except (ValueError, KeyError, TypeError) as exc:
            print(f"slmtui: unreadable run line skipped: {exc}", file=sys.stderr)
            continue
        try:
            return run_id, RunSpec.from_dict(message["spec"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            first = (str(exc).splitlines() or [""])[0]
            emit(RunFailed(run_id, reason="bad_spec", message=f"run spec: {first}"))
    return None


def _is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or any error saying "out of memory" (CUDA, allocator, NCCL)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(exc).lower()


def read_spec(args: argparse.Namespace) -> RunSpec:
    """The RunSpec from ``--spec-json`` or ``--spec-file``; BadSpec (one line) otherwise."""
    try:
        if args.spec_file:
            with open(args.spec_file, encoding="utf-8") as f:
                text = f.read()
        else:
            text = args.spec_json
        return RunSpec.from_json(text)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise BadSpec(f"run spec: {type(exc).__name__}: {first}") from None


if __name__ == "__main__":
    raise SystemExit(main())
