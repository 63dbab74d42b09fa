"""The scheduler: packs queued runs on free GPUs, runs one worker process each, reads events.

One background thread (``start``) does all the work: it launches workers, receives their
parsed stdout lines from one reader thread per worker, commits each event to the store, then
calls the listener, enforces timeouts and cleans up process trees. Other threads (the UI, the
headless loop) call ``submit``, ``cancel``, ``snapshot`` and ``wait``; state is guarded by one
lock and the listener is never called with it held.

A run ends exactly once: with the worker's result or error, or with ``RunFailed`` made here
(``timeout``, ``cancelled``, ``hung`` when no line came for ``hang_grace_s`` although the worker
sends a heartbeat every half second, or ``crashed`` when the worker exits without a result or
sends a malformed event). Its GPUs are free again only when its processes are gone.

If the store refuses a write (disk full, read-only), the scheduler says so once
(``store_error``), launches nothing more and stops the runs: what is stored stays stored.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from slmtui import paths
from slmtui.board import Board, RunState
from slmtui.errors import StoreWriteError
from slmtui.protocol import (
    Event,
    ProtocolError,
    RunFailed,
    RunFinished,
    RunQueued,
    is_malformed_event,
    parse_event,
)
from slmtui.scheduler import groups
from slmtui.scheduler.gpus import Gpu, detect_gpus
from slmtui.scheduler.launch import WorkerProcess, describe_exit, log_tail, worker_command
from slmtui.scheduler.packing import Pending, check_fits, pack
from slmtui.spec import RunSpec

CommandFactory = Callable[[RunSpec, str, Sequence[int]], tuple[list[str], dict[str, str]]]
"""(spec, run_id, gpu_ids) -> (argv, env): how a worker is started (tests inject fakes)."""
Listener = Callable[[Event], None]

_DESCENDANTS_EVERY_S = 1.0
_PIPE_GRACE_S = 1.0
HANG_GRACE_S = 120.0
"""A worker that sends no line for this long is stopped as ``hung`` (its heartbeat comes every
0.5 s in every phase, from a thread of its own, so only a wedged process goes this quiet)."""


class EventStore(Protocol):
    """What the scheduler needs from ``slmtui.store.Store``."""

    def begin_run(self, run_id: str, spec: RunSpec) -> None: ...
    def record(self, event: Event) -> None: ...


@dataclass
class _Worker:
    run_id: str
    spec: RunSpec
    gpu_ids: tuple[int, ...]
    process: WorkerProcess
    launched_mono: float
    eof: bool = False
    exited_mono: float | None = None
    outcome: RunFinished | RunFailed | None = None
    outcome_mono: float | None = None
    stop_reason: str | None = None
    kill_at_mono: float | None = None
    tracked_mono: float = 0.0
    last_line_mono: float = 0.0
    malformed: str | None = None
    launch_id: str = ""
    """The run its process was started for (its reader's key); see ``groups``."""
    serving: bool = False
    handed_off: bool = False


@dataclass(frozen=True)
class _Line:
    run_id: str
    event: Event | None
    raw: str = ""
    malformed: str | None = None
    """Why a line that claims to be an event could not be read."""


@dataclass(frozen=True)
class _Eof:
    run_id: str


@dataclass(frozen=True)
class _Notify:
    event: Event


@dataclass
class _Outbox:
    events: list[Event] = field(default_factory=list)


class Scheduler:
    """Runs submitted specs on this box's GPUs (or the CPU), one worker process per run."""

    def __init__(
        self,
        store: EventStore,
        *,
        inventory: Sequence[Gpu] | None = None,
        listener: Listener | None = None,
        command_factory: CommandFactory = worker_command,
        logs_dir: Path | None = None,
        kill_grace_s: float = 5.0,
        exit_grace_s: float = 30.0,
        tick_s: float = 0.1,
        handle_signals: bool = True,
        hang_grace_s: float = HANG_GRACE_S,
        group_runs: bool | None = None,
    ) -> None:
        """
        ``inventory``: the GPUs to use (default: ``detect_gpus()``); empty means a CPU box.
        ``kill_grace_s``: SIGTERM to SIGKILL. ``exit_grace_s``: how long a worker may linger
        after its result before it is stopped (the result stands). ``hang_grace_s``: silence
        after which a worker is stopped as hung. ``handle_signals``: on
        ``start`` from the main thread, SIGINT/SIGTERM/SIGHUP stop every run before the app
        goes (the previous handlers are chained). ``group_runs``: one worker serves the queued
        runs of one model in turn (``groups``); default on with the real worker command.
        """
        self.store = store
        self.gpus: list[Gpu] = detect_gpus() if inventory is None else list(inventory)
        self.listener = listener
        self.command_factory = command_factory
        self.logs_dir = paths.logs_dir() if logs_dir is None else Path(logs_dir)
        self.kill_grace_s = kill_grace_s
        self.exit_grace_s = exit_grace_s
        self.tick_s = tick_s
        self.handle_signals = handle_signals
        self.hang_grace_s = hang_grace_s
        self.store_error: str | None = None
        """The one-line reason the store refused a write; set once, then nothing launches."""
        self.group_runs = command_factory is worker_command if group_runs is None else group_runs
        self._alias: dict[str, str] = {}
        """Launch run id -> the run its (serving) process is on now."""

        self._lock = threading.RLock()
        self._settled_cv = threading.Condition(self._lock)
        self._settled = True
        self._inbox: queue.Queue[_Line | _Eof | _Notify | None] = queue.Queue()
        self._board = Board()
        """Every submitted run, folded from the events committed here plus what only the
        scheduler knows (launch, GPUs, log, stopping); ``snapshot`` hands out copies."""
        self._pending: list[Pending] = []
        self._workers: dict[str, _Worker] = {}
        self._cpu_run: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._shut_down = False
        self._previous_handlers: dict[int, Any] = {}

    # -- commands -----------------------------------------------------------------------------

    def submit(self, specs: Iterable[RunSpec]) -> list[str]:
        """Queue runs; returns their run ids. Raises UserError, queueing nothing, when a run
        asks more GPUs than this box lends."""
        specs = list(specs)
        check_fits(specs, self.gpus)
        run_ids: list[str] = []
        with self._lock:
            if self._stopping:
                raise RuntimeError("the scheduler is shut down")
            if self.store_error is not None:
                raise StoreWriteError(self.store_error)
            for spec in specs:
                run_id = new_run_id()
                now = time.time()
                self.store.begin_run(run_id, spec)
                self._board.add([RunState(run_id, spec, queued_at=now)])
                self._pending.append(Pending(run_id, spec))
                self._inbox.put(_Notify(RunQueued(run_id, spec=spec.to_dict(), t=now)))
                run_ids.append(run_id)
            if run_ids:
                self._settled = False
        return run_ids

    def requeue(self, runs: Iterable[tuple[str, RunSpec, float]]) -> None:
        """Queue runs the store already holds as queued, under their own ids (the service
        adopting the queue a dead scheduler left): ``(run_id, spec, queued_at)``."""
        with self._lock:
            for run_id, spec, queued_at in runs:
                if run_id in self._board.runs:
                    continue
                self._board.add([RunState(run_id, spec, queued_at=queued_at)])
                self._pending.append(Pending(run_id, spec))
                self._inbox.put(_Notify(RunQueued(run_id, spec=spec.to_dict(), t=queued_at)))
                self._settled = False

    def cancel(self, run_id: str) -> bool:
        """Cancel a queued run (recorded as cancelled) or stop a running one (SIGTERM, then
        SIGKILL after the grace period). Returns False if the run is unknown or has ended."""
        with self._lock:
            for n, run in enumerate(self._pending):
                if run.run_id == run_id:
                    del self._pending[n]
                    event = RunFailed(
                        run_id, reason="cancelled", message="cancelled before it started"
                    )
                    self._record(event)
                    self._board.apply(event)
                    self._inbox.put(_Notify(event))
                    return True
            worker = self._workers.get(run_id)
            if worker is None or worker.outcome is not None:
                return False
            self._stop(worker, "cancelled")
            self._inbox.put(None)  # wake the loop
            return True

    def cancel_all(self) -> None:
        """Cancel every queued run first (so none starts on freed GPUs), then the running ones."""
        with self._lock:
            queued = [run.run_id for run in self._pending]
            running = list(self._workers)
        for run_id in queued + running:
            self.cancel(run_id)

    def start(self) -> None:
        """Start the background thread; stop everything at interpreter exit and on signals."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="slmtui-scheduler", daemon=True)
            self._thread.start()
        atexit.register(self.shutdown)
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._previous_handlers[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted run has ended and its events were delivered.

        Returns False on timeout. Needs ``start`` (or returns at once when nothing was submitted).
        """
        with self._settled_cv:
            return self._settled_cv.wait_for(lambda: self._settled, timeout)

    def shutdown(self) -> None:
        """Cancel everything, stop the workers and their descendants, and end the thread.

        Idempotent; registered with atexit by ``start``. Returns when no worker process is left
        (at most about ``kill_grace_s`` plus a second for workers that ignore SIGTERM).
        """
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            self._stopping = True
        self.cancel_all()
        thread = self._thread
        if thread is None:
            self._loop()  # never started: record the cancellations here
        elif thread is not threading.current_thread():
            self._inbox.put(None)
            thread.join(timeout=self.kill_grace_s + 10.0)
        atexit.unregister(self.shutdown)
        self._restore_signal_handlers()

    # -- views --------------------------------------------------------------------------------

    def snapshot(self) -> list[RunState]:
        """Every submitted run's state (copies), in submission order."""
        with self._lock:
            return self._board.snapshot()

    def state(self, run_id: str) -> RunState | None:
        with self._lock:
            run = self._board.runs.get(run_id)
            return run.copy() if run is not None else None

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            items: list[_Line | _Eof | _Notify | None] = []
            try:
                items.append(self._inbox.get(timeout=self.tick_s))
                while len(items) < 1000:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            out = _Outbox()
            with self._lock:
                for item in items:
                    self._handle(item, out)
                self._watch_workers(out)
                if not self._stopping:
                    self._launch_ready(out)
                idle = not self._pending and not self._workers and self._inbox.empty()
                done = idle and self._stopping
            self._deliver(out.events)
            if idle:
                with self._settled_cv:
                    if not self._pending and not self._workers and self._inbox.empty():
                        self._settled = True
                        self._settled_cv.notify_all()
            if done:
                return

    def _handle(self, item: _Line | _Eof | _Notify | None, out: _Outbox) -> None:
        if item is None:
            return
        if isinstance(item, _Notify):
            out.events.append(item.event)
            return
        worker = self._workers.get(self._alias.get(item.run_id, item.run_id))
        if worker is None:
            return
        if isinstance(item, _Eof):
            worker.eof = True
            return
        worker.last_line_mono = time.monotonic()
        if item.malformed is not None:
            if worker.outcome is None and worker.malformed is None:
                worker.malformed = item.malformed
                self._stop(worker, "malformed")
            return
        event = item.event
        if event is None or event.run_id != worker.run_id or isinstance(event, RunQueued):
            self._board.stray_line(worker.run_id)
            return
        if worker.outcome is not None:
            return  # nothing changes a run after its result or error
        if isinstance(event, RunFailed) and worker.stop_reason is not None:
            return  # the scheduler's own reason (timeout, cancelled) is recorded at exit
        if isinstance(event, RunFailed) and event.reason == "oom":
            event = self._with_reach(event)
        if isinstance(event, RunFinished | RunFailed):
            worker.outcome = event
            worker.outcome_mono = time.monotonic()
        self._commit(event, out)

    def _commit(self, event: Event, out: _Outbox) -> None:
        """Store first, then the board, then (outside the lock) tell the listener."""
        self._record(event)
        self._board.apply(event)
        out.events.append(event)

    def _with_reach(self, event: RunFailed) -> RunFailed:
        """An OOM after some samples says how far the run got (those samples are stored)."""
        run = self._board.runs.get(event.run_id)
        if run is None or not run.done:
            return event
        reach = f"reached {run.done} of {run.total or '?'} samples, which are stored"
        return replace(event, message=f"{event.message} ({reach})")

    def _record(self, event: Event) -> None:
        """Store an event; a store that refuses writes stops the runs (workers never orphaned)."""
        try:
            self.store.record(event)
        except StoreWriteError as exc:
            if self.store_error is None:
                self.store_error = str(exc)
                print(f"slmtui: {exc}; stopping the runs", file=sys.stderr)
                pending, self._pending = self._pending, []
                for run in pending:
                    failed = RunFailed(
                        run.run_id, reason="cancelled", message=f"not started: {exc}"
                    )
                    self._board.apply(failed)
                    self._inbox.put(_Notify(failed))
                for worker in self._workers.values():
                    if worker.outcome is None:
                        self._stop(worker, "store")
        except Exception as exc:  # a bad event must not orphan the workers
            print(f"slmtui: could not store {event.type} of {event.run_id}: {exc}", file=sys.stderr)

    def _watch_workers(self, out: _Outbox) -> None:
        now = time.monotonic()
        for worker in list(self._workers.values()):
            process = worker.process
            if now - worker.tracked_mono >= _DESCENDANTS_EVERY_S:
                process.track_descendants()
                worker.tracked_mono = now
            exited = process.poll() is not None
            if worker.serving and worker.outcome is not None and not worker.handed_off:
                worker.handed_off = True
                if not exited and self._hand_off(worker):
                    continue
            if exited and worker.exited_mono is None:
                worker.exited_mono = now
            if exited and worker.eof:
                self._finish(worker, out)
                continue
            if exited and now - worker.exited_mono >= _PIPE_GRACE_S:
                process.kill()  # descendants still hold the pipe open: they are orphans now
            overdue = now - worker.launched_mono > worker.spec.timeout_s
            if overdue and worker.stop_reason is None and worker.outcome is None:
                self._stop(worker, "timeout")
            quiet_s = now - max(worker.last_line_mono, worker.launched_mono)
            silent = quiet_s > self.hang_grace_s and not exited and worker.outcome is None
            if silent and worker.stop_reason is None:
                self._stop(worker, "hung")
            if (
                worker.outcome is not None
                and worker.kill_at_mono is None
                and not exited
                and now - worker.outcome_mono > self.exit_grace_s
            ):
                self._stop(worker, None)  # lingering after its result; the result stands
            if worker.kill_at_mono is not None and now >= worker.kill_at_mono:
                process.kill()
                worker.kill_at_mono = now + self.kill_grace_s  # again if something respawned

    def _hand_off(self, worker: _Worker) -> bool:
        """Give a serving worker whose run ended the next queued run of its group; True if it
        took one (the ended run leaves ``_workers``), else its input is closed and it exits."""
        following = None
        if groups.goes_on(worker.outcome) and not self._stopping:
            following = groups.next_in_group(self._pending, worker.spec)
        if following is None or not worker.process.send_run(
            groups.run_line(following.run_id, following.spec)
        ):
            worker.process.end_input()
            return False
        self._pending = [p for p in self._pending if p.run_id != following.run_id]
        del self._workers[worker.run_id]
        self._workers[following.run_id] = _Worker(
            following.run_id,
            following.spec,
            worker.gpu_ids,
            worker.process,
            launched_mono=time.monotonic(),
            eof=worker.eof,
            tracked_mono=worker.tracked_mono,
            launch_id=worker.launch_id,
            serving=True,
        )
        self._alias[worker.launch_id] = following.run_id
        if self._cpu_run == worker.run_id:
            self._cpu_run = following.run_id
        self._board.launched(
            following.run_id,
            gpu_ids=worker.gpu_ids,
            log_path=str(worker.process.log_path),
            t=time.time(),
        )
        return True

    def _stop(self, worker: _Worker, reason: str | None) -> None:
        """SIGTERM the worker's tree; SIGKILL follows after the grace period."""
        if worker.kill_at_mono is not None:
            return
        worker.stop_reason = reason
        worker.kill_at_mono = time.monotonic() + self.kill_grace_s
        worker.process.terminate()
        if reason is not None:
            self._board.stopping(worker.run_id, reason)

    def _finish(self, worker: _Worker, out: _Outbox) -> None:
        """The worker is gone: kill leftovers, record how the run ended, free its GPUs."""
        process = worker.process
        process.kill()
        process.close()
        returncode = process.poll()
        del self._workers[worker.run_id]
        self._alias.pop(worker.launch_id, None)
        if self._cpu_run == worker.run_id:
            self._cpu_run = None
        if worker.outcome is None:
            tail = log_tail(process.log_path)
            spec = worker.spec
            if worker.stop_reason == "timeout":
                event = RunFailed(
                    worker.run_id,
                    reason="timeout",
                    message=f"no result within the run's timeout of {spec.timeout_s:g} s; stopped",
                    log_tail=tail,
                )
            elif worker.stop_reason == "hung":
                event = RunFailed(
                    worker.run_id,
                    reason="hung",
                    message=f"no event from the worker for {self.hang_grace_s:g} s "
                    "(its heartbeat comes every 0.5 s); stopped",
                    log_tail=tail,
                )
            elif worker.stop_reason == "malformed":
                event = RunFailed(
                    worker.run_id,
                    reason="crashed",
                    message=f"the worker sent a malformed event ({worker.malformed}); stopped",
                    log_tail=tail,
                )
            elif worker.stop_reason == "store":
                event = RunFailed(
                    worker.run_id,
                    reason="cancelled",
                    message=f"stopped: {self.store_error}",
                    log_tail=tail,
                )
            elif worker.stop_reason == "cancelled":
                event = RunFailed(
                    worker.run_id,
                    reason="cancelled",
                    message="cancelled while running",
                    log_tail=tail,
                )
            else:
                code = describe_exit(returncode if returncode is not None else -9)
                event = RunFailed(
                    worker.run_id,
                    reason="crashed",
                    message=f"worker {code} without a result",
                    log_tail=tail,
                )
            self._commit(event, out)

    def _launch_ready(self, out: _Outbox) -> None:
        if self.store_error is not None:
            return
        busy = {i for w in self._workers.values() for i in w.gpu_ids}
        free = [g for g in self.gpus if g.index not in busy]
        for assignment in pack(self._pending, free, cpu_free=self._cpu_run is None):
            self._pending = [p for p in self._pending if p.run_id != assignment.run_id]
            self._launch(assignment.run_id, assignment.spec, assignment.gpu_ids, out)

    def _launch(self, run_id: str, spec: RunSpec, gpu_ids: tuple[int, ...], out: _Outbox) -> None:
        log_path = self.logs_dir / f"{run_id}.log"
        try:
            argv, env = self.command_factory(spec, run_id, gpu_ids)
            if self.group_runs and groups.group_key(spec) is not None:
                argv = groups.serving_argv(argv, gpu_ids)
            serving = groups.serves(argv)
            process = WorkerProcess(argv, env, log_path, serve=serving)
        except Exception as exc:
            event = RunFailed(
                run_id, reason="crashed", message=f"could not start the worker: {exc}"
            )
            self._commit(event, out)
            return
        self._workers[run_id] = _Worker(
            run_id,
            spec,
            gpu_ids,
            process,
            launched_mono=time.monotonic(),
            launch_id=run_id,
            serving=serving,
        )
        if not gpu_ids:
            self._cpu_run = run_id
        self._board.launched(run_id, gpu_ids=gpu_ids, log_path=str(log_path), t=time.time())
        reader = threading.Thread(
            target=self._read, args=(run_id, process), name=f"slmtui-read-{run_id}", daemon=True
        )
        reader.start()

    def _read(self, run_id: str, process: WorkerProcess) -> None:
        """Reader thread: parse each stdout line; copy non-event lines to the run's log."""
        try:
            with open(process.log_path, "ab") as log:
                for raw in process.stdout:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if not line:
                        continue
                    malformed: str | None = None
                    try:
                        event: Event | None = parse_event(line)
                    except ProtocolError as exc:
                        event = None
                        if is_malformed_event(line):
                            malformed = str(exc)
                            log.write(f"[malformed event] {exc}\n".encode())
                        log.write(b"[stdout] " + raw.rstrip(b"\n") + b"\n")
                        log.flush()
                    self._inbox.put(_Line(run_id, event, malformed=malformed))
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the process is gone
        finally:
            self._inbox.put(_Eof(run_id))

    # -- helpers ------------------------------------------------------------------------------

    def _deliver(self, events: list[Event]) -> None:
        if self.listener is None:
            return
        for event in events:
            try:
                self.listener(event)
            except Exception as exc:  # a broken view must not stop the runs
                print(f"slmtui: listener failed on {event.type}: {exc!r}", file=sys.stderr)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        self.shutdown()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, previous)
        self._previous_handlers.clear()


def new_run_id() -> str:
    """Sortable and unique: '20260522-143005-3f9c1a2b'."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
