"""Results survive what kills a sweep: a worker killed mid-run costs only its run; the app killed
mid-run (SIGKILL, no clean-up code runs) loses no finished run, leaves a store that opens cleanly
and no worker behind, and a rerun completes only what is missing.

Real `slmtui run --headless` processes and real workers on a tiny random Llama saved as a local
checkpoint (tests/e2e/conftest.py); on the CPU runs go one at a time, in profile order.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from slmtui.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TARGET_ITEMS = 8
"""Items of the run that gets killed: long enough (200 new tokens each) to be hit mid-run."""


def write_profile(tmp_path: Path, model_dir: Path, tasks: str) -> Path:
    """A profile on the tiny model; ``tasks`` picks [tasks.*] tables from TASK_TABLES."""
    data = tmp_path / "gsm8k.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(TARGET_ITEMS):
            doc = {
                "question": f"What is {i} + {i}?",
                "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}",
            }
            f.write(json.dumps(doc) + "\n")
    path = tmp_path / "sweep.toml"
    path.write_text(
        f"""
name = "sweep"
[settings]
engine = "plain"
batch_size = 1
[[models]]
name = "tiny"
source = "{model_dir}"
"""
        + "".join(TASK_TABLES[t] for t in tasks.split()),
        encoding="utf-8",
    )
    return path


TASK_TABLES = {
    # a short run on the embedded sample set
    "arc_easy": "[tasks.arc_easy]\nlimit = 3\n",
    "imdb": "[tasks.imdb]\nlimit = 2\n",
    # the run that is in flight when something is killed
    "gsm8k": (
        f"[tasks.gsm8k]\nlimit = {TARGET_ITEMS}\nnum_fewshot = 0\nmax_new_tokens = 200\n"
        'data_file = "gsm8k.jsonl"\n'
    ),
}


def runs_table(db: Path) -> dict[str, dict[str, Any]]:
    """task -> the newest run's row, read the way another process would (no Store, no recovery)."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM samples s WHERE s.run_id = r.run_id) AS n_stored"
            " FROM runs r ORDER BY queued_at"
        ).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return {}
    finally:
        conn.close()
    return {row["task"]: dict(row) for row in rows}


def wait_until(what: str, predicate: Callable[[], Any], timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def target_in_flight(db: Path) -> dict[str, Any] | None:
    """The gsm8k run once its worker has scored a first item and has more to go."""
    row = runs_table(db).get("gsm8k")
    if row and row["status"] == "running" and row["worker_pid"] and row["n_stored"] >= 1:
        assert row["n_stored"] < TARGET_ITEMS, "the run ended before it could be killed"
        return row
    return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def workers_of(run_ids: set[str]) -> list[int]:
    """Processes still running a worker for one of ``run_ids``."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "--run-id" in cmdline and set(cmdline) & run_ids and alive(process.info["pid"]):
            found.append(process.info["pid"])
    return found


def test_killed_worker_costs_only_its_run_and_a_rerun_redoes_it(
    tmp_path: Path, tiny_model_dir: Path, slmtui: Any
) -> None:
    db = tmp_path / "results.sqlite"
    profile = write_profile(tmp_path, tiny_model_dir, "gsm8k arc_easy")
    app = slmtui.start("run", str(profile), "--headless", "--db", str(db))
    try:
        target = wait_until("the gsm8k run mid-way", lambda: target_in_flight(db))
        os.kill(target["worker_pid"], signal.SIGKILL)
        assert app.wait(timeout=180) == 1  # a run failed; the sweep went on to the end
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()

    out = (tmp_path / "app.out").read_text()
    assert "1 run(s) did not finish" in out and "tiny · gsm8k · CPU" in out
    assert "arc_easy · 1 model" in out  # the other run was measured and ranked
    with Store(db) as store:
        killed = store.run(target["run_id"])
        assert killed is not None
        assert (killed.status, killed.error.reason) == ("failed", "crashed")
        assert killed.error.message == "worker was killed by SIGKILL without a result"
        kept = store.samples(killed.run_id)
        assert 1 <= len(kept) < TARGET_ITEMS  # what it scored before dying is kept
        assert [r.task for r in store.results()] == ["arc_easy"]
        arc_easy_id = store.results()[0].run_id

    again = slmtui.run("run", str(profile), "--headless", "--db", str(db))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs, 1 to run, 1 already stored" in again.stderr
    with Store(db) as store:
        results = {r.task: r for r in store.results()}
        assert sorted(results) == ["arc_easy", "gsm8k"]
        assert results["arc_easy"].run_id == arc_easy_id
        assert results["gsm8k"].metrics["n_samples"] == TARGET_ITEMS
        assert len(store.samples(results["gsm8k"].run_id)) == TARGET_ITEMS
        assert len(store.runs()) == 3


def test_killed_app_loses_no_finished_run_leaves_no_worker_and_a_rerun_resumes(
    tmp_path: Path, tiny_model_dir: Path, slmtui: Any
) -> None:
    db = tmp_path / "results.sqlite"
    profile = write_profile(tmp_path, tiny_model_dir, "arc_easy gsm8k imdb")
    app = slmtui.start("run", str(profile), "--headless", "--db", str(db))
    try:
        target = wait_until("the gsm8k run mid-way", lambda: target_in_flight(db))
        before = runs_table(db)
        assert before["arc_easy"]["status"] == "finished"
        assert before["imdb"]["status"] == "queued"
        app.send_signal(signal.SIGKILL)  # no handler, no finally, no atexit
        assert app.wait(timeout=10) == -signal.SIGKILL
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()

    run_ids = {row["run_id"] for row in before.values()}
    # The worker's event pipe is broken: it ends on its next event (a heartbeat a second).
    wait_until("the orphaned worker to end", lambda: not alive(target["worker_pid"]), 30)
    assert workers_of(run_ids) == []

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    with Store(db) as store:  # opens cleanly; the dead app's runs are closed off
        assert sorted(store.recovered) == sorted([target["run_id"], before["imdb"]["run_id"]])
        finished = store.run(before["arc_easy"]["run_id"])
        assert finished is not None and finished.status == "finished"
        assert finished.accuracy is not None and finished.throughput and finished.latency_ms
        assert finished.memory_mb and len(store.samples(finished.run_id)) == 3
        crashed = store.run(target["run_id"])
        assert crashed is not None and (crashed.status, crashed.error.reason) == (
            "failed",
            "crashed",
        )
        cancelled = store.run(before["imdb"]["run_id"])
        assert cancelled is not None and cancelled.status == "cancelled"

    again = slmtui.run("run", str(profile), "--headless", "--db", str(db))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 runs, 2 to run, 1 already stored" in again.stderr
    with Store(db) as store:
        results = {r.task: r for r in store.results()}
        assert sorted(results) == ["arc_easy", "gsm8k", "imdb"]
        assert results["arc_easy"].run_id == before["arc_easy"]["run_id"]  # not run again
        assert results["gsm8k"].metrics["n_samples"] == TARGET_ITEMS
        assert len(store.runs()) == 5
        assert store.recovered == []
