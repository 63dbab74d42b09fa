"""Planning: resume skips stored runs, rerun does not, identical specs run once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from slmtui.plan import plan_runs
from slmtui.protocol import RunFailed, RunFinished, RunStarted
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.store import Store


def make_spec(model: str, task: str = "gsm8k", limit: int = 4) -> RunSpec:
    return RunSpec(
        model=ModelRef(name=model, source=f"/models/{model}", kind="local"),
        task=task,
        options=TaskOptions(limit=limit),
    )


def store_with(tmp_path: Path, finished: list[RunSpec], failed: list[RunSpec]) -> Store:
    store = Store(tmp_path / "r.sqlite")
    for n, spec in enumerate(finished + failed):
        run_id = f"r{n}"
        store.begin_run(run_id, spec)
        store.record(RunStarted(run_id, spec=spec.to_dict(), pid=1))
        if spec in finished:
            store.record(RunFinished(run_id, metrics={"accuracy": 1.0}))
        else:
            store.record(RunFailed(run_id, reason="oom", message="x"))
    return store


def test_resume_skips_finished_runs_only(tmp_path: Path) -> None:
    a, b, c = make_spec("a"), make_spec("b"), make_spec("c")
    store = store_with(tmp_path, finished=[a], failed=[b])
    plan = plan_runs([a, b, c], store)
    assert plan.to_run == [b, c]  # a failed run is tried again
    assert plan.skipped == [a]
    store.close()


def test_rerun_runs_everything(tmp_path: Path) -> None:
    a, b = make_spec("a"), make_spec("b")
    store = store_with(tmp_path, finished=[a, b], failed=[])
    plan = plan_runs([a, b], store, rerun=True)
    assert plan.to_run == [a, b] and plan.skipped == []
    store.close()


def test_a_changed_setting_is_a_new_measurement(tmp_path: Path) -> None:
    a = make_spec("a")
    store = store_with(tmp_path, finished=[a], failed=[])
    more_items = make_spec("a", limit=8)
    longer_timeout = replace(a, timeout_s=10.0)  # the timeout does not change the measurement
    plan = plan_runs([more_items, longer_timeout], store)
    assert plan.to_run == [more_items] and plan.skipped == [longer_timeout]
    store.close()


def test_identical_specs_run_once_in_request_order() -> None:
    a, b = make_spec("a"), make_spec("b")
    plan = plan_runs([b, a, b, replace(a, timeout_s=5.0)], store=None)
    assert plan.to_run == [b, a]
    assert plan.duplicates == [b, replace(a, timeout_s=5.0)]
    assert plan.skipped == []
