"""A client of the store's scheduler service: what the console, ``run --detach``, ``status``
and ``stop`` use instead of a scheduler of their own.

``ServiceClient`` has the scheduler's surface (``listener``, ``submit``, ``cancel``,
``cancel_all``, ``start``, ``shutdown``, ``snapshot``), so the console drives either. Its
``shutdown`` only detaches: the runs go on in the service. ``stop_runs`` cancels them.
On ``start`` it attaches: the service answers with every run it knows (replayed to the listener
as events), then streams each event as it is committed. A run that ended before the client
attached is in the store, which the console reads first; so a late client misses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from slmtui.board import RunState
from slmtui.errors import UserError
from slmtui.protocol import ProtocolError, parse_event
from slmtui.scheduler import wire
from slmtui.scheduler.address import Address, service_address
from slmtui.scheduler.scheduler import Listener
from slmtui.spec import RunSpec

START_TIMEOUT_S = 60.0
"""How long a newly started service may take to listen (a loaded box, a first NVML init)."""
REPLY_TIMEOUT_S = 60.0

Notice = Callable[[str], None]


class ServiceUnavailable(UserError):
    """No service answers for this store (and none could be started)."""


ATTACH_ATTEMPTS = 2
ATTACH_RETRY_S = 0.2
"""``start``: connections tried when the service goes away during the attach, and the pause."""


def connect(address: Address) -> socket.socket | None:
    """A connected socket to the store's service, or None when none is listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(address.socket_path))
    except OSError:
        sock.close()
        return None
    return sock


