"""Reports: exports, rich tables, store rows to PER inputs, and `slmtui report` on a real store."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from slmtui.cli import main
from slmtui.per import PerInput, compute_per
from slmtui.protocol import RunFinished
from slmtui.reports.commands import build_per_inputs, per_inputs_from_results
from slmtui.reports.export import COLUMNS, to_csv, to_json, to_markdown
from slmtui.reports.tables import BEST_STYLE, PARETO_MARK, render_per_tables, task_table
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.store import Store

# The 3-model example of test_per.py: PER B 0.759836, A 0.638943, C 0.
THREE = [
    PerInput("A", "gsm8k", 0.80, 150, 8, 1200, throughput_unit="tokens/s"),
    PerInput("B", "gsm8k", 0.60, 250, 4, 800, throughput_unit="tokens/s"),
    PerInput("C", "gsm8k", 0.50, 50, 12, 2000, throughput_unit="tokens/s"),
]
TWO_TASKS = [
    *THREE,
    PerInput("A", "imdb", 0.2, 10, 100, 1000, throughput_unit="samples/s"),
    PerInput("B|x", "imdb", 0.9, 20, 50, 500, throughput_unit="samples/s"),
]


def render(rows, width: int = 140, title: str | None = None) -> str:
    buffer = io.StringIO()
    render_per_tables(rows, Console(file=buffer, width=width, color_system=None), title=title)
    return buffer.getvalue()


# -- exports ------------------------------------------------------------------------------------


def test_csv_export_carries_inputs_per_factors_and_pareto():
    rows = list(csv.DictReader(io.StringIO(to_csv(compute_per(THREE)))))
    assert tuple(rows[0]) == COLUMNS
    b = rows[0]
    assert (b["model"], b["task"], b["accuracy"], b["throughput"]) == ("B", "gsm8k", "0.6", "250")
    assert (b["throughput_unit"], b["latency_ms"], b["memory_mb"]) == ("tokens/s", "4", "800")
    assert (b["rank"], b["pareto"], b["energy_j"], b["energy_n"]) == ("1", "true", "", "")
    assert float(b["per"]) == pytest.approx(0.759836, abs=1e-6)
    assert float(b["acc_n"]) == pytest.approx(1 / 3)
    assert rows[2]["model"] == "C" and rows[2]["pareto"] == "false" and rows[2]["per"] == "0"


def test_json_export_is_an_object_with_units_and_rows():
    document = json.loads(to_json(compute_per(THREE, energy=False)))
    assert document["format"] == "slmtui-report" and document["format_version"] == 1
    assert document["slmtui_version"] and document["units"]["latency_ms"].startswith("ms per")
    data = document["rows"]
    assert [d["model"] for d in data] == ["B", "A", "C"]
    assert list(data[0]) == list(COLUMNS)
    assert data[1]["mem_n"] == pytest.approx(2 / 3)
    assert data[0]["energy_n"] is None
    # PER-rel and its ratios ride along (hand-worked in test_per.py: A 0.668740)
    assert data[1]["per_rel"] == pytest.approx(0.668740, abs=1e-6)
    assert (data[1]["thr_r"], data[1]["lat_r"], data[1]["limiting"]) == (0.6, 0.5, "latency")


def test_markdown_export_has_a_table_per_task_and_an_overview():
    text = to_markdown(compute_per(TWO_TASKS))
    assert "## gsm8k" in text and "## imdb" in text and "## Overview" in text
    assert "| # | Model | Accuracy | THR (tokens/s) | LAT (ms/token) | MEM (MB) | PER |" in text
    assert "THR (samples/s) | LAT (ms/sample)" in text
    assert "| 1 | B\\|x | 0.900 |" in text  # pipes in names are escaped
    assert "| A | 0.319 | 2 | 0.639 | 0.000 |" in text  # mean of 0.638943 and 0
    assert "PER is relative to the models in this table" in text


def test_markdown_with_one_task_has_no_overview():
    assert "Overview" not in to_markdown(compute_per(THREE))


# -- rich tables --------------------------------------------------------------------------------


def test_tables_show_each_task_and_an_overview():
    text = render(compute_per(TWO_TASKS), title="my runs")
    assert text.startswith("my runs")
    assert "gsm8k · 3 models" in text and "imdb · 2 models" in text
    assert "tokens/s" in text and "ms/token" in text and "samples/s" in text
    assert "Overview across tasks" in text
    assert "0.760" in text and "0.639" in text and "★" in text
    assert "ACCn" in text  # wide terminal: the normalised factors are shown
    assert "PER is relative to the models in this table" in " ".join(text.split())


def test_narrow_terminal_drops_factor_columns_but_keeps_names_and_numbers():
    rows = compute_per(
        [
            PerInput("Qwen2.5-0.5B-Instruct · 1 GPU", "gsm8k", 0.31, 1850.5, 0.54, 1480),
            PerInput("Llama-3.1-70B-Instruct · 8 GPUs", "gsm8k", 0.93, 60.1, 16.6, 150000),
        ]
    )
    text = render(rows, width=80)
    assert "ACCn" not in text and "Widen the terminal" in text
    assert "Qwen2.5-0.5B-Instruct · 1 GPU" in text and "Llama-3.1-70B-Instruct · 8 GPUs" in text
    assert "1,850.5" in text and "150,000" in text
    assert "Overview" not in text  # one task


def test_best_row_is_highlighted_and_pareto_rows_starred():
    table = task_table("gsm8k", compute_per(THREE))
    assert [row.style for row in table.rows] == [BEST_STYLE, None, None]
    pareto_cells = list(table.columns[1].cells)
    assert pareto_cells == [PARETO_MARK, PARETO_MARK, ""]


# -- store rows to PER inputs -------------------------------------------------------------------


def finish(
    store: Store,
    run_id: str,
    model: str,
    task: str,
    *,
    gpus: int = 1,
    accuracy: float | None = 0.5,
    throughput: float = 100.0,
    unit: str = "tokens/s",
    latency_ms: float = 10.0,
    memory_mb: float | None = 1000.0,
    metrics: dict[str, Any] | None = None,
    finished_at: float = 1_700_000_000.0,
    **spec: Any,
) -> None:
    options = TaskOptions(**{k: spec.pop(k) for k in ("limit", "num_fewshot", "mode") if k in spec})
    run_spec = RunSpec(
        model=ModelRef(model, f"org/{model}", "hub"), task=task, gpus=gpus, options=options, **spec
    )
    store.begin_run(run_id, run_spec, queued_at=finished_at - 10)
    store.record(
        RunFinished(
            run_id=run_id,
            t=finished_at,
            metrics={
                "accuracy": accuracy,
                "throughput": throughput,
                "throughput_unit": unit,
                "latency_ms": latency_ms,
                "peak_mem_mb": memory_mb,
                "mode": "loglikelihood" if unit == "samples/s" else "generate",
                **(metrics or {}),
            },
        )
    )


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "results.sqlite") as s:
        yield s


def test_inputs_carry_the_store_metrics_and_run_id(store: Store):
    finish(store, "r1", "small", "gsm8k", accuracy=0.4, throughput=900, latency_ms=1.1)
    (given,) = per_inputs_from_results(store.results())
    assert given == PerInput(
        model="small",
        task="gsm8k",
        accuracy=0.4,
        throughput=900.0,
        latency_ms=1.1,
        memory_mb=1000.0,
        energy_j=None,
        key="r1",
        throughput_unit="tokens/s",
    )


def test_model_at_several_gpu_counts_gets_the_count_in_its_label(store: Store):
    finish(store, "r1", "big", "gsm8k", gpus=1)
    finish(store, "r2", "big", "gsm8k", gpus=2)
    finish(store, "r3", "big", "imdb", gpus=2)
    finish(store, "r4", "small", "gsm8k", gpus=1)
    labels = {(i.model, i.task) for i in per_inputs_from_results(store.results())}
    assert labels == {
        ("big · 1 GPU", "gsm8k"),
        ("big · 2 GPUs", "gsm8k"),
        ("big · 2 GPUs", "imdb"),
        ("small", "gsm8k"),
    }


def test_different_settings_on_one_task_are_told_apart(store: Store):
    finish(store, "r1", "m", "gsm8k", dtype="bfloat16")
    finish(store, "r2", "m", "gsm8k", dtype="float32")
    finish(store, "r3", "m", "imdb", metrics={"data_source": "sample"})
    finish(store, "r4", "m", "imdb", data_dir="/data", metrics={"data_source": "data_dir"})
    labels = {(i.model, i.task) for i in per_inputs_from_results(store.results())}
    # what varies for a model on one task is named on all of its rows, so labels match across
    # tasks; a setting the run does not record (data source of r1, r2) is left out
    assert labels == {
        ("m · bfloat16", "gsm8k"),
        ("m · float32", "gsm8k"),
        ("m · auto · sample data", "imdb"),
        ("m · auto · data_dir data", "imdb"),
    }


def test_task_measured_in_two_modes_is_split(store: Store):
    finish(store, "r1", "m", "arc_easy", unit="tokens/s", mode="generate")
    finish(store, "r2", "n", "arc_easy", unit="samples/s", mode="loglikelihood")
    tasks = {i.task for i in per_inputs_from_results(store.results())}
    assert tasks == {"arc_easy (generate)", "arc_easy (loglikelihood)"}


def test_energy_is_per_unit_of_work_when_known(store: Store):
    finish(store, "r1", "m", "gsm8k", metrics={"energy_j": 50.0, "energy_per_token_j": 0.25})
    finish(store, "r2", "n", "imdb", unit="samples/s", metrics={"energy_j": 8.0})
    energy = {i.model: i.energy_j for i in per_inputs_from_results(store.results())}
    assert energy == {"m": 0.25, "n": 8.0}


def test_results_missing_a_metric_are_left_out_with_a_note(store: Store):
    finish(store, "r1", "m", "gsm8k")
    finish(store, "r2", "n", "gsm8k", memory_mb=None)
    built = build_per_inputs(store.results())
    assert [i.model for i in built.inputs] == ["m"]
    assert built.notes == ["left out n · gsm8k · 1 GPU (run r2): no memory_mb"]


def test_results_on_sample_items_come_with_a_note(store: Store):
    finish(store, "r1", "m", "imdb", metrics={"data_source": "sample"})
    finish(store, "r2", "n", "imdb", metrics={"data_source": "hub"})
    notes = build_per_inputs(store.results()).notes
    assert notes == [
        "1 result used slmtui's embedded sample items, not the benchmark data: m on imdb"
    ]


# -- slmtui report --------------------------------------------------------------------------


def report(capsys, db: Path, *args: str) -> tuple[int, str, str]:
    code = main(["report", "--db", str(db), *args])
    out, err = capsys.readouterr()
    return code, out, err


def fill(store: Store) -> None:
    finish(store, "a1", "A", "gsm8k", accuracy=0.80, throughput=150, latency_ms=8, memory_mb=1200)
    finish(store, "b1", "B", "gsm8k", accuracy=0.60, throughput=250, latency_ms=4, memory_mb=800)
    finish(store, "c1", "C", "gsm8k", accuracy=0.50, throughput=50, latency_ms=12, memory_mb=2000)
    finish(store, "a2", "A", "imdb", accuracy=0.9, throughput=20, unit="samples/s")
    finish(store, "b2", "B", "imdb", accuracy=0.7, throughput=30, unit="samples/s")


def test_report_recomputes_per_over_the_store(tmp_path: Path, store: Store, capsys):
    fill(store)
    code, out, _ = report(capsys, store.path, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    per = {(r["model"], r["task"]): float(r["per"]) for r in rows}
    assert per["B", "gsm8k"] == pytest.approx(0.759836, abs=1e-6)
    assert per["A", "gsm8k"] == pytest.approx(0.638943, abs=1e-6)
    assert len(rows) == 5


def test_report_filters_change_the_set_and_the_per(tmp_path: Path, store: Store, capsys):
    fill(store)
    code, out, _ = report(capsys, store.path, "--format", "json", "--model", "A", "--model", "C")
    assert code == 0
    data = json.loads(out)["rows"]
    # without B on gsm8k: A is best on every factor -> PER 1, C 0; A alone on imdb -> 1
    assert {(d["model"], d["task"]): d["per"] for d in data} == {
        ("A", "gsm8k"): 1.0,
        ("C", "gsm8k"): 0.0,
        ("A", "imdb"): 1.0,
    }
    code, out, _ = report(capsys, store.path, "--format", "json", "--task", "imdb")
    assert {d["task"] for d in json.loads(out)["rows"]} == {"imdb"}


def test_report_table(tmp_path: Path, store: Store, capsys):
    fill(store)
    code, out, _ = report(capsys, store.path)
    assert code == 0
    assert f"5 results from {store.path}" in out
    assert "gsm8k · 3 models" in out and "Overview across tasks" in out


def test_report_unknown_filter_suggests_what_the_store_holds(store: Store, capsys):
    fill(store)
    code, out, err = report(capsys, store.path, "--task", "gsm9k")
    assert (code, out) == (2, "")
    assert err == (
        f"slmtui: error: --task 'gsm9k': no stored results for this task in {store.path} "
        "(did you mean 'gsm8k'?)\n"
    )
    code, _, err = report(capsys, store.path, "--model", "zzz")
    assert code == 2
    assert "--model 'zzz': no stored results for this model" in err
    assert "stored: 'A', 'B' or 'C'" in err


def test_report_on_an_empty_store_says_so(tmp_path: Path, store: Store, capsys):
    code, out, err = report(capsys, store.path)
    assert code == 0 and err == ""
    assert out.strip() == f"No finished runs in {store.path} yet. Run `slmtui run` to make some."


def test_report_without_a_store_creates_nothing(tmp_path: Path, capsys):
    db = tmp_path / "none" / "results.sqlite"
    code, out, _ = report(capsys, db, "--format", "csv")
    assert code == 0 and out == ""
    assert not db.parent.exists()


def test_report_db_before_the_command(tmp_path: Path, store: Store, capsys):
    fill(store)
    code = main(["--db", str(store.path), "report", "--format", "csv"])
    assert code == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 5


# -- PER-rel beside PER ---------------------------------------------------------------------------


def test_report_ranks_by_per_rel_on_request_and_says_so(tmp_path: Path, store: Store, capsys):
    # two models, each worst on something: the study's PER is 0 for both (see test_per.py TWO)
    finish(store, "x", "X", "gsm8k", accuracy=0.5, throughput=100, latency_ms=10, memory_mb=1000)
    finish(store, "y", "Y", "gsm8k", accuracy=0.4, throughput=200, latency_ms=4, memory_mb=600)
    code, out, _ = report(capsys, store.path, "--rank-by", "per-rel")
    text = " ".join(out.split())
    assert code == 0
    assert "ranked by PER-rel" in text and "Ranked by PER-rel" in text
    assert "Y leads X: latency decides (2.50× better" in text
    assert "a model worst on any factor gets 0" in text  # why the study's PER is 0 here
    assert text.index(" Y ") < text.index(" X ")
    code, out, _ = report(capsys, store.path, "--format", "json", "--rank-by", "per-rel")
    document = json.loads(out)
    assert document["ranked_by"] == "per_rel"
    assert [(r["model"], r["rank_rel"], r["per"]) for r in document["rows"]] == [
        ("Y", 1, 0.0),
        ("X", 2, 0.0),
    ]


def test_report_ranks_a_small_set_by_per_rel_by_default_and_says_why(store: Store, capsys):
    # the console's Rank tab and the headless run pick PER-rel for two models; so does report
    finish(store, "x", "X", "gsm8k", accuracy=0.5, throughput=100, latency_ms=10, memory_mb=1000)
    finish(store, "y", "Y", "gsm8k", accuracy=0.4, throughput=200, latency_ms=4, memory_mb=600)
    why = "automatic: fewer than 4 models per task"
    code, out, _ = report(capsys, store.path)
    text = " ".join(out.split())
    assert code == 0
    assert "ranked by PER-rel" in text and f"Ranked by PER-rel ({why}; --rank-by" in text
    assert text.index(" Y ") < text.index(" X ")
    code, out, _ = report(capsys, store.path, "--format", "json")
    document = json.loads(out)
    assert (document["ranked_by"], document["ranked_by_reason"]) == ("per_rel", why)
    assert document["per_options"]["rank_by"] == "per_rel"
    assert [(r["model"], r["rank_rel"]) for r in document["rows"]] == [("Y", 1), ("X", 2)]
    code, out, _ = report(capsys, store.path, "--format", "markdown")
    assert f"Ranked by PER-rel ({why})." in out
    code, out, err = report(capsys, store.path, "--format", "csv")
    assert [r["model"] for r in csv.DictReader(io.StringIO(out))] == ["Y", "X"]
    assert f"slmtui: note: rows ranked by PER-rel ({why}; --rank-by)" in err


def test_report_rank_by_flag_wins_over_the_automatic_choice(store: Store, capsys):
    finish(store, "x", "X", "gsm8k", accuracy=0.5, throughput=100, latency_ms=10, memory_mb=1000)
    finish(store, "y", "Y", "gsm8k", accuracy=0.4, throughput=200, latency_ms=4, memory_mb=600)
    code, out, _ = report(capsys, store.path, "--rank-by", "per")
    text = " ".join(out.split())
    assert code == 0
    assert "ranked by PER" in text and "ranked by PER-rel" not in text
    assert "automatic" not in text
    code, out, err = report(capsys, store.path, "--format", "json", "--rank-by", "per")
    document = json.loads(out)
    assert (document["ranked_by"], document["ranked_by_reason"]) == ("per", None)
    code, _, err = report(capsys, store.path, "--format", "csv", "--rank-by", "per-rel")
    assert "note: rows ranked" not in err


def test_report_ranks_four_models_by_the_studys_per_and_says_why(store: Store, capsys):
    for name, acc in (("A", 0.8), ("B", 0.6), ("C", 0.5), ("D", 0.4)):
        finish(store, name.lower(), name, "gsm8k", accuracy=acc, throughput=100 + 50 * acc)
    code, out, _ = report(capsys, store.path, "--format", "json")
    document = json.loads(out)
    assert code == 0
    assert document["ranked_by"] == "per"
    assert document["ranked_by_reason"] == "automatic: 4 or more models on a task"
    assert [r["model"] for r in document["rows"]] == ["A", "B", "C", "D"]


def test_table_has_per_rel_beside_per_at_80_columns():
    text = render(compute_per(THREE), width=80)
    assert "PER-rel" in text and "0.931" in text and "0.669" in text


# -- the column registry ------------------------------------------------------------------


def test_every_view_reads_one_registry_whose_directions_are_pers():
    from slmtui.per import HIGHER_IS_BETTER
    from slmtui.reports import columns

    assert tuple(c.key for c in columns.REGISTRY) == COLUMNS
    assert len(set(COLUMNS)) == len(COLUMNS)
    factor_of = {"accuracy": "accuracy", "throughput": "throughput", "latency_ms": "latency",
                 "memory_mb": "memory", "energy_j": "energy", "co2_g": "co2"}  # fmt: skip
    for key, factor in factor_of.items():
        assert columns.BY_KEY[key].better is HIGHER_IS_BETTER[factor]
    for view in (columns.RANK_TASK_VIEW, columns.TABLE_VIEW, columns.MARKDOWN_VIEW):
        assert set(view) <= set(columns.BY_KEY)
    throughput = columns.BY_KEY["throughput"]
    assert throughput.header("tokens/s") == "THR/GPU tokens/s"
    assert throughput.header("tokens/s", style="table") == "THR\ntokens/s"
    assert throughput.header("tokens/s", style="md") == "THR (tokens/s)"
    assert columns.BY_KEY["latency_ms"].header("samples/s", style="md") == "LAT (ms/sample)"


def test_a_metric_column_reaches_every_export_from_the_stored_metrics(store: Store):
    why = "fast engine: architecture 'gpt2' is not one it is verified on (…); ran plain"
    finish(store, "r1", "a", "gsm8k", metrics={"engine": "plain", "engine_fallback": why})
    finish(store, "r2", "b", "gsm8k", metrics={"engine": "fast", "engine_fallback": None})
    rows = compute_per(build_per_inputs(store.results()).inputs)
    by_model = {r["model"]: r for r in csv.DictReader(io.StringIO(to_csv(rows)))}
    assert by_model["a"]["engine"] == "plain" and by_model["a"]["engine_fallback"] == why
    assert by_model["b"]["engine"] == "fast" and by_model["b"]["engine_fallback"] == ""
    document = json.loads(to_json(rows))
    assert {r["model"]: r["engine"] for r in document["rows"]} == {"a": "plain", "b": "fast"}
    assert document["units"]["engine_fallback"].startswith("why plain ran")


def test_exports_carry_the_per_sequence_latency_of_each_run(store: Store):
    finish(store, "run-a", "a", "gsm8k", metrics={"ttft_p50_ms": 12.5, "ttft_p95_ms": 40.0,
                                                  "itl_p50_ms": 2.0})  # fmt: skip
    finish(store, "run-b", "b", "gsm8k", throughput=200.0, latency_ms=5.0)
    rows = compute_per(build_per_inputs(store.results()).inputs)
    by_model = {r["model"]: r for r in json.loads(to_json(rows))["rows"]}
    assert by_model["a"]["ttft_p50_ms"] == 12.5 and by_model["a"]["itl_p95_ms"] is None
    assert by_model["b"]["ttft_p50_ms"] is None
    table = {r["model"]: r for r in csv.DictReader(io.StringIO(to_csv(rows)))}
    assert (table["a"]["ttft_p95_ms"], table["a"]["itl_p50_ms"]) == ("40", "2")
