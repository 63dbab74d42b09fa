"""The results store: round trip, resume keys, latest result per key, crash recovery, durability."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from slmtui.errors import UserError
from slmtui.protocol import (
    RunFailed,
    RunFinished,
    RunProgress,
    RunQueued,
    RunStarted,
    SampleScored,
)
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.store import Store
from slmtui.store.schema import SCHEMA_VERSION


def make_spec(model: str = "tiny", task: str = "gsm8k", gpus: int = 0, limit: int = 4) -> RunSpec:
    return RunSpec(
        model=ModelRef(name=model, source=f"/models/{model}", kind="local"),
        task=task,
        options=TaskOptions(limit=limit),
        gpus=gpus,
    )


METRICS = {
    "accuracy": 0.5,
    "throughput": 120.0,
    "throughput_unit": "tokens/s",
    "latency_ms": 8.25,
    "peak_mem_mb": 874.0,
    "energy_j": None,
    "data_source": "sample",
    "task_metrics": {"exact_match": 0.5},
}


def finish(store: Store, run_id: str, spec: RunSpec, metrics: dict | None = None, t=None) -> None:
    store.begin_run(run_id, spec)
    store.record(RunStarted(run_id, spec=spec.to_dict(), pid=123, hardware={"gpu_name": "cpu"}))
    kw = {} if t is None else {"t": t}
    store.record(RunFinished(run_id, metrics=metrics or METRICS, **kw))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "results.sqlite")
    yield s
    s.close()


def test_new_store_is_versioned_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "r.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    Store(path).close()  # reopening an up-to-date store migrates nothing


def test_store_from_a_newer_slmtui_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UserError, match="upgrade slmtui"):
        Store(path)


def test_a_file_that_is_not_a_store_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, not sqlite at all " * 100)
    with pytest.raises(UserError, match="not a slmtui results store"):
        Store(path)


def test_run_round_trip_with_samples(store: Store) -> None:
    spec = make_spec()
    store.begin_run("r1", spec)
    row = store.run("r1")
    assert row.status == "queued" and row.spec == spec
    stored = store.export_runs(["r1"])["r1"]  # the flat columns SQL filters on
    assert stored["run_key"] == spec.run_key
    assert [stored[k] for k in ("model", "task", "gpus", "engine")] == ["tiny", "gsm8k", 0, "fast"]

    store.record(RunStarted("r1", spec=spec.to_dict(), pid=42, hardware={"cpu": "x86"}, t=100.0))
    store.record(RunProgress("r1", phase="measuring", done=1, total=2))
    for i, score in enumerate((1.0, 0.0)):
        store.record(
            SampleScored(
                "r1",
                index=i,
                item_id=f"item-{i}",
                prompt=f"Q{i}",
                output=f"A{i}",
                gold="4",
                score=score,
                extra={"pred": str(i)},
            )
        )
    store.record(RunFinished("r1", metrics=METRICS, t=110.0))

    row = store.run("r1")
    assert row.status == "finished"
    assert (row.started_at, row.ended_at) == (100.0, 110.0)
    assert row.hardware == {"cpu": "x86"}
    assert (row.accuracy, row.throughput, row.throughput_unit) == (0.5, 120.0, "tokens/s")
    assert (row.latency_ms, row.memory_mb, row.energy_j) == (8.25, 874.0, None)
    assert row.metrics == METRICS
    samples = store.samples("r1")
    assert [(s.index, s.item_id, s.output, s.score) for s in samples] == [
        (0, "item-0", "A0", 1.0),
        (1, "item-1", "A1", 0.0),
    ]
    assert samples[0].extra == {"pred": "0"}
    assert store.completed_keys() == {spec.run_key}


def test_failures_and_cancellations_keep_their_reason(store: Store) -> None:
    store.begin_run("oom", make_spec("a"))
    store.record(RunFailed("oom", reason="oom", message="CUDA out of memory", log_tail="tb"))
    store.begin_run("cx", make_spec("b"))
    store.record(RunFailed("cx", reason="cancelled", message="cancelled before it started"))
    oom, cx = store.run("oom"), store.run("cx")
    assert (oom.status, oom.error.reason, oom.error.message, oom.error.log_tail) == (
        "failed",
        "oom",
        "CUDA out of memory",
        "tb",
    )
    assert (cx.status, cx.error.reason) == ("cancelled", "cancelled")
    assert store.completed_keys() == set()
    assert store.results() == []


def scored(store: Store, run_id: str, n: int) -> None:
    for i in range(n):
        store.record(
            SampleScored(
                run_id, index=i, item_id=f"i{i}", prompt="p", output="o", gold="g", score=1.0
            )
        )


def test_a_run_read_back_says_how_far_it_got_in_every_state(store: Store) -> None:
    spec = make_spec(limit=10)
    for run_id in ("cancelled", "failed", "running"):
        store.begin_run(run_id, spec)
        store.record(RunStarted(run_id, spec=spec.to_dict(), pid=1))
        store.record(RunProgress(run_id, phase="loading"))  # no total yet: nothing written
        store.record(RunProgress(run_id, phase="measuring", done=0, total=10))
        scored(store, run_id, 3)
        store.record(RunProgress(run_id, phase="measuring", done=3, total=10))
    store.record(RunFailed("cancelled", reason="cancelled", message="stopped by the user"))
    store.record(RunFailed("failed", reason="oom", message="CUDA out of memory"))
    store.begin_run("queued", spec)
    runs = {r.run_id: r for r in store.runs()}
    assert {k: (r.status, r.done, r.total) for k, r in runs.items()} == {
        "cancelled": ("cancelled", 3, 10),
        "failed": ("failed", 3, 10),
        "running": ("running", 3, 10),
        "queued": ("queued", 0, 0),
    }
    assert (store.run("cancelled").done, store.run("cancelled").total) == (3, 10)
    # an ended run never changes: a late progress's total is not written
    store.record(RunProgress("cancelled", phase="measuring", done=3, total=99))
    assert store.run("cancelled").total == 10


def test_a_version_1_store_is_upgraded_and_its_runs_kept(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with Store(path) as store:
        store.begin_run("r", make_spec())
        store.record(RunStarted("r", spec=make_spec().to_dict(), pid=1))
        scored(store, "r", 2)
        store.record(RunFailed("r", reason="cancelled", message="stopped"))
    conn = sqlite3.connect(path)  # as version 1 wrote it: no samples_total
    conn.execute("ALTER TABLE runs DROP COLUMN samples_total")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Store(path) as store:
        run = store.run("r")
        assert (run.status, run.done, run.total) == ("cancelled", 2, 0)  # total: never said
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_a_finished_run_is_never_undone_by_late_events(store: Store) -> None:
    spec = make_spec()
    finish(store, "r1", spec)
    store.record(RunFailed("r1", reason="crashed", message="exit code -9"))
    store.record(RunStarted("r1", spec=spec.to_dict(), pid=1))
    row = store.run("r1")
    assert row.status == "finished" and row.error is None


def test_results_hold_the_latest_finished_run_per_key(store: Store) -> None:
    spec = make_spec("m1")
    finish(store, "old", spec, {**METRICS, "accuracy": 0.25}, t=100.0)
    finish(store, "new", spec, {**METRICS, "accuracy": 0.75}, t=200.0)
    finish(store, "other", make_spec("m2", task="imdb"), t=150.0)
    store.begin_run("failed", make_spec("m3"))
    store.record(RunFailed("failed", reason="oom", message="x"))

    rows = store.results()
    assert [(r.run_id, r.accuracy) for r in rows] == [("new", 0.75), ("other", 0.5)]
    assert rows[0].data_source == "sample"
    assert rows[0].label == "m1 · gsm8k · CPU"
    assert [r.run_id for r in store.results(tasks=["imdb"])] == ["other"]
    assert [r.run_id for r in store.results(models=["m1"])] == ["new"]
    assert store.results(tasks=[]) == []
    assert [r.run_id for r in store.runs()] == ["old", "new", "other", "failed"]
    assert [r.run_id for r in store.runs(statuses=["failed"])] == ["failed"]


def test_non_finite_metrics_are_stored_as_missing(store: Store) -> None:
    finish(store, "r1", make_spec(), {**METRICS, "throughput": float("nan"), "latency_ms": "x"})
    row = store.run("r1")
    assert row.throughput is None and row.latency_ms is None and row.accuracy == 0.5


def test_events_for_unknown_runs_are_refused(store: Store) -> None:
    with pytest.raises(KeyError, match="not in the store"):
        store.record(RunFinished("ghost", metrics=METRICS))


def test_queued_event_and_started_without_begin_create_the_run(store: Store) -> None:
    spec = make_spec()
    store.record(RunQueued("q1", spec=spec.to_dict()))
    assert store.run("q1").status == "queued"
    store.record(RunStarted("s1", spec=spec.to_dict(), pid=7))
    assert store.run("s1").status == "running"


def _orphan(path: Path, run_id: str) -> None:
    """Make a run look like it belongs to an app that has exited."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    conn = sqlite3.connect(path)
    conn.execute("UPDATE runs SET app_pid = ? WHERE run_id = ?", (int(dead.stdout), run_id))
    conn.commit()
    conn.close()


