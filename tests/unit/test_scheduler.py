"""The scheduler with fake workers: scripted JSON-lines processes standing in for slmtui.worker.

The fake's behaviour is picked by the model name of the spec it is given.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from slmtui.errors import UserError
from slmtui.protocol import Event, RunProgress
from slmtui.scheduler import Gpu, Scheduler, worker_command
from slmtui.spec import ModelRef, RunSpec
from slmtui.store import Store

FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from slmtui.protocol import (RunFailed, RunFinished, RunProgress, RunStarted,
                                 SampleScored)

    spec = json.loads(sys.argv[sys.argv.index("--spec-json") + 1])
    run_id = sys.argv[sys.argv.index("--run-id") + 1]
    how = spec["model"]["name"].split("-")[0]

    def emit(event):
        print(event.to_json(), flush=True)

    def sample(i):
        emit(SampleScored(run_id, index=i, item_id=f"i{i}", prompt="2+2?", output="4",
                          gold="4", score=1.0))

    def sleep_child(new_session):
        return subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
                                start_new_session=new_session, stdout=subprocess.DEVNULL)

    env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE")}
    emit(RunStarted(run_id, spec=spec, pid=os.getpid(), hardware=env))
    emit(RunProgress(run_id, phase="loading"))
    if how == "ok":
        time.sleep(float(spec["options"]["seed"]) / 1000)
        sample(0)
        sample(1)
        emit(RunFinished(run_id, metrics={"accuracy": 1.0, "throughput": 50.0,
                                          "throughput_unit": "tokens/s", "latency_ms": 20.0,
                                          "peak_mem_mb": 300.0}))
    elif how == "crash":
        sample(0)
        print("Traceback (most recent call last):\\nRuntimeError: boom", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)
    elif how == "oom":
        emit(RunFailed(run_id, reason="oom", message="CUDA out of memory", log_tail="tb"))
        sys.exit(1)
    elif how == "silent":
        sys.exit(0)
    elif how == "garbage":
        print("hello from a library", flush=True)
        print('{"no": "type"}', flush=True)
        print('{"v": 99, "type": "progress", "run_id": "x"}', flush=True)
        emit(RunProgress("someone-else", phase="measuring"))
        emit(RunFinished(run_id, metrics={"accuracy": 0.5}))
    elif how == "linger":
        emit(RunFinished(run_id, metrics={"accuracy": 0.25}))
        time.sleep(60)
    elif how == "slow":
        for i in range(int(spec["options"]["seed"]) or 10):
            emit(RunProgress(run_id, phase="measuring", done=i, total=10))
            sample(i)
            time.sleep(0.1)
        emit(RunFinished(run_id, metrics={"accuracy": 1.0, "throughput": 50.0,
                                          "throughput_unit": "tokens/s", "latency_ms": 20.0,
                                          "peak_mem_mb": 300.0}))
    elif how == "mute":
        time.sleep(60)  # a wedged worker: no heartbeat, no result
    elif how == "malformed":
        print(json.dumps({"v": 1, "type": "result", "run_id": run_id, "metrics": "oops"}),
              flush=True)
        time.sleep(60)
    elif how == "segv":
        sample(0)
        import ctypes
        ctypes.string_at(0)  # a segfault, as a broken CUDA kernel or extension would
    elif how == "big":
        for i in range(10_000):
            emit(SampleScored(run_id, index=i, item_id=f"i{i}", prompt="x" * 100_000,
                              output="4", gold="4", score=1.0))
            time.sleep(0.05)
    elif how == "oomlate":
        sample(0)
        sample(1)
        emit(RunProgress(run_id, phase="measuring", done=2, total=10))
        emit(RunFailed(run_id, reason="oom", message="CUDA out of memory at batch 1"))
        sys.exit(1)
    elif how in ("hang", "family"):
        if how == "family":
            # Like torchrun: one child in our group, one rank in a session of its own; all of
            # them, the worker too, ignore SIGTERM so only SIGKILL ends them.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            kids = [sleep_child(False), sleep_child(True)]
            emit(RunProgress(run_id, phase="warmup", telemetry={"pids": [k.pid for k in kids]}))
        while True:
            emit(RunProgress(run_id, phase="measuring", done=1, total=10))
            time.sleep(0.05)
    """
)


