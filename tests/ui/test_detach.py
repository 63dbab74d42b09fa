"""Runs outlive the console: a real console in a pseudo-terminal launches a sweep through the
store's scheduler service, its process group is killed, and a new console re-attaches (Pilot)
and sees the sweep finish with every run stored. Also the quit prompt's two answers.

The service runs scripted fake workers (no torch): each run scores ``STEPS`` items, one every
0.1 s, with a progress event each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import struct
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
from ui_fixtures import ScriptedScheduler, make_app, spec

from slmtui.profile import load_profile
from slmtui.scheduler.address import service_address
from slmtui.scheduler.client import ServiceClient
from slmtui.store import Store
from slmtui.ui.app import SlmApp

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
FAKE_WORKER = textwrap.dedent(
    f"""
    import json, os, sys, time
    from slmtui.protocol import RunFinished, RunProgress, RunStarted, SampleScored
    spec = json.loads(sys.argv[sys.argv.index("--spec-json") + 1])
    run_id = sys.argv[sys.argv.index("--run-id") + 1]
    def emit(event):
        print(event.to_json(), flush=True)
    emit(RunStarted(run_id, spec=spec, pid=os.getpid()))
    for i in range({STEPS}):
        emit(RunProgress(run_id, phase="measuring", done=i, total={STEPS}, elapsed_s=i / 10,
                         tokens_per_s=100.0, ms_per_token=10.0, mem_mb=300.0,
                         telemetry={{"util_pct": 50.0, "power_w": 100.0}}))
        emit(SampleScored(run_id, index=i, item_id=f"i{{i}}", prompt="2+2?", output="4",
                          gold="4", score=1.0))
        time.sleep(0.1)
    emit(RunFinished(run_id, metrics={{"accuracy": 1.0, "throughput": 100.0,
                                       "throughput_unit": "tokens/s", "latency_ms": 10.0,
                                       "peak_mem_mb": 300.0, "n_samples": {STEPS}}}))
    """
)


def wait_until(what: str, predicate: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stored(db: Path) -> dict[str, dict[str, Any]]:
    """run_id -> row with its sample count, read as another process would."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM samples s WHERE s.run_id = r.run_id) AS n_stored"
            " FROM runs r ORDER BY queued_at"
        ).fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()
    return {r["run_id"]: dict(r) for r in rows}


@pytest.fixture
def service_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A private runtime folder and a store whose service runs the fake workers; the service
    is shut down (then killed) afterwards."""
    runtime = Path(tempfile.mkdtemp(prefix="slmrt-", dir="/tmp"))
    monkeypatch.setenv("SLMTUI_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("SLMTUI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    db = tmp_path / "results.sqlite"
    args = ["--worker-prefix", json.dumps([sys.executable, str(fake)]), "--idle-exit-s", "60"]
    with ServiceClient(db, service_args=args) as starter:
        starter.submit([])  # the service is up before any console, with the fake workers
    yield {"db": db, "runtime": runtime, "args": args}
    lock = service_address(db).lock_path
    pid = int(lock.read_text().strip() or 0) if lock.exists() else 0
    with ServiceClient(db, autostart=False) as last:
        last.shutdown_service()
    if pid:
        try:
            psutil.Process(pid).wait(timeout=15)
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(runtime, ignore_errors=True)


def write_profile(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    for name in ("alpha", "beta"):
        (models / name).mkdir(parents=True)
    path = tmp_path / "sweep.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            name = "sweep"
            [settings]
            gpus = [0]
            limit = {STEPS}
            [[models]]
            name = "alpha"
            source = "{models / "alpha"}"
            [[models]]
            name = "beta"
            source = "{models / "beta"}"
            [tasks.arc_easy]
            [tasks.imdb]
            """
        ),
        encoding="utf-8",
    )
    return path


class Terminal:
    """`slmtui` in a pseudo-terminal of 100×30, in a session (and process group) of its own."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import fcntl
        import termios

        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        os.close(slave)
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.output.extend(data)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGHUP])
async def test_a_sweep_outlives_its_console_and_a_new_console_sees_it_finish(
    service_env: dict[str, Any], tmp_path: Path, how: int
) -> None:
    db: Path = service_env["db"]
    profile = write_profile(tmp_path)
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="100", LINES="30")
    console = Terminal([sys.executable, "-m", "slmtui", "--db", str(db), str(profile)], env)
    try:
        wait_until("the console to paint", lambda: b"Pick" in console.output, 60)
        time.sleep(1.0)  # start-up's first focus lands
        for _ in range(6):  # a key typed while a loaded box still starts the app can be lost
            console.type("R")
            with contextlib.suppress(AssertionError):
                wait_until("the sweep to be queued", lambda: stored(db), 10)
                break
        runs = wait_until("the sweep to be queued", lambda: len(stored(db)) == 4 and stored(db))
        wait_until(
            "the first run mid-way",
            lambda: any(r["status"] == "running" and r["n_stored"] for r in stored(db).values()),
        )
        os.killpg(console.proc.pid, how)  # the terminal goes: SSH dropped, window closed
        # generous: on a loaded 2-core box a hung-up console took over 15 s to finish exiting
        assert console.proc.wait(timeout=60) != 0
    finally:
        console.close()
    assert any(r["status"] != "finished" for r in stored(db).values())  # the sweep was mid-way

    store = Store(db, keep_queued=True)
    client = ServiceClient(db, service_args=service_env["args"])
    app = SlmApp(store=store, scheduler=client, profile=load_profile(profile), export_dir=tmp_path)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.2)
            assert client.attached  # a new console re-attached to the same service
            assert set(runs) <= set(app.board.runs)  # at once: every run of the sweep
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if all(app.board.runs[r].status == "finished" for r in runs):
                    break
                await pilot.pause(0.1)
            assert [app.board.runs[r].status for r in runs] == ["finished"] * 4
    finally:
        client.shutdown()
        store.close()
    rows = stored(db)
    assert [rows[r]["status"] for r in runs] == ["finished"] * 4
    assert [rows[r]["n_stored"] for r in runs] == [STEPS] * 4  # every run stored, all samples


async def test_quit_can_leave_the_runs_running_or_stop_them(store: Store, tmp_path: Path) -> None:
    class ServiceDouble(ScriptedScheduler):
        outlives_console = True

        def __init__(self, store: Store) -> None:
            super().__init__(store)
            self.stopped = False

        def stop_runs(self) -> bool:
            self.stopped = True
            return True

    for answer, stops in (("leave", False), ("stop", True)):
        scheduler = ServiceDouble(store)
        app = make_app(store, scheduler, tmp_path=tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.1)
            app.submit([spec("alpha-135m")])
            await pilot.pause(0.2)
            await pilot.press("q")
            text = "\n".join(s.text for s in app.screen._compositor.render_strips())
            assert "Leave running" in text and "Stop runs" in text
            assert "1 run is queued or running" in text
            app.screen.dismiss(answer)
            # the answer reaches the app after the prompt is gone: wait for the quit to start
            for _ in range(100):
                if app.stopping:
                    break
                await pilot.pause(0.05)
            await app.workers.wait_for_complete()
        assert scheduler.stopped is stops
        assert scheduler.shut_down  # detached either way
        assert app.return_code == 0
