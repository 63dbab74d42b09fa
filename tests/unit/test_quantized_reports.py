"""Quantised variants in reports: their own label, and the accuracy change against the same
model's full-precision run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slmtui.protocol import RunFinished
from slmtui.reports.commands import build_per_inputs
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.store import Store


def finish(store: Store, run_id: str, accuracy: float, at: float = 0.0, **spec: Any) -> None:
    limit = spec.pop("limit", 10)
    run_spec = RunSpec(
        model=ModelRef("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "hub"),
        task=spec.pop("task", "gsm8k"),
        options=TaskOptions(limit=limit),
        gpus=1,
        **spec,
    )
    store.begin_run(run_id, run_spec, queued_at=1_700_000_000.0 + at)
    store.record(
        RunFinished(
            run_id=run_id,
            t=1_700_000_010.0 + at,
            metrics={
                "accuracy": accuracy,
                "throughput": 100.0,
                "throughput_unit": "tokens/s",
                "latency_ms": 10.0,
                "peak_mem_mb": 1000.0,
                "mode": "generate",
            },
        )
    )


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "results.sqlite") as s:
        yield s


def test_each_variant_is_a_row_of_its_own(store: Store) -> None:
    finish(store, "full", 0.60)
    finish(store, "q4", 0.55, quantize="int4")
    finish(store, "q8", 0.60, quantize="int8")
    built = build_per_inputs(store.results())
    assert sorted(i.model for i in built.inputs) == [
        "Qwen2.5-7B-Instruct",
        "Qwen2.5-7B-Instruct · int4",
        "Qwen2.5-7B-Instruct · int8",
    ]
    assert not [n for n in built.notes if "same settings" in n]


def test_accuracy_change_is_against_the_same_settings_at_full_precision(store: Store) -> None:
    finish(store, "full", 0.60)
    finish(store, "q4", 0.55, quantize="int4")
    finish(store, "q8", 0.60, quantize="int8")
    finish(store, "q4-more-items", 0.50, quantize="int4", limit=20)  # no full-precision twin
    finish(store, "q8-imdb", 0.9, quantize="int8", task="imdb")  # nor here
    built = build_per_inputs(store.results())
    assert built.accuracy_change == pytest.approx({"q4": -0.05, "q8": 0.0})
    labels = {i.key: i.model for i in built.inputs}
    # the quantised runs at two limits are told apart by the setting that differs
    assert labels["q4"] == "Qwen2.5-7B-Instruct · int4 · limit 10"
    assert labels["q4-more-items"] == "Qwen2.5-7B-Instruct · int4 · limit 20"


def test_a_variant_and_its_full_precision_run_both_need_accuracy(store: Store) -> None:
    finish(store, "q8", 0.60, quantize="int8")
    assert build_per_inputs(store.results()).accuracy_change == {}