@pytest.fixture
def fake_worker(tmp_path: Path) -> Path:
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return path


def spec(how: str, gpus: int = 0, timeout_s: float = 60.0, delay_ms: int = 0) -> RunSpec:
    from slmtui.spec import TaskOptions

    return RunSpec(
        model=ModelRef(name=how, source=f"/m/{how}", kind="local"),
        task="gsm8k",
        options=TaskOptions(seed=delay_ms),
        gpus=gpus,
        timeout_s=timeout_s,
    )


class Harness:
    def __init__(
        self, tmp_path: Path, fake_worker: Path, gpus: int | Sequence[int] = 0, **kw
    ) -> None:
        self.store = Store(tmp_path / "r.sqlite")
        self.events: list[Event] = []
        self.lock = threading.Lock()

        def factory(s: RunSpec, run_id: str, gpu_ids):
            argv, env = worker_command(s, run_id, gpu_ids)
            return [sys.executable, str(fake_worker), *argv[argv.index("--spec-json") :]], env

        indices = range(gpus) if isinstance(gpus, int) else gpus
        inventory = [Gpu(i, "fake", 1000.0, 1000.0) for i in indices]
        self.scheduler = Scheduler(
            self.store,
            inventory=inventory,
            listener=self.listen,
            command_factory=factory,
            logs_dir=tmp_path / "logs",
            tick_s=0.02,
            handle_signals=False,
            **{"kill_grace_s": 0.3, **kw},
        )
        self.scheduler.start()

    def listen(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def types(self, run_id: str) -> list[str]:
        with self.lock:
            return [e.type for e in self.events if e.run_id == run_id]

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out waiting"
            time.sleep(0.01)

    def close(self) -> None:
        self.scheduler.shutdown()
        self.store.close()


@pytest.fixture
def harness(tmp_path: Path, fake_worker: Path):
    made: list[Harness] = []

    def make(**kw) -> Harness:
        h = Harness(tmp_path, fake_worker, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_command_runs_the_worker_with_gpus_pinned_and_multicast_off() -> None:
    s = spec("ok", gpus=1)
    argv, env = worker_command(s, "run-1", (3,), base_env={"PATH": "/bin"})
    assert argv == [
        sys.executable,
        "-m",
        "slmtui.worker",
        "--spec-json",
        s.to_json(),
        "--run-id",
        "run-1",
    ]
    assert env == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "3",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "PYTHONUNBUFFERED": "1",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }


def test_multi_gpu_runs_start_under_torchrun() -> None:
    s = spec("ok", gpus=2)
    argv, env = worker_command(s, "run-2", (4, 6), base_env={})
    assert argv[:7] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
    ]
    assert argv[7:] == ["slmtui.worker", "--spec-json", s.to_json(), "--run-id", "run-2"]
    assert env["CUDA_VISIBLE_DEVICES"] == "4,6"
    _, cpu_env = worker_command(spec("ok"), "run-3", (), base_env={})
    assert cpu_env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU run sees no GPU


def test_a_normal_run_is_committed_then_reported(harness) -> None:
    h = harness()
    (run_id,) = h.scheduler.submit([spec("ok")])
    assert h.scheduler.wait(timeout=10)
    assert h.types(run_id) == ["queued", "started", "progress", "sample", "sample", "result"]
    row = h.store.run(run_id)
    assert (row.status, row.accuracy, row.throughput, row.memory_mb) == (
        "finished",
        1.0,
        50.0,
        300.0,
    )
    assert len(h.store.samples(run_id)) == 2
    (state,) = h.scheduler.snapshot()
    assert (state.status, state.samples_done, state.metrics["accuracy"]) == ("finished", 2, 1.0)
    assert state.progress.phase == "loading"


