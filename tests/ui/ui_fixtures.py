"""Helpers for driving the console: a store filled with known rows, and a scripted scheduler.

The scripted scheduler has the real Scheduler's methods; instead of starting workers it lets a
test play protocol events at the listener, from another thread as the real one does. Nothing here
ships in the package.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from slmtui.profile import parse_profile
from slmtui.protocol import Event, RunFailed, RunFinished, RunProgress, RunQueued, RunStarted
from slmtui.scheduler import Gpu
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.store import Store
from slmtui.ui.app import SlmApp

T0 = 1_750_000_000.0
"""A fixed clock for every scripted event (snapshots never see the real time)."""

PROFILE_TOML = """
name = "fixture"
description = "two tiny models, two tasks"

[settings]
limit = 4

[[models]]
name = "alpha-135m"
source = "org/alpha-135m"

[[models]]
name = "beta-270m"
source = "org/beta-270m"

[tasks.gsm8k]
num_fewshot = 2

[tasks.arc_easy]
"""


def spec(model: str, task: str = "gsm8k", gpus: int = 0, limit: int = 4) -> RunSpec:
    return RunSpec(
        model=ModelRef(name=model, source=f"org/{model}", kind="hub"),
        task=task,
        options=TaskOptions(limit=limit),
        gpus=gpus,
    )


def metrics(acc: float, thr: float, lat: float, mem: float, **extra: Any) -> dict[str, Any]:
    m = {
        "accuracy": acc,
        "throughput": thr,
        "throughput_unit": "tokens/s",
        "latency_ms": lat,
        "peak_mem_mb": mem,
        "mem_source": "rss",
        "load_s": 2.0,
        "warmup_s": 0.5,
        "measured_s": 7.5,
        "n_samples": 4,
        "mode": "generate",
        "data_source": "sample",
        "hardware": {"gpu_name": None, "gpu_count": 0, "cpu": "test cpu", "python": "3.11"},
    }
    m.update(extra)
    return m


RESULTS = [
    ("alpha-135m", "gsm8k", metrics(0.25, 120.0, 8.3, 400.0)),
    ("beta-270m", "gsm8k", metrics(0.50, 60.0, 16.7, 900.0)),
    ("gamma-1b", "gsm8k", metrics(0.75, 20.0, 50.0, 2500.0)),
    ("alpha-135m", "arc_easy", metrics(0.40, 90.0, 11.1, 420.0)),
    ("beta-270m", "arc_easy", metrics(0.60, 45.0, 22.2, 950.0)),
]


def fill_store(store: Store, rows: Iterable[tuple[str, str, dict[str, Any]]] = RESULTS) -> None:
    """Finished runs with fixed ids, times and metrics; one failed run with a log tail."""
    for n, (model, task, m) in enumerate(rows):
        run_id = f"run-{n:02d}"
        s = spec(model, task)
        store.record(RunQueued(run_id, spec=s.to_dict(), t=T0 + n))
        store.record(RunStarted(run_id, spec=s.to_dict(), pid=1, t=T0 + n + 0.1))
        store.record(RunFinished(run_id, metrics=m, t=T0 + n + 10))
    s = spec("broken-7b", "gsm8k")
    store.record(RunQueued("run-fail", spec=s.to_dict(), t=T0 + 50))
    store.record(RunStarted("run-fail", spec=s.to_dict(), pid=1, t=T0 + 51))
    store.record(
        RunFailed(
            "run-fail",
            reason="oom",
            message="CUDA out of memory while loading",
            log_tail="Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA OOM",
            t=T0 + 52,
        )
    )


class ScriptedScheduler:
    """The Scheduler's surface; ``play`` sends events to the listener from a thread."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store
        self.listener: Any = None
        self.submitted: list[RunSpec] = []
        self.cancelled: list[str] = []
        self.started = False
        self.shut_down = False
        self._ids = itertools.count()

    def submit(self, specs: Iterable[RunSpec]) -> list[str]:
        ids = []
        for s in specs:
            run_id = f"live-{next(self._ids):02d}"
            self.submitted.append(s)
            event = RunQueued(run_id, spec=s.to_dict(), t=T0 + 100)
            if self.store is not None:
                self.store.record(event)
            self.listener(event)
            ids.append(run_id)
        return ids

    def cancel(self, run_id: str) -> bool:
        self.cancelled.append(run_id)
        self.play([RunFailed(run_id, reason="cancelled", message="cancelled while running")])
        return True

    def cancel_all(self) -> None:
        self.cancelled.append("*")

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.shut_down = True

    def play(self, events: Sequence[Event], *, thread: bool = True) -> None:
        """Record (like the real scheduler: store first) and deliver, from another thread."""

        def deliver() -> None:
            for event in events:
                if self.store is not None and not isinstance(event, RunProgress):
                    self.store.record(event)
                self.listener(event)

        if thread:
            worker = threading.Thread(target=deliver)
            worker.start()
            worker.join()
        else:
            deliver()


def make_app(
    store: Store,
    scheduler: ScriptedScheduler | None = None,
    *,
    gpus: Sequence[Gpu] = (),
    tmp_path: Path | None = None,
    interval_s: float = 0.05,
    profile_toml: str = PROFILE_TOML,
    preflight: Any = None,
) -> SlmApp:
    """The console on the fixture profile. Its hub models are not cached here: launches skip
    the hub check unless ``preflight`` is given (``profile.check_runs`` is the real one)."""
    profile = parse_profile(profile_toml, label="fixture.toml", default_name="fixture")
    return SlmApp(
        store=store,
        scheduler=scheduler or ScriptedScheduler(store),
        profile=profile,
        gpus=gpus,
        export_dir=tmp_path,
        progress_interval_s=interval_s,
        preflight=preflight or (lambda specs, where: None),
    )


def notices_of(app: SlmApp) -> list[str]:
    """The notifications the app showed so far, oldest first."""
    return [n.message for n in app._notifications]
