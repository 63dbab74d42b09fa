"""The scheduler service: runs that outlive the console, re-attaching, and its fault-table rows.

Real service processes (``slmtui serve``) with the scripted fake workers of
test_scheduler.py (picked by model name), so no torch is loaded. Every service a test starts is
shut down (then killed) in the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_scheduler import FAKE_WORKER, spec

from slmtui.protocol import Event, RunProgress
from slmtui.scheduler import Scheduler
from slmtui.scheduler.address import peer_allowed, peer_uid, private_dir, service_address
from slmtui.scheduler.client import ServiceClient, connect
from slmtui.scheduler.service import Service
from slmtui.store import Store

REPO = Path(__file__).resolve().parents[2]


def wait_until(what: str, predicate: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Box:
    """A store, a private runtime folder, and the services started on it (all cleaned up)."""

    def __init__(self, tmp_path: Path, runtime: Path) -> None:
        self.tmp_path = tmp_path
        self.runtime = runtime
        self.db = tmp_path / "results.sqlite"
        self.fake = tmp_path / "fake_worker.py"
        self.fake.write_text(FAKE_WORKER)
        self.clients: list[ServiceClient] = []

    @property
    def service_args(self) -> list[str]:
        return [
            "--worker-prefix",
            json.dumps([sys.executable, str(self.fake)]),
            "--idle-exit-s",
            "60",
            "--hang-grace-s",
            "2",
        ]

    def client(self, listener: Callable[[Event], None] | None = None) -> ServiceClient:
        client = ServiceClient(self.db, listener=listener, service_args=self.service_args)
        self.clients.append(client)
        return client

    def service_pid(self) -> int | None:
        try:
            text = service_address(self.db).lock_path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def runs(self) -> dict[str, dict[str, Any]]:
        """run_id -> row, read the way another process would (no Store, no recovery)."""
        conn = sqlite3.connect(self.db, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute("SELECT * FROM runs ORDER BY queued_at").fetchall()
        except sqlite3.OperationalError:
            return {}
        finally:
            conn.close()
        return {r["run_id"]: dict(r) for r in rows}

    def close(self) -> None:
        for client in self.clients:
            client.shutdown()
        pid = self.service_pid()
        if pid is not None and alive(pid):
            with ServiceClient(self.db, autostart=False) as last:
                last.shutdown_service()
            try:
                psutil.Process(pid).wait(timeout=15)
            except psutil.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A short private runtime folder (a Unix socket path is limited to 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="slmrt-", dir="/tmp"))
    monkeypatch.setenv("SLMTUI_RUNTIME_DIR", str(folder))
    monkeypatch.setenv("SLMTUI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def box(tmp_path: Path, runtime: Path) -> Iterator[Box]:
    made = Box(tmp_path, runtime)
    yield made
    made.close()


class Events:
    """A listener that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def types(self, run_id: str) -> list[str]:
        with self.lock:
            return [e.type for e in self.events if e.run_id == run_id]


# -- who may talk to it -------------------------------------------------------------------------