def test_gpu_runs_get_their_own_devices_and_the_nccl_settings(harness) -> None:
    h = harness(gpus=[2, 5])  # as if slmtui was started with CUDA_VISIBLE_DEVICES=2,5
    ids = h.scheduler.submit([spec("ok", gpus=1, delay_ms=300) for _ in range(3)])
    h.wait_for(lambda: sum(s.status == "running" for s in h.scheduler.snapshot()) == 2)
    time.sleep(0.05)
    assert [s.status for s in h.scheduler.snapshot()].count("running") == 2  # never 3 on 2 GPUs
    assert h.scheduler.wait(timeout=10)
    hardware = [h.store.run(i).hardware for i in ids]
    assert sorted(hw["CUDA_VISIBLE_DEVICES"] for hw in hardware[:2]) == ["2", "5"]
    assert hardware[2]["CUDA_VISIBLE_DEVICES"] in ("2", "5")
    assert {hw["NCCL_NVLS_ENABLE"] for hw in hardware} == {"0"}


def test_a_run_larger_than_the_box_is_refused_and_nothing_is_queued(harness) -> None:
    h = harness(gpus=2)
    with pytest.raises(UserError, match="4 GPUs asked, this box has 2"):
        h.scheduler.submit([spec("ok", gpus=1), spec("ok", gpus=4)])
    assert h.store.runs() == [] and h.scheduler.snapshot() == []


def test_killed_worker_costs_only_its_run(harness) -> None:
    h = harness(gpus=2)
    crash, ok = h.scheduler.submit([spec("crash", gpus=1), spec("ok", gpus=1)])
    assert h.scheduler.wait(timeout=10)
    failed = h.store.run(crash)
    assert (failed.status, failed.error.reason) == ("failed", "crashed")
    assert failed.error.message == "worker exited with code 3 without a result"
    assert "RuntimeError: boom" in failed.error.log_tail
    assert len(h.store.samples(crash)) == 1  # what it scored before dying is kept
    assert h.store.run(ok).status == "finished"


def test_worker_error_events_are_stored_as_sent(harness) -> None:
    h = harness()
    oom, silent = h.scheduler.submit([spec("oom"), spec("silent")])
    assert h.scheduler.wait(timeout=10)
    row = h.store.run(oom)
    assert (row.status, row.error.reason, row.error.message) == (
        "failed",
        "oom",
        "CUDA out of memory",
    )
    assert h.types(oom).count("error") == 1
    quiet = h.store.run(silent)
    assert (quiet.error.reason, quiet.error.message) == (
        "crashed",
        "worker exited with code 0 without a result",
    )


def test_a_run_past_its_timeout_is_stopped(harness) -> None:
    h = harness()
    (run_id,) = h.scheduler.submit([spec("hang", timeout_s=0.5)])
    t0 = time.monotonic()
    assert h.scheduler.wait(timeout=10)
    assert time.monotonic() - t0 < 5
    row = h.store.run(run_id)
    assert (row.status, row.error.reason) == ("failed", "timeout")
    assert "0.5 s" in row.error.message
    assert gone(_worker_pid(h, run_id))
    assert h.scheduler.snapshot()[0].error.reason == "timeout"


def test_cancel_queued_and_running_runs(harness) -> None:
    h = harness()  # a CPU box: the second run waits for the first
    running, queued = h.scheduler.submit([spec("hang"), spec("ok")])
    h.wait_for(lambda: "progress" in h.types(running))
    assert h.scheduler.state(queued).status == "queued"
    assert h.scheduler.cancel(queued)
    assert h.scheduler.cancel(running)
    assert h.scheduler.wait(timeout=10)
    assert h.store.run(queued).status == "cancelled"
    assert h.store.run(queued).error.message == "cancelled before it started"
    row = h.store.run(running)
    assert (row.status, row.error.message) == ("cancelled", "cancelled while running")
    assert not h.scheduler.cancel(running)  # already ended
    assert "started" not in h.types(queued)


