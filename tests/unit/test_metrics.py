"""RunMetrics: the typed record of what a run reports, read from and back to the stored dict."""

from __future__ import annotations

from slmtui.metrics import FIELD_NAMES, RunMetrics
from slmtui.reports import columns


def test_a_stored_dict_reads_typed_and_comes_back_unchanged():
    stored = {
        "accuracy": 0.5,
        "throughput": 120.0,
        "throughput_unit": "tokens/s",
        "energy_j": None,  # measured nothing (CPU): kept as None, not dropped
        "task_metrics": {"exact_match": 0.5},
        "from_a_newer_worker_ms": 3.0,  # unknown here: kept in extra
    }
    record = RunMetrics.from_dict(stored)
    assert record.accuracy == 0.5 and record.throughput_unit == "tokens/s"
    assert record.energy_j is None and record.extra == {"from_a_newer_worker_ms": 3.0}
    assert record.to_dict() == stored


def test_an_old_run_without_new_fields_reads_as_none():
    record = RunMetrics.from_dict({"accuracy": 0.25})
    assert record.engine_fallback is None and record.ttft_ms is None
    assert record.to_dict() == {"accuracy": 0.25}
    assert RunMetrics.from_dict(None).to_dict() == {}


def test_every_metric_column_shows_a_run_metrics_field():
    assert columns.METRIC_COLUMNS, "the registry has metric columns"
    for col in columns.METRIC_COLUMNS:
        assert col.metric in FIELD_NAMES, col.key