def test_the_socket_and_lock_are_owner_only_and_other_uids_are_refused(box: Box) -> None:
    client = box.client()
    client.submit([spec("ok")])
    address = service_address(box.db)
    assert stat.S_IMODE(box.runtime.stat().st_mode) == 0o700
    assert stat.S_IMODE(address.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(address.lock_path.stat().st_mode) == 0o600
    sock = connect(address)
    assert sock is not None
    try:
        assert peer_uid(sock) == os.getuid()  # what the service checks, from the other end
    finally:
        sock.close()
    assert peer_allowed(os.getuid())
    assert not peer_allowed(os.getuid() + 1)
    assert not peer_allowed(0, owner_uid=1000)  # not even root gets into another user's


def test_a_runtime_folder_with_loose_permissions_is_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "rt"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_peer_of_another_uid_gets_no_event_and_no_command(
    tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slmtui.scheduler.service as service_module

    monkeypatch.setattr(service_module, "peer_uid", lambda sock: os.getuid() + 1)
    store = Store(tmp_path / "r.sqlite")
    scheduler = Scheduler(store, inventory=[], handle_signals=False)
    path = runtime / "t.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    service = Service(scheduler, listener)
    thread = threading.Thread(target=service.accept_loop, daemon=True)
    thread.start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.settimeout(10)
        reply = json.loads(sock.makefile("rb").readline())
        assert reply["ok"] is False and "not your service" in reply["error"]
        with pytest.raises(OSError):  # the connection is closed: no command gets in
            for _ in range(50):
                sock.sendall(b'{"cmd": "cancel_all", "id": 1}\n')
                time.sleep(0.02)
        assert service._clients == []
    finally:
        service.stop.set()
        thread.join(timeout=5)
        listener.close()
        scheduler.shutdown()
        store.close()


# -- detach and re-attach -----------------------------------------------------------------------


def test_runs_outlive_a_detached_client_and_a_late_client_sees_them(box: Box) -> None:
    first = box.client()
    ids = first.submit([spec("slow", delay_ms=15), spec("slow", delay_ms=15)])
    wait_until("the first run to start", lambda: box.runs()[ids[0]]["status"] == "running")
    first.shutdown()  # "leave running"

    late = Events()
    second = box.client(late)
    second.start()
    assert second.attached
    # At once: every run the service knows, replayed before anything streams.
    assert late.types(ids[0])[:2] == ["queued", "started"]
    assert late.types(ids[1])[0] == "queued"
    wait_until("both runs finished", lambda: {"result"} <= set(late.types(ids[1])))
    rows = box.runs()
    assert [rows[i]["status"] for i in ids] == ["finished", "finished"]
    with Store(box.db) as store:
        assert [len(store.samples(i)) for i in ids] == [15, 15]
    states = {s.run_id: s for s in second.snapshot()}
    assert [states[i].status for i in ids] == ["finished", "finished"]


CONSOLE = textwrap.dedent(
    """
    import json, sys, time
    from slmtui.scheduler.client import ServiceClient
    from slmtui.spec import RunSpec
    db, args, specs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    client = ServiceClient(db, service_args=args, listener=lambda e: None)
    print(" ".join(client.submit([RunSpec.from_dict(s) for s in specs])), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("how", [signal.SIGHUP, signal.SIGKILL])
def test_a_console_hung_up_or_killed_mid_run_leaves_the_runs_running(box: Box, how: int) -> None:
    specs = [spec("slow", delay_ms=20).to_dict(), spec("ok").to_dict()]
    console = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CONSOLE,
            str(box.db),
            json.dumps(box.service_args),
            json.dumps(specs),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's would be
    )
    try:
        ids = console.stdout.readline().split()
        assert len(ids) == 2
        wait_until("the first run mid-way", lambda: box.runs()[ids[0]]["status"] == "running")
        os.killpg(console.pid, how)
        console.wait(timeout=60)  # generous: a loaded 2-core box once took over 10 s
    finally:
        if console.poll() is None:
            console.kill()
            console.wait()
    wait_until(
        "both runs finished", lambda: all(box.runs()[i]["status"] == "finished" for i in ids)
    )
    assert alive(box.service_pid())


def test_two_consoles_see_the_same_runs_and_never_launch_twice(box: Box) -> None:
    seen_a, seen_b = Events(), Events()
    a, b = box.client(seen_a), box.client(seen_b)
    a.start()
    (run_id,) = a.submit([spec("slow", delay_ms=10)])
    b.start()
    assert b.submit([spec("slow", delay_ms=10)]) == []  # already queued or running there
    wait_until(
        "the run to finish in both",
        lambda: "result" in seen_a.types(run_id) and "result" in seen_b.types(run_id),
    )
    assert len(box.runs()) == 1
    assert seen_a.types(run_id).count("result") == seen_b.types(run_id).count("result") == 1


def test_one_service_per_store(box: Box) -> None:
    starts = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "slmtui",
                "serve",
                "--db",
                str(box.db),
                *box.service_args,
            ],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    wait_until("a service to listen", lambda: box.service_pid())
    loser = wait_until(
        "one of the two to give way",
        lambda: next((p for p in starts if p.poll() is not None), None),
    )
    assert loser.returncode == 0
    assert "already serves" in loser.stderr.read()
    winner = next(p for p in starts if p is not loser)
    assert winner.poll() is None and box.service_pid() == winner.pid
    box.close()
    print("WINNER", winner.stderr.read())


def test_a_re_attached_client_can_cancel_one_run_and_queue_more(box: Box) -> None:
    first = box.client()
    hang, queued = first.submit([spec("hang"), spec("ok")])
    first.shutdown()
    seen = Events()
    again = box.client(seen)
    again.start()
    wait_until("the hanging run to start", lambda: box.runs()[hang]["status"] == "running")
    assert again.cancel(hang)
    (more,) = again.submit([spec("ok", delay_ms=1)])
    wait_until("the queue to drain", lambda: (r := box.runs())[more]["status"] == "finished" and r)
    rows = box.runs()
    assert (rows[hang]["status"], rows[hang]["error_message"]) == (
        "cancelled",
        "cancelled while running",
    )
    assert rows[queued]["status"] == "finished"
    assert "result" in seen.types(more)
    assert not again.cancel(hang)  # already ended


def test_slmtui_stop_cancels_everything(box: Box) -> None:
    client = box.client()
    ids = client.submit([spec("hang"), spec("ok")])
    wait_until("the first run to start", lambda: box.runs()[ids[0]]["status"] == "running")
    assert client.stop_runs(timeout_s=30)
    rows = box.runs()
    assert [rows[i]["status"] for i in ids] == ["cancelled", "cancelled"]


# -- the service killed; the machine rebooted ---------------------------------------------------


def test_a_killed_service_leaves_no_worker_and_the_next_one_recovers(box: Box) -> None:
    client = box.client()
    done, running, queued = client.submit([spec("ok"), spec("hang"), spec("slow", delay_ms=5)])
    worker = wait_until("the hanging run's worker", lambda: box.runs()[running]["worker_pid"])
    assert box.runs()[done]["status"] == "finished"
    pid = box.service_pid()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_until("the worker to die with its scheduler", lambda: not alive(worker), 5)
    orphan_s = time.monotonic() - t0
    assert orphan_s < 5
    wait_until("the service to be gone", lambda: not alive(pid))

    again = box.client()
    again.start()
    assert not again.attached  # nobody serves the store now
    again.submit([])  # the next start: a new service, which recovers the store
    assert box.service_pid() != pid
    rows = wait_until(
        "the adopted run to finish", lambda: (r := box.runs())[queued]["status"] == "finished" and r
    )
    assert (rows[running]["status"], rows[running]["error_reason"]) == ("failed", "crashed")
    assert rows[done]["status"] == "finished"  # finished runs are kept
    assert len(rows) == 3  # the queued run ran under its own id, not a copy
    from slmtui.plan import plan_runs

    with Store(box.db) as store:  # the crashed run is offered again, the finished one not
        plan = plan_runs([spec("ok"), spec("hang")], store)
        assert [s.model.name for s in plan.to_run] == ["hang"]


def test_after_a_reboot_running_runs_are_crashed_and_queued_runs_still_queued(box: Box) -> None:
    with Store(box.db) as store:
        store.begin_run("was-running", spec("hang"))
        store.begin_run("was-queued", spec("slow", delay_ms=3))
        store.record(
            __import__("slmtui.protocol", fromlist=["RunStarted"]).RunStarted(
                "was-running", spec=spec("hang").to_dict(), pid=1
            )
        )
    conn = sqlite3.connect(box.db)  # as if written before the reboot: the owner is long gone
    conn.execute("UPDATE runs SET app_pid = 999999999, app_started_at = 1.0")
    conn.commit()
    conn.close()
    with Store(box.db, keep_queued=True) as console_view:  # what a console opening it does
        assert console_view.recovered == ["was-running"]
        assert console_view.run("was-queued").status == "queued"
    box.client().submit([])
    rows = wait_until(
        "the queued run to run",
        lambda: (r := box.runs())["was-queued"]["status"] == "finished" and r,
    )
    assert (rows["was-running"]["status"], rows["was-running"]["error_reason"]) == (
        "failed",
        "crashed",
    )


def test_a_hung_worker_under_the_service_is_stopped_and_the_sweep_goes_on(box: Box) -> None:
    client = box.client()
    mute, ok = client.submit([spec("mute"), spec("ok")])
    rows = wait_until(
        "both runs ended", lambda: (r := box.runs())[ok]["status"] == "finished" and r, 60
    )
    assert (rows[mute]["status"], rows[mute]["error_reason"]) == ("failed", "hung")
    assert "no event from the worker for 2 s" in rows[mute]["error_message"]


# -- the command line ---------------------------------------------------------------------------


def test_run_detach_then_status_then_stop(
    box: Box, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slmtui.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["status", "--db", str(box.db)]) == 0
    assert "No scheduler service runs for store" in capsys.readouterr().out
    box.client().submit([])  # the service is up, with the fake workers
    models = tmp_path / "models"
    for name in ("slow-a", "hang-b"):
        (models / name).mkdir(parents=True)
    profile = tmp_path / "sweep.toml"
    profile.write_text(
        "name = 'sweep'\n[settings]\ngpus = [0]\nlimit = 2\n"
        + "".join(
            f"[[models]]\nname = '{n}'\nsource = '{models / n}'\n" for n in ("slow-a", "hang-b")
        )
        + "[tasks.arc_easy]\n",
        encoding="utf-8",
    )
    assert main(["run", str(profile), "--detach", "--db", str(box.db)]) == 0
    out = capsys.readouterr().out
    assert "2 runs handed to the scheduler service" in out and "slmtui status" in out
    wait_until(
        "the slow run to finish",
        lambda: any(r["status"] == "finished" for r in box.runs().values()),
    )
    assert main(["status", "--db", str(box.db)]) == 0
    out = capsys.readouterr().out
    assert f"scheduler service pid {box.service_pid()}" in out
    assert "slow-a · arc_easy" in out and "finished" in out and "1 run queued or running" in out
    assert main(["run", str(profile), "--detach", "--db", str(box.db)]) == 0
    assert "0 runs handed" in capsys.readouterr().out  # one stored, one still running there
    assert main(["stop", "--db", str(box.db)]) == 0
    assert "Cancelled 1 run;" in capsys.readouterr().out
    assert sorted(r["status"] for r in box.runs().values()) == ["cancelled", "finished"]


def test_a_store_that_refuses_writes_reaches_every_client_as_one_line(
    tmp_path: Path, runtime: Path
) -> None:
    store = Store(tmp_path / "r.sqlite")
    scheduler = Scheduler(store, inventory=[], handle_signals=False)
    address = service_address(tmp_path / "r.sqlite")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(address.socket_path))
    listener.listen(4)
    service = Service(scheduler, listener)
    thread = threading.Thread(target=service.accept_loop, daemon=True)
    thread.start()
    notices: list[str] = []
    client = ServiceClient(tmp_path / "r.sqlite", autostart=False)
    client.on_notice = notices.append
    try:
        client.start()
        assert client.attached
        scheduler.store_error = f"store {store.path}: cannot write (database or disk is full)"
        service.broadcast(RunProgress("r1", phase="loading"))  # the next event carries it
        wait_until("the notice", lambda: notices)
        assert notices == [scheduler.store_error]
        late: list[str] = []
        with ServiceClient(tmp_path / "r.sqlite", autostart=False) as other:
            other.on_notice = late.append
            other.start()  # a client attaching later is told at once
            wait_until("the late notice", lambda: late)
        assert late == [scheduler.store_error]
    finally:
        client.shutdown()
        service.stop.set()
        thread.join(timeout=5)
        listener.close()
        scheduler.shutdown()
        store.close()


MIDDLE = textwrap.dedent(
    """
    import subprocess, sys, time
    rank = subprocess.Popen(
        [sys.executable, "-c", "import time; from slmtui.worker.__main__ import exit_with_parent;"
         " exit_with_parent(0.05); print('watching', flush=True); time.sleep(120)"],
        start_new_session=True,  # as torchrun starts its ranks
        stdout=subprocess.PIPE, text=True,
    )
    rank.stdout.readline()
    print(rank.pid, flush=True)
    time.sleep(120)
    """
)


def test_a_worker_whose_parent_dies_ends_too() -> None:
    """A torchrun rank sends no event (only rank 0 does) and lives in a session of its own:
    when torchrun is killed with the scheduler, its ranks go on their own."""
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        rank = int(middle.stdout.readline())
        assert alive(rank)
        middle.kill()  # torchrun SIGKILLed (its parent, the scheduler, died)
        middle.wait(timeout=10)
        t0 = time.monotonic()
        wait_until("the rank to end", lambda: not alive(rank), 10)
        assert time.monotonic() - t0 < 5
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()


def test_a_service_that_hangs_up_during_the_attach_counts_as_none(box: Box) -> None:
    """A service on its way out (idle exit, killed) can still take a connection on its socket
    and close it unanswered: opening a console then finds no service, without an error."""
    address = service_address(box.db)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(address.socket_path))
    listener.listen(8)
    taken: list[int] = []

    def hang_up() -> None:
        listener.settimeout(5)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                taken.append(1)
                conn.close()  # no reply to the attach

    threading.Thread(target=hang_up, daemon=True).start()
    client = box.client()
    try:
        client.start()
        assert not client.attached
        assert len(taken) == 2  # looked twice
    finally:
        listener.close()
        address.socket_path.unlink(missing_ok=True)