def test_lines_that_are_not_events_are_skipped_and_counted(harness) -> None:
    h = harness()
    (run_id,) = h.scheduler.submit([spec("garbage")])
    assert h.scheduler.wait(timeout=10)
    assert h.store.run(run_id).status == "finished"
    state = h.scheduler.state(run_id)
    assert state.non_event_lines == 4
    log = Path(state.log_path).read_text()
    assert "[stdout] hello from a library" in log


def test_a_worker_lingering_after_its_result_is_stopped_and_the_result_stands(harness) -> None:
    h = harness(exit_grace_s=0.2)
    (run_id,) = h.scheduler.submit([spec("linger")])
    assert h.scheduler.wait(timeout=10)
    row = h.store.run(run_id)
    assert (row.status, row.accuracy) == ("finished", 0.25)


def _family_pids(h: Harness, run_id: str) -> list[int]:
    """The worker's pid and its two children's (the fake reports them in a progress event)."""

    def with_pids() -> list[RunProgress]:
        with h.lock:
            return [
                e
                for e in h.events
                if isinstance(e, RunProgress) and e.run_id == run_id and e.telemetry.get("pids")
            ]

    h.wait_for(with_pids)
    return [_worker_pid(h, run_id), *with_pids()[0].telemetry["pids"]]


def _worker_pid(h: Harness, run_id: str) -> int:
    started = next(e for e in h.events if e.type == "started" and e.run_id == run_id)
    return started.pid


def test_cancel_kills_the_whole_process_tree(harness) -> None:
    h = harness()
    (run_id,) = h.scheduler.submit([spec("family")])
    pids = _family_pids(h, run_id)
    assert len(pids) == 3 and not any(gone(p) for p in pids)
    h.scheduler.cancel(run_id)
    assert h.scheduler.wait(timeout=10)
    h.wait_for(lambda: all(gone(p) for p in pids), timeout=3)
    assert h.store.run(run_id).status == "cancelled"


def test_shutdown_stops_every_run_and_leaves_no_process(harness) -> None:
    h = harness(gpus=2)
    ids = h.scheduler.submit([spec("family", gpus=1), spec("hang", gpus=1), spec("ok", gpus=1)])
    pids = _family_pids(h, ids[0])
    h.wait_for(lambda: "progress" in h.types(ids[1]))
    h.scheduler.shutdown()
    assert [h.store.run(i).status for i in ids] == ["cancelled", "cancelled", "cancelled"]
    assert all(gone(p) for p in [*pids, _worker_pid(h, ids[1])])


APP = textwrap.dedent(
    """
    import sys, time
    from slmtui.scheduler import Scheduler, worker_command
    from slmtui.spec import ModelRef, RunSpec
    from slmtui.store import Store

    fake, db, logs = sys.argv[1:4]

    def factory(s, run_id, gpu_ids):
        argv, env = worker_command(s, run_id, gpu_ids)
        return [sys.executable, fake, *argv[argv.index("--spec-json"):]], env

    def listen(event):
        if event.type == "progress" and event.telemetry.get("pids"):
            print(" ".join(map(str, event.telemetry["pids"])), flush=True)
        if event.type == "started":
            print(event.pid, flush=True)

    scheduler = Scheduler(Store(db), inventory=[], listener=listen, command_factory=factory,
                          logs_dir=logs, kill_grace_s=0.3, tick_s=0.02)
    scheduler.start()
    scheduler.submit([RunSpec(model=ModelRef("family", "/m", "local"), task="gsm8k")])
    scheduler.wait()
    """
)