def start_service(address: Address, extra_args: Sequence[str] = ()) -> None:
    """Start the service in a session of its own (the terminal's hang-up never reaches it);
    a second one started by a racing client finds the lock taken and exits at once."""
    with open(address.log_path, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "slmtui", "serve", "--db", str(address.db), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def ensure_service(
    address: Address, extra_args: Sequence[str] = (), timeout_s: float = START_TIMEOUT_S
) -> socket.socket:
    """A connection to the store's service, starting the service if none listens."""
    sock = connect(address)
    if sock is not None:
        return sock
    start_service(address, extra_args)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        sock = connect(address)
        if sock is not None:
            return sock
    raise ServiceUnavailable(
        f"store {address.db}: the scheduler service did not start within {timeout_s:g} s; "
        f"see {address.log_path}"
    )


class ServiceClient:
    """The store's scheduler service, seen from a console or a command (see the module doc)."""

    outlives_console = True
    """The console asks "leave running" or "stop runs" on quit (the runs are the service's)."""

    def __init__(
        self,
        db: str | os.PathLike[str],
        *,
        listener: Listener | None = None,
        autostart: bool = True,
        service_args: Sequence[str] = (),
    ) -> None:
        """``autostart``: start the service on the first submit when none runs.
        ``service_args``: extra arguments for a service this client starts (tests)."""
        self.address = service_address(db)
        self.listener = listener
        self.on_notice: Notice | None = None
        """Called (from the reader thread) with one-line notices: store errors, a lost service."""
        self.autostart = autostart
        self.service_args = list(service_args)
        self.service_pid: int | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._reply_cv = threading.Condition(self._lock)
        self._closing = False

    # -- connecting ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._sock is not None

    def start(self) -> None:
        """Attach to the service if one runs for this store (else wait for the first submit).

        A service that closes the connection before answering the attach was on its way out
        when we connected (idle exit, killed: its socket still took the connection): that counts
        as none, after one more look."""
        for attempt in range(ATTACH_ATTEMPTS):
            if self._sock is not None:
                return
            sock = connect(self.address)
            if sock is None:
                return
            try:
                self._attach(sock)
                return
            except ServiceUnavailable:
                with self._lock:
                    if self._sock is sock:
                        self._sock = None
                sock.close()
                if attempt + 1 < ATTACH_ATTEMPTS:
                    time.sleep(ATTACH_RETRY_S)

    def _ensure(self) -> None:
        if self._sock is not None:
            return
        if self.autostart:
            sock = ensure_service(self.address, self.service_args)
        else:
            sock = connect(self.address)
            if sock is None:
                raise ServiceUnavailable(f"no scheduler service runs for store {self.address.db}")
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            self._closing = False
        threading.Thread(
            target=self._read_loop, args=(sock,), name="slmtui-attach", daemon=True
        ).start()
        reply = self._request("attach", follow=True)
        self.service_pid = reply.get("pid")

    def shutdown(self) -> None:
        """Detach; the runs go on in the service."""
        with self._lock:
            sock, self._sock = self._sock, None
            self._closing = True
            self._reply_cv.notify_all()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = shutdown

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- commands -----------------------------------------------------------------------------

    def submit(self, specs: Iterable[RunSpec]) -> list[str]:
        """Hand runs to the service (started if needed); the new run ids. Runs already queued
        or running there (another console launched them) are not queued twice."""
        specs = list(specs)
        self._ensure()
        reply = self._request("submit", specs=[s.to_dict() for s in specs])
        return list(reply["run_ids"])

    def cancel(self, run_id: str) -> bool:
        if self._sock is None:
            return False
        return bool(self._request("cancel", run_id=run_id).get("cancelled"))

    def cancel_all(self) -> list[str]:
        """Cancel every queued and running run; their ids (empty when no service runs)."""
        if self._sock is None:
            self.start()
            if self._sock is None:
                return []
        return list(self._request("cancel_all").get("run_ids", []))

    def snapshot(self) -> list[RunState]:
        """Every run the service knows (since it started), as it is now."""
        self._ensure_attached()
        reply = self._request("status")
        return [wire.state_from_dict(d) for d in reply["runs"]]

    def stop_runs(self, timeout_s: float = 60.0) -> bool:
        """Cancel every run and wait until each has ended (its processes gone)."""
        active = set(self.cancel_all())
        deadline = time.monotonic() + timeout_s
        while active and time.monotonic() < deadline:
            states = {s.run_id: s for s in self.snapshot()}
            active = {r for r in active if r in states and not states[r].ended}
            if active:
                time.sleep(0.1)
        return not active

    def shutdown_service(self) -> None:
        """Ask the service to cancel its runs and exit (tests; ``slmtui stop`` cancels only)."""
        if self._sock is None:
            self.start()
        if self._sock is not None:
            with contextlib.suppress(ServiceUnavailable):
                self._request("shutdown")

    def _ensure_attached(self) -> None:
        if self._sock is None:
            self.start()
        if self._sock is None:
            raise ServiceUnavailable(f"no scheduler service runs for store {self.address.db}")

    def _request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            sock = self._sock
            self._next_id += 1
            request_id = self._next_id
        if sock is None:
            raise ServiceUnavailable(f"not attached to the scheduler service of {self.address.db}")
        try:
            with self._send_lock:
                sock.sendall(wire.command(cmd, request_id, **fields))
        except OSError as exc:
            raise ServiceUnavailable(f"the scheduler service went away ({exc})") from exc
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        with self._reply_cv:
            while request_id not in self._replies:
                if self._sock is not sock:
                    raise ServiceUnavailable("the scheduler service went away")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceUnavailable(f"the scheduler service did not answer {cmd}")
                self._reply_cv.wait(left)
            reply = self._replies.pop(request_id)
        if not reply.get("ok"):
            raise UserError(str(reply.get("error") or f"{cmd} refused"))
        return reply

    # -- the stream ---------------------------------------------------------------------------

    def _read_loop(self, sock: socket.socket) -> None:
        try:
            with sock.makefile("rb") as reader:
                for raw in reader:
                    self._take(raw)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                lost = self._sock is sock and not self._closing
                if self._sock is sock:
                    self._sock = None
                self._reply_cv.notify_all()
            if lost:
                self._notice("the scheduler service went away; runs it had are marked on restart")

    def _take(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        if kind == "reply":
            if data.get("attached"):
                self._replay(data)
            with self._reply_cv:
                self._replies[data.get("id") or 0] = data
                self._reply_cv.notify_all()
            return
        if kind == "notice":
            self._notice(str(data.get("message", "")))
            return
        try:
            event = parse_event(raw.decode("utf-8", errors="replace"))
        except ProtocolError:
            return
        self._deliver([event])

    def _replay(self, data: dict[str, Any]) -> None:
        """The attach reply: bring the listener up to date before any streamed event."""
        events = []
        for d in data["runs"]:
            state = wire.state_from_dict(d)
            events.extend(wire.replay(state))
        self._deliver(events)

    def _deliver(self, events: list[Any]) -> None:
        listener = self.listener
        if listener is None:
            return
        for event in events:
            try:
                listener(event)
            except Exception as exc:  # a broken view must not stop the stream
                print(f"slmtui: listener failed on {event.type}: {exc!r}", file=sys.stderr)

    def _notice(self, message: str) -> None:
        if self.on_notice is not None and message:
            with contextlib.suppress(Exception):
                self.on_notice(message)


def service_running(db: str | os.PathLike[str]) -> bool:
    sock = connect(service_address(Path(db)))
    if sock is None:
        return False
    sock.close()
    return True