def test_runs_left_behind_by_a_killed_app_are_recovered_on_open(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    store = Store(path)
    spec = make_spec()
    store.begin_run("running", spec)
    store.record(RunStarted("running", spec=spec.to_dict(), pid=1))
    store.begin_run("queued", make_spec("b"))
    store.begin_run("mine", make_spec("c"))
    finish(store, "done", make_spec("d"))
    store.close()
    for run_id in ("running", "queued", "done"):
        _orphan(path, run_id)

    reopened = Store(path)
    assert sorted(reopened.recovered) == ["queued", "running"]
    crashed = reopened.run("running")
    assert (crashed.status, crashed.error.reason, crashed.error.message) == (
        "failed",
        "crashed",
        "its scheduler (app or service) exited during the run",
    )
    assert reopened.run("queued").status == "cancelled"
    assert reopened.run("done").status == "finished"
    # "mine" belongs to this (live) process: another slmtui sharing the store leaves it alone.
    assert reopened.run("mine").status == "queued"
    reopened.close()


def test_threads_can_record_concurrently(store: Store) -> None:
    def work(n: int) -> None:
        finish(store, f"r{n}", make_spec(f"m{n}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.results()) == 8


DURABILITY_WRITER = textwrap.dedent(
    """
    import sys, time
    from slmtui.protocol import RunFinished, RunStarted, SampleScored
    from slmtui.spec import ModelRef, RunSpec
    from slmtui.store import Store

    store = Store(sys.argv[1])
    spec = lambda name: RunSpec(model=ModelRef(name, "/m/" + name, "local"), task="gsm8k")
    store.begin_run("done", spec("a"))
    store.record(RunStarted("done", spec=spec("a").to_dict(), pid=1))
    store.record(RunFinished("done", metrics={"accuracy": 1.0, "throughput": 5.0}))
    store.begin_run("busy", spec("b"))
    store.record(RunStarted("busy", spec=spec("b").to_dict(), pid=1))
    i = 0
    while True:
        store.record(SampleScored("busy", index=i, item_id=str(i), prompt="p", output="o",
                                  gold="g", score=1.0))
        if i == 20:
            print("ready", flush=True)
        i += 1
    """
)


def test_sigkilled_writer_loses_no_committed_finished_run(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", DURABILITY_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = Store(path)
    assert store.recovered == ["busy"]
    done = store.run("done")
    assert (done.status, done.accuracy, done.throughput) == ("finished", 1.0, 5.0)
    assert store.run("busy").status == "failed"
    assert len(store.samples("busy")) > 20  # every committed sample survived the kill
    assert [r.run_id for r in store.results()] == ["done"]
    store.close()


def test_a_store_where_nothing_can_be_written_is_one_line() -> None:
    # /proc refuses new files even to root (tests run as root, which ignores file modes).
    with pytest.raises(UserError, match="cannot open it for writing") as caught:
        Store("/proc/slmtui-results.sqlite")
    assert "\n" not in str(caught.value) and "give a writable path" in str(caught.value)
