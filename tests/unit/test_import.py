"""Results that travel: a JSON export or another store merged into this one, by run id."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import fields
from pathlib import Path

import pytest
from test_reports import fill, finish

from slmtui.cli import main
from slmtui.protocol import RunFailed, RunStarted, SampleScored
from slmtui.spec import ModelRef, RunSpec
from slmtui.store import Store
from slmtui.store.schema import SCHEMA_VERSION

GPU_METRICS = {
    "energy_j": 360.0,
    "energy_per_token_j": 0.18,
    "tokens_out": 2000,
    "n_samples": 10,
    "telemetry": {"power_w": {"mean": 250.5, "max": 300.0}, "util_pct": [50, 60]},
    "hardware": {"gpu_name": "NVIDIA H200", "torch": "2.5.1", "transformers": "4.56.0"},
}


def source_store(path: Path) -> Store:
    store = Store(path)
    fill(store)
    finish(store, "g1", "G", "gsm8k", metrics=GPU_METRICS, dtype="bfloat16", batch_size=16)
    store.record(
        RunStarted("g1", spec=store.run("g1").spec.to_dict(), pid=5, hardware={"gpus": 1})
    )  # ignored: the run has ended
    store.record(
        SampleScored(
            "g1", index=0, item_id="i0", prompt="p", output="o", gold="g", score=1.0, extra={"k": 1}
        )
    )
    return store


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def same_runs(a: Store, b: Store, ids: set[str], *, samples: bool = True) -> None:
    """Every stored column of every run equal, field by field (``samples``: the samples were
    carried too, so the counts of samples scored agree)."""
    left, right = a.export_runs(ids), b.export_runs(ids)
    assert set(left) == set(right) == ids
    for run_id in ids:
        for name in left[run_id]:
            assert left[run_id][name] == right[run_id][name], (run_id, name)
        row_a, row_b = a.run(run_id), b.run(run_id)
        for f in fields(row_a):
            if f.name != "samples_done" or samples:
                assert getattr(row_a, f.name) == getattr(row_b, f.name), (run_id, f.name)


def test_json_export_round_trips_into_an_empty_store(tmp_path: Path, capsys):
    with source_store(tmp_path / "a.sqlite") as src:
        export = tmp_path / "export.json"
        code, _, _ = run(
            capsys, "report", "--db", str(src.path), "--format", "json", "-o", str(export)
        )
        assert code == 0
        document = json.loads(export.read_text())
        g = next(r for r in document["rows"] if r["model"] == "G")
        # every metric, the hardware and the versions travel with the row
        assert g["run"]["metrics"]["telemetry"]["power_w"]["mean"] == 250.5
        assert g["run"]["metrics"]["hardware"]["torch"] == "2.5.1"
        assert g["run"]["spec"]["dtype"] == "bfloat16"
        code, out, _ = run(capsys, "import", str(export), "--db", str(tmp_path / "b.sqlite"))
        assert code == 0 and "imported 6 runs" in out
        with Store(tmp_path / "b.sqlite") as dst:
            same_runs(src, dst, {r["run_id"] for r in document["rows"]}, samples=False)
            assert dst.samples("g1") == []  # a JSON export carries runs, not samples
            assert (src.run("g1").samples_done, dst.run("g1").samples_done) == (1, 0)


def test_store_import_brings_samples_and_failed_runs_and_dedupes(tmp_path: Path, capsys):
    with source_store(tmp_path / "a.sqlite") as src:
        spec = src.run("a1").spec
        src.begin_run("bad", spec)
        src.record(RunFailed("bad", reason="oom", message="out of memory", log_tail="tail"))
        ids = set(src.export_runs())
        with Store(tmp_path / "b.sqlite") as dst:
            finish(dst, "a1", "A-mine", "gsm8k")  # same run id as the source's: ours is kept
        code, out, _ = run(capsys, "import", str(src.path), "--db", str(tmp_path / "b.sqlite"))
        assert code == 0
        assert f"imported {len(ids) - 1} runs" in out and "1 already stored" in out
        with Store(tmp_path / "b.sqlite") as dst:
            same_runs(src, dst, ids - {"a1"})
            assert dst.run("a1").spec.model.name == "A-mine"
            assert dst.samples("g1") == src.samples("g1")
        code, out, _ = run(capsys, "import", str(src.path), "--db", str(tmp_path / "b.sqlite"))
        assert "imported 0 runs" in out


def test_a_version_1_store_imports_as_it_is_and_a_newer_one_is_refused(tmp_path: Path, capsys):
    old = tmp_path / "old.sqlite"
    with Store(old) as src:
        spec = RunSpec(model=ModelRef("A", "org/A", "hub"), task="gsm8k")
        src.begin_run("c", spec)
        for i in range(2):
            src.record(
                SampleScored(
                    "c", index=i, item_id=f"i{i}", prompt="p", output="o", gold="g", score=1.0
                )
            )
        src.record(RunFailed("c", reason="cancelled", message="stopped"))
    conn = sqlite3.connect(old)  # as version 1 wrote it (samples_total came in version 2)
    conn.execute("ALTER TABLE runs DROP COLUMN samples_total")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    before = old.read_bytes()
    code, out, _ = run(capsys, "import", str(old), "--db", str(tmp_path / "new.sqlite"))
    assert code == 0 and "imported 1 run" in out
    assert old.read_bytes() == before  # read as it is, not migrated
    with Store(tmp_path / "new.sqlite") as dst:
        imported = dst.run("c")
        assert (imported.status, imported.done, imported.total) == ("cancelled", 2, 0)
    conn = sqlite3.connect(old)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    code, _, err = run(capsys, "import", str(old), "--db", str(tmp_path / "new.sqlite"))
    assert code == 2
    assert f"store schema version {SCHEMA_VERSION + 1}, this slmtui imports versions 1, 2" in err


def test_csv_export_carries_settings_hardware_and_every_metric(tmp_path: Path, capsys):
    with source_store(tmp_path / "a.sqlite") as src:
        code, out, _ = run(capsys, "report", "--db", str(src.path), "--format", "csv")
    rows = {r["model"]: r for r in csv.DictReader(io.StringIO(out))}
    g = rows["G"]
    assert code == 0 and g["run_id"] == "g1" and g["spec.dtype"] == "bfloat16"
    assert g["metrics.telemetry.power_w.mean"] == "250.5"
    assert g["metrics.hardware.transformers"] == "4.56.0"
    assert g["metrics.energy_j"] == "360" and g["co2_run_g"] != ""
    assert rows["A"]["co2_run_g"] == ""  # no energy measured: absent, not 0


def test_bad_import_files_are_one_line_and_write_nothing(tmp_path: Path, capsys):
    db = tmp_path / "b.sqlite"
    cases = {
        "missing.json": (None, "no such file"),
        "text.json": ("hello", "neither a slmtui results store"),
        "other.json": ('{"rows": []}', "not a slmtui report export"),
        "per.json": (
            '{"format": "slmtui-report", "format_version": 1, "rows": [{"model": "A"}]}',
            "row #1 has no 'run' object",
        ),
        "badrun.json": (
            '{"format": "slmtui-report", "format_version": 1, "rows": [{"run": {"run_id": 3}}]}',
            "'run_id' must be str",
        ),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        code, _, err = run(capsys, "import", str(path), "--db", str(db))
        assert code == 2 and err.count("\n") == 1 and expected in err, (name, err)
        assert str(path) in err
    assert not db.exists() or Store(db).runs() == []


def test_a_bad_record_after_good_ones_adds_nothing(tmp_path: Path, capsys):
    with source_store(tmp_path / "a.sqlite") as src:
        records = list(src.export_runs().values())
    broken = {**records[-1], "run_id": "zz", "spec": {"model": "?"}}
    export = tmp_path / "e.json"
    export.write_text(
        json.dumps(
            {
                "format": "slmtui-report",
                "format_version": 1,
                "rows": [{"run": r} for r in [*records, broken]],
            }
        )
    )
    code, _, err = run(capsys, "import", str(export), "--db", str(tmp_path / "b.sqlite"))
    assert code == 2 and "run #7 (zz): 'spec' is not a run spec" in err
    with Store(tmp_path / "b.sqlite") as dst:
        assert dst.runs() == []


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_per_csv_exports_still_work_without_runs(tmp_path: Path, capsys, fmt: str):
    path = tmp_path / "in.csv"
    path.write_text("model,task,accuracy,throughput,latency_ms,memory_mb\nA,t,0.5,1,1,1\n")
    code, out, _ = run(capsys, "per", str(path), "--format", fmt)
    assert code == 0 and "A" in out
