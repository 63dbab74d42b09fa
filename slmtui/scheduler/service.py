"""The scheduler service: one background process per store that owns its runs, so they outlive
the console (a closed terminal, a dropped SSH link, ``q`` → "leave running").

``slmtui serve --db DB`` (``slmtui.reports.service``; ``slmtui.scheduler.client.ensure_service``
starts it in a session of its own, so the terminal's SIGHUP never reaches it) holds the store's
``store_lock`` for its whole life — an exclusive ``flock``, which the kernel drops with a dead
owner, so a killed service never blocks the next one — opens the store (runs a dead scheduler
left running are marked crashed; its queued runs are adopted and run), and calls
``run_service``: clients are served on the store's Unix socket (``slmtui.scheduler.address``;
owner-only). Every event is committed to the store by the scheduler before it is sent.

It exits when asked (``shutdown``, SIGTERM, SIGINT: the runs are cancelled first), or when it
has had no run and no client for ``idle_exit_s``. SIGHUP is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from slmtui.errors import UserError
from slmtui.protocol import Event
from slmtui.scheduler import wire
from slmtui.scheduler.address import Address, peer_allowed, peer_uid
from slmtui.scheduler.scheduler import Scheduler
from slmtui.spec import RunSpec

IDLE_EXIT_S = 300.0
"""A service with no run and no client for this long exits (the next launch starts another)."""
_CLIENT_QUEUE_MAX = 20_000
"""Lines waiting for one client; a client that stops reading for that long is dropped."""


class Client:
    """One attached connection: a reader thread (commands) and a writer thread (lines out)."""

    def __init__(self, service: Service, sock: socket.socket) -> None:
        self.service = service
        self.sock = sock
        self.following = False
        self.outbox: queue.Queue[bytes | None] = queue.Queue(maxsize=_CLIENT_QUEUE_MAX)
        self.closed = False

    def start(self) -> None:
        self.writer = threading.Thread(
            target=self._write_loop, name="slmtui-client-out", daemon=True
        )
        self.writer.start()
        threading.Thread(target=self._read_loop, name="slmtui-client-in", daemon=True).start()

    def send(self, data: bytes) -> None:
        try:
            self.outbox.put_nowait(data)
        except queue.Full:
            self.close(drain=False)  # it stopped reading: it can re-attach and read the store

    def close(self, *, drain: bool = True) -> None:
        """Stop following; with ``drain`` the lines already queued (a last reply) go out first."""
        if self.closed:
            return
        self.closed = True
        self.service.forget(self)
        try:
            self.outbox.put_nowait(None)
        except queue.Full:
            drain = False
        if not drain:
            self._hang_up()

    def _hang_up(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _write_loop(self) -> None:
        try:
            while (data := self.outbox.get()) is not None:
                self.sock.sendall(data)
        except OSError:
            pass
        finally:
            self.closed = True
            self.service.forget(self)
            self._hang_up()
            with contextlib.suppress(OSError):
                self.sock.close()

    def _read_loop(self) -> None:
        try:
            with self.sock.makefile("rb") as reader:
                for raw in reader:
                    try:
                        request = json.loads(raw)
                        if not isinstance(request, dict):
                            raise ValueError("not an object")
                    except ValueError:
                        self.send(wire.line("reply", id=None, ok=False, error="not JSON"))
                        continue
                    self.service.handle(self, request)
        except OSError:
            pass
        finally:
            self.close()


class Service:
    """Serves one scheduler on a listening Unix socket (see the module docstring)."""

    def __init__(
        self, scheduler: Scheduler, listener: socket.socket, *, idle_exit_s: float = IDLE_EXIT_S
    ) -> None:
        self.scheduler = scheduler
        self.listener = listener
        self.idle_exit_s = idle_exit_s
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[Client] = []
        self._last_busy = time.monotonic()
        self._store_error_sent = False
        scheduler.listener = self.broadcast

    # -- the event stream ---------------------------------------------------------------------

    def broadcast(self, event: Event) -> None:
        """The scheduler's listener: every event, already committed, to every following client."""
        data = wire.event_line(event)
        with self._lock:
            clients = [c for c in self._clients if c.following]
            error = self.scheduler.store_error
            if error is not None and not self._store_error_sent:
                self._store_error_sent = True
                data = wire.line("notice", message=error) + data
        for client in clients:
            client.send(data)

    def forget(self, client: Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
            self._last_busy = time.monotonic()

    # -- commands -----------------------------------------------------------------------------

    def handle(self, client: Client, request: dict[str, Any]) -> None:
        cmd, request_id = request.get("cmd"), request.get("id")
        try:
            fields = self._answer(client, cmd, request)
        except UserError as exc:
            client.send(wire.line("reply", id=request_id, ok=False, error=str(exc)))
            return
        except Exception as exc:  # a bad request must not take the service down
            message = f"{cmd}: {type(exc).__name__}: {exc}".splitlines()[0]
            client.send(wire.line("reply", id=request_id, ok=False, error=message))
            return
        if fields is not None:
            client.send(wire.line("reply", id=request_id, ok=True, **fields))

    def _answer(self, client: Client, cmd: Any, request: dict[str, Any]) -> dict[str, Any] | None:
        scheduler = self.scheduler
        if cmd == "attach":
            # The snapshot and the subscription are one step under the broadcast lock: every
            # event after it reaches the client, every event before it is in the snapshot.
            with self._lock:
                runs = [wire.state_to_dict(s) for s in scheduler.snapshot()]
                client.send(
                    wire.line(
                        "reply",
                        id=request.get("id"),
                        ok=True,
                        attached=True,
                        pid=os.getpid(),
                        runs=runs,
                    )
                )
                client.following = bool(request.get("follow", True))
                if scheduler.store_error is not None:
                    client.send(wire.line("notice", message=scheduler.store_error))
            return None
        if cmd == "status":
            runs = [wire.state_to_dict(s) for s in scheduler.snapshot()]
            return {"pid": os.getpid(), "runs": runs, "store_error": scheduler.store_error}
        if cmd == "submit":
            specs = [RunSpec.from_dict(d) for d in request.get("specs", [])]
            with self._lock:  # two consoles launching the same runs at once: one launch
                in_flight = {
                    s.spec.run_key
                    for s in scheduler.snapshot()
                    if s.status in ("queued", "running")
                }
                fresh = [s for s in specs if s.run_key not in in_flight]
                run_ids = scheduler.submit(fresh) if fresh else []
                self._last_busy = time.monotonic()
            return {"run_ids": run_ids, "skipped": len(specs) - len(fresh)}
        if cmd == "cancel":
            return {"cancelled": scheduler.cancel(str(request.get("run_id")))}
        if cmd == "cancel_all":
            active = [s.run_id for s in scheduler.snapshot() if not s.ended]
            scheduler.cancel_all()
            return {"run_ids": active}
        if cmd == "shutdown":
            self.stop.set()
            return {"pid": os.getpid()}
        raise UserError(f"unknown command {cmd!r}")

    # -- accepting and idling -----------------------------------------------------------------

    def accept_loop(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stop.is_set():
                    return
                continue
            sock.settimeout(None)
            try:
                allowed = peer_allowed(peer_uid(sock))
            except OSError:
                allowed = False
            if not allowed:
                with contextlib.suppress(OSError):
                    sock.sendall(wire.line("reply", id=None, ok=False, error="not your service"))
                    sock.close()
                continue
            client = Client(self, sock)
            with self._lock:
                self._clients.append(client)
            client.start()

    def idle(self) -> bool:
        """No run queued or running, no client attached, for ``idle_exit_s``."""
        now = time.monotonic()
        with self._lock:
            if self._clients or any(not s.ended for s in self.scheduler.snapshot()):
                self._last_busy = now
            return now - self._last_busy >= self.idle_exit_s

    def close_clients(self, timeout_s: float = 2.0) -> None:
        """Hang up on every client once what is queued for it has gone out."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.close()
        deadline = time.monotonic() + timeout_s
        for client in clients:
            writer = getattr(client, "writer", None)
            if writer is not None:
                writer.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def store_lock(address: Address) -> Iterator[bool]:
    """Hold the store's service lock for the block: yields False at once when another live
    service holds it. An exclusive ``flock``: the kernel drops it with its holder's death."""
    fd = os.open(address.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # the lock goes with it


def run_service(
    scheduler: Scheduler, address: Address, *, idle_exit_s: float = IDLE_EXIT_S
) -> None:
    """Serve ``scheduler`` on the store's socket until asked to stop (``shutdown``, SIGTERM,
    SIGINT) or idle; then cancel what is left and hang up. Call it holding ``store_lock``."""
    with contextlib.suppress(FileNotFoundError):
        address.socket_path.unlink()  # a dead service's: the caller holds the lock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(address.socket_path))
    finally:
        os.umask(old_umask)
    os.chmod(address.socket_path, 0o600)
    listener.listen(16)
    service = Service(scheduler, listener, idle_exit_s=idle_exit_s)

    def on_signal(signum: int, frame: Any) -> None:
        service.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    scheduler.start()
    accept = threading.Thread(target=service.accept_loop, name="slmtui-accept", daemon=True)
    accept.start()
    say(f"scheduler service {os.getpid()} serves {address.db} on {address.socket_path}")
    try:
        while not service.stop.wait(0.5):
            if service.idle():
                break
    finally:
        with contextlib.suppress(FileNotFoundError, OSError):
            if address.socket_path.stat().st_ino == os.fstat(listener.fileno()).st_ino:
                address.socket_path.unlink()
        service.stop.set()
        scheduler.shutdown()  # cancels what is left; waits for the workers to go
        service.close_clients()
        listener.close()


def say(message: str) -> None:
    """One line to the service's log; a log that is gone (a closed pipe) never stops it."""
    with contextlib.suppress(OSError, ValueError):
        print(f"slmtui: {message}", file=sys.stderr, flush=True)
