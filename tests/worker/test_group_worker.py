"""One load per model: a worker serves the queued runs of its (model, dtype, engine, GPU count)
group one after another; each run keeps its own events, stored row and failure reason."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from slmtui.protocol import Event, RunFinished, RunStarted
from slmtui.scheduler import Scheduler, worker_command
from slmtui.scheduler.groups import group_key, serving_argv
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.store import Store

TASKS = ("gsm8k", "squad_v2", "hellaswag", "arc_easy", "imdb")

SERVING_FAKE = textwrap.dedent(
    """
    import json, os, sys, time
    from slmtui.protocol import RunFailed, RunFinished, RunProgress, RunStarted

    def emit(event):
        print(event.to_json(), flush=True)

    def run(run_id, spec):
        emit(RunStarted(run_id, spec=spec, pid=os.getpid()))
        emit(RunProgress(run_id, phase="loading"))
        what = spec["model"]["name"]
        if spec["task"] == what.split("-")[0]:
            if what.endswith("-crash"):
                os._exit(3)  # dies mid-run, no event
            if what.endswith("-data"):
                emit(RunFailed(run_id, reason="data_failed", message="bad line"))
                return
            while True:  # hangs until cancelled
                emit(RunProgress(run_id, phase="measuring", done=1, total=10))
                time.sleep(0.05)
        emit(RunFinished(run_id, metrics={"accuracy": 1.0, "pid": os.getpid()}))

    run(sys.argv[sys.argv.index("--run-id") + 1],
        json.loads(sys.argv[sys.argv.index("--spec-json") + 1]))
    if "--serve" in sys.argv:
        for line in sys.stdin:
            message = json.loads(line)
            run(message["run_id"], message["spec"])
    """
)


class Harness:
    def __init__(self, tmp_path: Path, factory: Any, **kw: Any) -> None:
        self.store = Store(tmp_path / "r.sqlite")
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.scheduler = Scheduler(
            self.store,
            inventory=[],
            listener=self.listen,
            command_factory=factory,
            logs_dir=tmp_path / "logs",
            tick_s=0.02,
            handle_signals=False,
            kill_grace_s=0.5,
            **kw,
        )
        self.scheduler.start()

    def listen(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def pids(self, run_ids: list[str]) -> list[int | None]:
        with self.lock:
            started = {e.run_id: e.pid for e in self.events if isinstance(e, RunStarted)}
        return [started.get(r) for r in run_ids]

    def status(self, run_ids: list[str]) -> list[str]:
        states = {s.run_id: s for s in self.scheduler.snapshot()}
        return [states[r].status for r in run_ids]

    def close(self) -> None:
        self.scheduler.shutdown()
        self.store.close()


@pytest.fixture
def fake_harness(tmp_path: Path):
    fake = tmp_path / "serving_fake.py"
    fake.write_text(SERVING_FAKE)

    def factory(s: RunSpec, run_id: str, gpu_ids: Any) -> tuple[list[str], dict[str, str]]:
        argv, env = worker_command(s, run_id, gpu_ids)
        return [sys.executable, str(fake), *argv[argv.index("--spec-json") :]], env

    made: list[Harness] = []

    def make() -> Harness:
        made.append(Harness(tmp_path, factory, group_runs=True))
        return made[-1]

    yield make
    for h in made:
        h.close()


def group(model: str) -> list[RunSpec]:
    ref = ModelRef(model, f"/m/{model}", "local")
    return [RunSpec(model=ref, task=task) for task in TASKS]


def test_runs_of_one_model_share_one_worker_and_other_models_do_not():
    a, b = group("m1")[:2], group("m2")[:1]
    assert group_key(a[0]) == group_key(a[1]) != group_key(b[0])
    assert group_key(RunSpec(model=a[0].model, task="gsm8k", gpus=2)) is None
    assert serving_argv(["python", "-m", "slmtui.worker"], (0,))[-1] == "--serve"
    assert "--serve" not in serving_argv(["python", "-m", "torch.distributed.run"], (0, 1))


def test_a_crash_in_task_2_of_5_costs_only_task_2(fake_harness: Any):
    h = fake_harness()
    ids = h.scheduler.submit(group("squad_v2-crash"))
    assert h.scheduler.wait(timeout=30)
    assert h.status(ids) == ["finished", "failed", "finished", "finished", "finished"]
    failed = h.scheduler.state(ids[1])
    assert failed is not None and failed.error is not None
    assert failed.error.reason == "crashed"
    pids = h.pids(ids)
    assert pids[0] == pids[1] != pids[2] == pids[3] == pids[4]  # a fresh worker for the rest
    stored = {r.run_id: r.status for r in h.store.runs()}
    assert [stored[i] for i in ids] == ["finished", "failed", "finished", "finished", "finished"]


def test_a_data_failure_keeps_the_worker_for_the_next_task(fake_harness: Any):
    h = fake_harness()
    ids = h.scheduler.submit(group("hellaswag-data"))
    assert h.scheduler.wait(timeout=30)
    assert h.status(ids) == ["finished", "finished", "failed", "finished", "finished"]
    assert len(set(h.pids(ids))) == 1


def test_cancel_mid_group(fake_harness: Any):
    """Cancel the hanging task 3 while it runs and task 5 while queued: tasks 1, 2 and 4 end
    normally, 4 in a fresh worker."""
    h = fake_harness()
    ids = h.scheduler.submit(group("hellaswag-hang"))
    deadline = time.monotonic() + 20
    while h.status(ids)[2] != "running" or h.pids(ids)[2] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert h.scheduler.cancel(ids[4])
    assert h.scheduler.cancel(ids[2])
    assert h.scheduler.wait(timeout=30)
    assert h.status(ids) == ["finished", "finished", "cancelled", "finished", "cancelled"]
    pids = h.pids(ids)
    assert pids[0] == pids[1] == pids[2] != pids[3] and pids[4] is None


@pytest.mark.slow
def test_the_real_worker_loads_the_model_once_for_two_tasks(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    docs = [
        {
            "id": f"q{i}",
            "question": f"Which planet is number {i} from the sun?",
            "choices": {"text": ["Mars", "Venus", "Earth"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        }
        for i in range(2)
    ]
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    ref = ModelRef("tiny", str(tiny_model_dir), "local")
    specs = [
        RunSpec(model=ref, task="arc_easy", dtype="float32", batch_size=2, options=options)
        for options in (
            TaskOptions(data_file=str(data), mode="loglikelihood"),
            TaskOptions(data_file=str(data), mode="generate", max_new_tokens=3),
        )
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SLMTUI_CACHE_DIR", str(tmp_path / "cache"))
    h = Harness(tmp_path, worker_command)
    try:
        ids = h.scheduler.submit(specs)
        assert h.scheduler.wait(timeout=240)
        assert h.status(ids) == ["finished", "finished"], h.scheduler.snapshot()
        pids = h.pids(ids)
        assert pids[0] == pids[1]
        with h.lock:
            results = {e.run_id: e.metrics for e in h.events if isinstance(e, RunFinished)}
        assert results[ids[0]]["model_reused"] is False and results[ids[0]]["load_s"] > 0
        assert results[ids[1]]["model_reused"] is True
        assert 0 < results[ids[1]]["load_s"] < results[ids[0]]["load_s"]  # no model load in it
    finally:
        h.close()
