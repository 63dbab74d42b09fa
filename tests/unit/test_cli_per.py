"""`slmtui per FILE.csv`: PER of published or own results, through the real CLI entry point."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from slmtui.cli import main

HEADER = "model,task,accuracy,throughput,latency_ms,memory_mb"
# The 3-model example of test_per.py (PER B 0.759836, A 0.638943, C 0), plus a column to ignore.
GOOD = """model,task,accuracy,throughput,latency_ms,memory_mb,notes
A,gsm8k,0.80,150,8,1200,first
B,gsm8k,0.60,250,4,800,
C,gsm8k,0.50,50,12,2000,x
"""


def write(tmp_path: Path, text: str, name: str = "results.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_output_ranks_the_models(tmp_path: Path, capsys):
    code, out, err = run(capsys, "per", str(write(tmp_path, GOOD)))
    assert code == 0 and err == ""
    assert "gsm8k" in out and "0.760" in out and "0.639" in out
    assert out.index(" B ") < out.index(" A ") < out.index(" C ")
    assert "PER is relative to the models in this table" in out


def test_csv_output_keeps_model_task_and_adds_per(tmp_path: Path, capsys):
    code, out, _ = run(capsys, "per", str(write(tmp_path, GOOD)), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {"model", "task", "per", "pareto", "acc_n", "thr_n", "lat_n", "mem_n"} <= set(rows[0])
    assert "notes" not in rows[0]
    per = {r["model"]: float(r["per"]) for r in rows}
    assert per["B"] == pytest.approx(0.759836, abs=1e-6)
    assert per["A"] == pytest.approx(0.638943, abs=1e-6)
    assert per["C"] == 0.0
    assert [r["pareto"] for r in rows] == ["true", "true", "false"]
    assert all(r["task"] == "gsm8k" for r in rows)


def test_json_output_to_a_file(tmp_path: Path, capsys):
    target = tmp_path / "per.json"
    args = ("per", str(write(tmp_path, GOOD)), "--format", "json", "-o", str(target))
    code, out, err = run(capsys, *args)
    assert code == 0 and out == ""
    assert "wrote 3 rows" in err
    data = json.loads(target.read_text())["rows"]
    assert [d["model"] for d in data] == ["B", "A", "C"]
    assert data[0]["rank"] == 1 and data[0]["pareto"] is True


def test_per_ranks_a_csv_by_the_studys_per_unless_asked(tmp_path: Path, capsys):
    # three models would rank by PER-rel in report; a CSV of published numbers keeps the study's
    path = str(write(tmp_path, GOOD))
    code, out, _ = run(capsys, "per", path, "--format", "json")
    document = json.loads(out)
    assert code == 0 and (document["ranked_by"], document["ranked_by_reason"]) == ("per", None)
    code, out, _ = run(capsys, "per", path, "--format", "json", "--rank-by", "per-rel")
    assert json.loads(out)["ranked_by"] == "per_rel"


def test_table_output_to_a_file_has_no_colour_codes(tmp_path: Path, capsys):
    target = tmp_path / "per.txt"
    code, _, _ = run(capsys, "per", str(write(tmp_path, GOOD)), "-o", str(target))
    text = target.read_text()
    assert code == 0 and "0.760" in text and "\x1b[" not in text


def test_missing_columns_are_listed(tmp_path: Path, capsys):
    path = write(tmp_path, "model,task,accuracy,throughput\nA,gsm8k,1,2\n")
    code, out, err = run(capsys, "per", str(path))
    assert code == 2 and out == ""
    assert err == (
        f"slmtui: error: {path}: missing columns 'latency_ms' and 'memory_mb'; needs model, "
        "task, accuracy, throughput, latency_ms, memory_mb (optional: energy_j, throughput_unit)\n"
    )


def test_bad_cell_names_file_line_and_column(tmp_path: Path, capsys):
    path = write(tmp_path, f"{HEADER}\nA,gsm8k,0.5,100,5,900\nB,gsm8k,0.6,abc,5,900\n")
    code, out, err = run(capsys, "per", str(path))
    assert (code, out) == (2, "")
    assert err == f"slmtui: error: {path} line 3, column 'throughput': 'abc' is not a number\n"


def test_empty_and_negative_cells_are_rejected(tmp_path: Path, capsys):
    path = write(tmp_path, f"{HEADER}\nA,gsm8k,0.5,100,,900\n")
    code, _, err = run(capsys, "per", str(path))
    assert code == 2
    assert f"{path} line 2, column 'latency_ms': empty cell" in err
    path = write(tmp_path, f"{HEADER}\nA,gsm8k,0.5,100,5,-1\n")
    code, _, err = run(capsys, "per", str(path))
    assert code == 2
    assert f"{path} line 2, column 'memory_mb': '-1' is negative" in err


def test_line_numbers_count_quoted_multiline_cells(tmp_path: Path, capsys):
    text = f'{HEADER},notes\nA,gsm8k,0.5,100,5,900,"two\nlines"\nB,gsm8k,x,100,5,900,\n'
    path = write(tmp_path, text)
    _, _, err = run(capsys, "per", str(path))
    assert f"{path} line 4, column 'accuracy': 'x' is not a number" in err


def test_duplicate_model_task_rows_are_an_error(tmp_path: Path, capsys):
    path = write(tmp_path, f"{HEADER}\nA,gsm8k,0.5,100,5,900\nA,gsm8k,0.6,100,5,900\n")
    code, _, err = run(capsys, "per", str(path))
    assert code == 2
    assert "line 3: model 'A' on task 'gsm8k' again (first on line 2)" in err


def test_missing_file_and_empty_file(tmp_path: Path, capsys):
    code, _, err = run(capsys, "per", str(tmp_path / "nope.csv"))
    assert code == 2 and "nope.csv: no such file" in err
    code, _, err = run(capsys, "per", str(write(tmp_path, "")))
    assert code == 2 and "empty file" in err
    code, _, err = run(capsys, "per", str(write(tmp_path, HEADER + "\n")))
    assert code == 2 and "no data rows" in err


def test_headers_match_ignoring_case_and_spaces_and_bom(tmp_path: Path, capsys):
    text = "\ufeffModel, Task ,ACCURACY,Throughput,Latency_ms,Memory_MB\nA,imdb,0.9,10,1,1\n"
    code, out, _ = run(capsys, "per", str(write(tmp_path, text)), "--format", "csv")
    assert code == 0
    assert next(csv.DictReader(io.StringIO(out)))["per"] == "1"


def test_energy_and_weights_options(tmp_path: Path, capsys):
    text = f"{HEADER},energy_j\nP,imdb,0.5,10,1,10,2\nQ,imdb,0.5,10,1,10,4\n"
    path = str(write(tmp_path, text))
    code, out, _ = run(capsys, "per", path, "--energy", "--format", "json")
    assert code == 0
    assert {d["model"]: d["per"] for d in json.loads(out)["rows"]} == {"P": 1.0, "Q": 0.0}
    code, out, _ = run(capsys, "per", path, "--format", "json", "--weight", "accuracy=2")
    assert code == 0 and {d["per"] for d in json.loads(out)["rows"]} == {1.0}
    code, _, err = run(capsys, "per", path, "--weight", "acuracy=2")
    assert code == 2 and "did you mean 'accuracy'" in err


def test_missing_energy_names_the_model(tmp_path: Path, capsys):
    text = f"{HEADER},energy_j\nP,imdb,0.5,10,1,10,2\ncpu,imdb,0.5,10,1,10,\n"
    code, _, err = run(capsys, "per", str(write(tmp_path, text)), "--energy")
    assert code == 2 and "model 'cpu' on task 'imdb' has no energy_j" in err


def test_markdown_output(tmp_path: Path, capsys):
    code, out, _ = run(capsys, "per", str(write(tmp_path, GOOD)), "--format", "markdown")
    assert code == 0
    assert "## gsm8k" in out
    assert "| 1 | B | 0.600 | 250.0 | 4.00 | 800 | 0.760 | 0.931 | accuracy | yes |" in out
    assert "B leads A: latency decides (2.00× better" in out


def test_rank_by_per_rel_and_a_bad_value(tmp_path: Path, capsys):
    path = str(write(tmp_path, GOOD))
    code, out, _ = run(capsys, "per", path, "--rank-by", "per-rel", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    # hand-worked in test_per.py: PER-rel B 0.930605 > A 0.668740 > C 0.359304
    assert code == 0 and [(r["model"], r["rank_rel"]) for r in rows] == [
        ("B", "1"),
        ("A", "2"),
        ("C", "3"),
    ]
    code, _, err = run(capsys, "per", path, "--rank-by", "per_rell")
    assert code == 2 and err.count("\n") == 1
    assert "--rank-by 'per_rell' (did you mean 'per-rel'?); allowed: 'per' or 'per-rel'" in err
