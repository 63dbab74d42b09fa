"""Issue 2's bad-input list, through the real CLI: one line naming the input, the place and what
is allowed; exit code 2; nothing written to the store (not even an empty file); no worker starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmtui import cli
from slmtui.scheduler import Scheduler

MODEL = '[[models]]\nsource = "smollm2-135m-instruct"\n'
GSM8K_DOC = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Own data dir, an offline empty hub cache, a GPU-less box, and no worker may start."""
    monkeypatch.setenv("SLMTUI_DATA_DIR", str(tmp_path / "slmtui-data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("slmtui.reports.headless.detect_gpus", lambda: [])

    def no_worker(self: Scheduler, specs: object) -> None:
        raise AssertionError("a worker would start: the bad input was not caught up front")

    monkeypatch.setattr(Scheduler, "submit", no_worker)


def run_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; assert exit 2, one line on stderr, nothing on stdout, no store; the line."""
    db = tmp_path / "results.sqlite"
    code = cli.main([*argv, "--db", str(db)] if argv[0] == "run" else argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert err.startswith("slmtui: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert not db.exists() and not list(tmp_path.glob("results.sqlite*"))
    assert not (tmp_path / "slmtui-data").exists()
    return err.removeprefix("slmtui: error: ").rstrip("\n")


def write_gsm8k(path: Path, docs: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture
def bad_data(tmp_path: Path) -> None:
    """gsm8k.jsonl beside the profile (line 2 lacks the answer) and a data dir (line 3 broken)."""
    write_gsm8k(tmp_path / "gsm8k.jsonl", [GSM8K_DOC, {"question": "no answer here"}])
    path = write_gsm8k(tmp_path / "data" / "gsm8k" / "dev.jsonl", [GSM8K_DOC, GSM8K_DOC])
    with path.open("a", encoding="utf-8") as f:
        f.write('{"question": "cut off", "answ\n')


CSV_HEADER = "model,task,accuracy,throughput,latency_ms,memory_mb\n"

CASES = [
    # (id, command, profile TOML or CSV text, extra arguments, parts of the expected line)
    (
        "malformed TOML",
        "run",
        MODEL + "[tasks.gsm8k]\nlimit = \n",
        [],
        ("p.toml: TOML syntax error", "line 4"),
    ),
    (
        "unknown key, with a suggestion",
        "run",
        "[settings]\nbatchsize = 8\n" + MODEL + "[tasks.gsm8k]\n",
        [],
        ("p.toml: [settings] unknown key 'batchsize' (did you mean 'batch_size'?)",),
    ),
    (
        "wrong type",
        "run",
        MODEL + '[tasks.gsm8k]\nlimit = "five"\n',
        [],
        ('p.toml: [tasks.gsm8k] limit must be an integer >= 1, got "five"',),
    ),
    (
        "unknown task",
        "run",
        MODEL + "[tasks.gsm9k]\n",
        [],
        ("p.toml: [tasks.gsm9k] unknown task 'gsm9k' (did you mean 'gsm8k'?)",),
    ),
    (
        "more GPUs than the box has",
        "run",
        "[settings]\ngpus = [2]\n" + MODEL + "[tasks.gsm8k]\n",
        [],
        ("model smollm2-135m-instruct (gsm8k): 2 GPUs asked, this box has none",),
    ),
    (
        "a hub model not in the cache, offline",
        "run",
        '[[models]]\nsource = "Qwen/Qwen2.5-0.5B-Instruct"\n[tasks.imdb]\n',
        [],
        (
            "p.toml: model 'Qwen/Qwen2.5-0.5B-Instruct' is not in the local Hugging Face cache "
            "and HF_HUB_OFFLINE is set",
            "smollm2-135m-instruct",
            ".gguf file",
        ),
    ),
    (
        "a model that is no known form",
        "run",
        '[[models]]\nsource = "smollm3"\n[tasks.imdb]\n',
        [],
        ("[[models]] #1 source: model 'smollm3' is not a catalog name",),
    ),
    (
        "data file with a wrong field",
        "run",
        MODEL + '[tasks.gsm8k]\ndata_file = "gsm8k.jsonl"\n',
        [],
        ("gsm8k.jsonl line 2: field 'answer'",),
    ),
    (
        "data dir with a line that is not JSON",
        "run",
        MODEL + "[tasks.gsm8k]\n",
        ["--data-dir", "{tmp}/data"],
        ("data/gsm8k/dev.jsonl line 3: not valid JSON",),
    ),
    (
        "per: missing columns",
        "per",
        "model,task,accuracy,throughput\nA,gsm8k,1,2\n",
        [],
        ("r.csv: missing columns 'latency_ms' and 'memory_mb'; needs model, task",),
    ),
    (
        "per: a non-numeric cell",
        "per",
        CSV_HEADER + "A,gsm8k,0.5,100,5,900\nB,gsm8k,0.6,fast,5,900\n",
        [],
        ("r.csv line 3, column 'throughput': 'fast' is not a number",),
    ),
]


@pytest.mark.parametrize(
    ("command", "text", "extra", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    command: str,
    text: str,
    extra: list[str],
    expected: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bad_data: None,
) -> None:
    name = "p.toml" if command == "run" else "r.csv"
    (tmp_path / name).write_text(text, encoding="utf-8")
    argv = [command, str(tmp_path / name)]
    if command == "run":
        argv += ["--headless", *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    message = run_bad(tmp_path, capsys, argv)
    for part in expected:
        assert part in message, message