@pytest.mark.parametrize("app_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_the_app_stopped_by_a_signal_leaves_no_orphans(tmp_path, fake_worker, app_signal) -> None:
    db = tmp_path / "r.sqlite"
    app = subprocess.Popen(
        [sys.executable, "-c", APP, str(fake_worker), str(db), str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(app.stdout.readline())]
        pids += [int(p) for p in app.stdout.readline().split()]
        assert len(pids) == 3 and not any(gone(p) for p in pids)
        app.send_signal(app_signal)
        app.wait(timeout=10)
    finally:
        if app.poll() is None:
            app.kill()
    deadline = time.monotonic() + 3
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(gone(p) for p in pids)
    store = Store(db)
    assert [r.status for r in store.runs()] == ["cancelled"]
    store.close()


# -- the fault table (docs/reliability.md): one test per row the scheduler handles ------------


def test_a_segfaulting_worker_costs_only_its_run(harness) -> None:
    h = harness()
    segv, ok = h.scheduler.submit([spec("segv"), spec("ok")])
    assert h.scheduler.wait(timeout=30)
    row = h.store.run(segv)
    assert (row.status, row.error.reason) == ("failed", "crashed")
    assert row.error.message == "worker was killed by SIGSEGV without a result"
    assert len(h.store.samples(segv)) == 1
    assert h.store.run(ok).status == "finished"


def test_a_silent_worker_is_stopped_as_hung_after_the_grace(harness) -> None:
    h = harness(hang_grace_s=1.0)
    hung, ok = h.scheduler.submit([spec("mute"), spec("ok")])
    t0 = time.monotonic()
    assert h.scheduler.wait(timeout=30)
    took = time.monotonic() - t0
    row = h.store.run(hung)
    assert (row.status, row.error.reason) == ("failed", "hung")
    assert "no event from the worker for 1 s" in row.error.message
    assert 1.0 <= took < 20
    assert gone(_worker_pid(h, hung))
    assert h.store.run(ok).status == "finished"  # the sweep goes on


def test_a_malformed_event_fails_its_run_and_the_scheduler_goes_on(harness) -> None:
    h = harness()
    bad, ok = h.scheduler.submit([spec("malformed"), spec("ok")])
    assert h.scheduler.wait(timeout=30)
    row = h.store.run(bad)
    assert (row.status, row.error.reason) == ("failed", "crashed")
    assert "malformed event" in row.error.message
    assert "metrics must be an object" in row.error.message
    log = Path(h.scheduler.state(bad).log_path).read_text()
    assert "[malformed event]" in log and '"metrics": "oops"' in log
    assert h.store.run(ok).status == "finished"


def test_an_oom_mid_run_keeps_its_samples_and_says_how_far_it_got(harness) -> None:
    h = harness()
    (run_id,) = h.scheduler.submit([spec("oomlate")])
    assert h.scheduler.wait(timeout=30)
    row = h.store.run(run_id)
    assert (row.status, row.error.reason) == ("failed", "oom")
    assert row.error.message == (
        "CUDA out of memory at batch 1 (reached 2 of 10 samples, which are stored)"
    )
    assert len(h.store.samples(run_id)) == 2


def test_a_full_disk_stops_the_runs_with_one_line_and_loses_nothing_stored(
    harness, tmp_path: Path
) -> None:
    h = harness()
    (first,) = h.scheduler.submit([spec("ok")])
    assert h.scheduler.wait(timeout=30)
    big, queued = h.scheduler.submit([spec("big"), spec("ok")])
    h.wait_for(lambda: "sample" in h.types(big), timeout=30)
    # The disk fills up: SQLite may not grow the file by one more page.
    pages = h.store._conn.execute("PRAGMA page_count").fetchone()[0]
    h.store._conn.execute(f"PRAGMA max_page_count = {pages}")
    h.wait_for(lambda: h.scheduler.store_error is not None, timeout=30)
    assert h.scheduler.wait(timeout=30)
    error = h.scheduler.store_error
    assert "\n" not in error and "cannot write" in error and "full" in error
    assert h.scheduler.state(big).status == "cancelled"
    assert h.scheduler.state(queued).status == "cancelled"
    assert "started" not in h.types(queued)
    with pytest.raises(UserError, match="cannot write"):
        h.scheduler.submit([spec("ok")])
    with Store(tmp_path / "r.sqlite") as again:  # what was stored before is all there
        assert again.run(first).status == "finished"
        assert len(again.samples(first)) == 2
        assert again.samples(big)  # and the samples that made it before the disk filled up
