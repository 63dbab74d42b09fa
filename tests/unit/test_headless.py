"""`slmtui run --headless` with fake workers: exit codes, resume, PER tables, failures, --db."""

from __future__ import annotations

import argparse
import io
import re
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from slmtui import profile as profiles
from slmtui.board import RunState
from slmtui.cli import main
from slmtui.profile import Settings
from slmtui.reports.headless import progress_table, run_headless
from slmtui.scheduler import worker_command
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.store import Store

FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from slmtui.protocol import RunFinished, RunProgress, RunStarted, SampleScored

    spec = json.loads(sys.argv[sys.argv.index("--spec-json") + 1])
    run_id = sys.argv[sys.argv.index("--run-id") + 1]
    name = spec["model"]["name"]
    emit = lambda e: print(e.to_json(), flush=True)
    emit(RunStarted(run_id, spec=spec, pid=os.getpid()))
    emit(RunProgress(run_id, phase="measuring", done=1, total=2, tokens_per_s=10.0,
                     ms_per_token=100.0, mem_mb=300.0))
    if name.startswith("crash"):
        print("RuntimeError: weights file is truncated", file=sys.stderr, flush=True)
        sys.exit(1)
    if name.startswith("hang"):
        time.sleep(60)
    emit(SampleScored(run_id, index=0, item_id="a", prompt="p", output="4", gold="4", score=1.0))
    fast = name.startswith("fast")
    emit(RunFinished(run_id, metrics={
        "accuracy": 0.4 if fast else 0.8, "throughput": 200.0 if fast else 50.0,
        "throughput_unit": "tokens/s", "latency_ms": 5.0 if fast else 20.0,
        "peak_mem_mb": 300.0 if fast else 900.0, "n_samples": 2, "mode": "generate",
        "data_source": "sample"}))
    """
)


def spec(model: str, task: str = "gsm8k", gpus: int = 0) -> RunSpec:
    return RunSpec(
        model=ModelRef(name=model, source=f"/m/{model}", kind="local"),
        task=task,
        options=TaskOptions(limit=2),
        gpus=gpus,
    )


class FakeProfile:
    """Stands in for a loaded profile: its runs are built here, not from TOML."""

    name = "fake"
    settings = Settings()

    def __init__(self, specs: list[RunSpec]) -> None:
        self.specs = specs

    def runs(self, limit=None, data_dir=None, gpus_available=None) -> list[RunSpec]:
        out = [s.with_limit(limit) if limit else s for s in self.specs]
        return [replace(s, data_dir=str(data_dir)) if data_dir else s for s in out]


@pytest.fixture
def env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SLMTUI_DATA_DIR", str(tmp_path / "data"))
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)

    def factory(s: RunSpec, run_id: str, gpu_ids):
        argv, environ = worker_command(s, run_id, gpu_ids)
        return [sys.executable, str(fake), *argv[argv.index("--spec-json") :]], environ

    def use(specs: list[RunSpec]) -> None:
        monkeypatch.setattr(profiles, "load_profile", lambda path: FakeProfile(specs))

    class Env:
        db = tmp_path / "results.sqlite"

        @staticmethod
        def run(*flags: str) -> tuple[int, str, str]:
            parser_args = argparse.Namespace(
                command="run",
                profile="fake.toml",
                headless=True,
                limit=None,
                rerun="--rerun" in flags,
                db=str(Env.db),
                data_dir=None,
                timeout=float(flags[flags.index("--timeout") + 1])
                if "--timeout" in flags
                else None,
            )
            out, err = io.StringIO(), io.StringIO()
            code = run_headless(
                parser_args,
                command_factory=factory,
                inventory=[],
                out=Console(file=out, width=200),
                err=Console(file=err, width=200),
            )
            return code, out.getvalue(), err.getvalue()

    Env.use = staticmethod(use)
    return Env


def test_all_runs_finish_and_per_tables_are_printed(env) -> None:
    env.use([spec("fast-model"), spec("slow-model"), spec("fast-model", task="imdb")])
    code, out, err = env.run()
    assert code == 0
    assert "3 runs, 3 to run" in err
    assert "✓ fast-model · gsm8k · CPU: acc 0.400, 200.0 tokens/s, 5.0 ms/token, 300 MB" in err
    assert "gsm8k · 2 models" in out and "imdb · 1 model" in out
    assert "Overview across tasks" in out
    # Each model is the worst of two on some factor, so both PERs are 0 (a zero factor zeroes
    # the geometric mean).
    assert "0.000" in out
    # so, two models a task, PER-rel ranks, and the note says it was chosen and why
    assert "Ranked by PER-rel (automatic: fewer than 4 models per task;" in " ".join(out.split())
    with Store(env.db) as store:
        assert sorted(r.model for r in store.results()) == [
            "fast-model",
            "fast-model",
            "slow-model",
        ]


def test_a_second_run_resumes_and_rerun_runs_again(env) -> None:
    env.use([spec("fast-model"), spec("slow-model")])
    assert env.run()[0] == 0
    code, out, err = env.run()
    assert code == 0
    assert "2 runs, 0 to run, 2 already stored" in err
    assert "gsm8k · 2 models" in out  # the stored results are still shown
    code, _, err = env.run("--rerun")
    assert code == 0 and "2 runs, 2 to run" in err
    with Store(env.db) as store:
        assert len(store.runs()) == 4 and len(store.results()) == 2


def test_a_failed_run_gives_exit_code_1_and_is_listed(env) -> None:
    env.use([spec("crash-model"), spec("fast-model")])
    code, out, _ = env.run()
    assert code == 1
    assert "1 run(s) did not finish" in out
    assert "crash-model · gsm8k · CPU" in out
    assert "crashed: worker exited with code 1 without a result" in out
    assert "RuntimeError: weights file is truncated" in out
    assert "gsm8k · 1 model" in out  # the run that finished is still ranked


def test_timeout_flag_applies_to_every_run(env) -> None:
    env.use([spec("hang-model")])
    code, out, _ = env.run("--timeout", "0.5")
    assert code == 1
    assert "timeout: no result within the run's timeout of 0.5 s" in out


def test_too_many_gpus_is_a_user_error_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(profiles, "load_profile", lambda path: FakeProfile([spec("big", gpus=4)]))
    monkeypatch.setattr("slmtui.reports.headless.detect_gpus", lambda: [])
    db = tmp_path / "r.sqlite"
    code = main(["run", "p.toml", "--headless", "--db", str(db)])
    assert code == 2
    assert "model big (gsm8k): 4 GPUs asked" in capsys.readouterr().err
    assert not db.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--limit", "0"], "--limit 0: must be an integer >= 1"),
        (["--timeout", "-1"], "--timeout -1: must be a number of seconds > 0"),
        (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir: no such directory"),
    ],
)
def test_bad_flags_are_user_errors(tmp_path, capsys, flags, message) -> None:
    db = tmp_path / "r.sqlite"
    assert main(["run", "--headless", "--db", str(db), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists()


def test_progress_table_shows_each_run() -> None:
    from slmtui.protocol import RunProgress

    running = RunState(
        "r1",
        spec("m"),
        "running",
        queued_at=100.0,
        launched_at=100.0,
        progress=RunProgress(
            "r1",
            phase="measuring",
            done=3,
            total=10,
            tokens_per_s=42.0,
            ms_per_token=23.8,
            mem_mb=512.0,
        ),
    )
    queued = RunState("r2", spec("n"), "queued", queued_at=100.0)
    console = Console(file=io.StringIO(), width=200)
    console.print(progress_table([running, queued], now=112.0))
    text = console.file.getvalue()
    assert "m · gsm8k · CPU" in text and "3/10" in text
    assert "42.0 tokens/s" in text and "23.8 ms/token" in text and "512" in text
    assert "measuring 12s" in text and "queued" in text
    assert "0/2 runs ended" in text


def terminal_text(renderable, width: int) -> str:
    """What a colour terminal of ``width`` columns shows (the bar draws its unfilled part
    there, which a plain file leaves out)."""
    console = Console(
        file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor", record=True
    )
    console.print(renderable)
    return console.export_text()


def long_label_runs() -> list[RunState]:
    from slmtui.protocol import RunProgress

    progress = RunProgress(
        "r2", phase="measuring", done=37, total=120, tokens_per_s=1042.0, ms_per_token=23.8
    )
    return [
        RunState(
            "r1",
            spec("Qwen2.5-0.5B-Instruct"),
            "finished",
            queued_at=100.0,
            launched_at=100.0,
            ended_at=130.0,
            metrics={
                "accuracy": 0.333,
                "throughput": 1234.5,
                "throughput_unit": "tokens/s",
                "latency_ms": 12.3,
                "peak_mem_mb": 1480.0,
                "n_samples": 3,
            },
        ),
        RunState(
            "r2",
            spec("SmolLM2-135M-Instruct", task="squad_v2"),
            "running",
            queued_at=100.0,
            launched_at=100.0,
            progress=progress,
        ),
    ]


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_samples_count_is_whole_beside_its_bar_at_80_columns_and_more(width: int) -> None:
    text = terminal_text(progress_table(long_label_runs(), now=112.0), width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    finished = next(line for line in lines if "✓ finished" in line)
    running = next(line for line in lines if "measuring" in line)
    # each count whole, right of its bar
    assert re.search(r"━ +3/3 ", finished) and re.search(r"[━╸╺] +37/120 ", running)


def test_the_bar_narrows_before_the_label_wraps() -> None:
    text = terminal_text(progress_table(long_label_runs(), now=112.0), 120)
    assert "SmolLM2-135M-Instruct · squad_v2 · CPU" in text  # one line, as before the count
    running = next(line for line in text.splitlines() if "37/120" in line)
    assert 6 <= running.count("━") + running.count("╸") + running.count("╺") < 16


def test_a_cancelled_run_shows_no_speed() -> None:
    from slmtui.protocol import RunProgress

    cancelled = RunState(
        "r1",
        spec("m"),
        "cancelled",
        queued_at=100.0,
        launched_at=100.0,
        ended_at=104.0,
        progress=RunProgress("r1", phase="measuring", done=0, total=10, samples_per_s=0.0),
    )
    console = Console(file=io.StringIO(), width=200)
    console.print(progress_table([cancelled], now=112.0))
    text = console.file.getvalue()
    assert "samples/s" not in text and "✗ cancelled 4s" in text


def test_a_run_that_fell_back_to_plain_says_so_when_it_ends() -> None:
    from slmtui.reports.headless import _ended_line

    fallback = "fast engine: architecture 'gpt2' is not one it is verified on (…); ran plain"
    state = RunState(
        "r1",
        spec("m"),
        "finished",
        queued_at=100.0,
        launched_at=100.0,
        ended_at=110.0,
        metrics={"accuracy": 0.5, "engine": "plain", "engine_fallback": fallback},
    )
    line = _ended_line(state).plain
    assert line.startswith("✓ m · gsm8k · CPU: acc 0.500")
    assert f"ran plain: {fallback}" in line


def test_a_queued_run_draws_an_empty_bar_not_a_full_one() -> None:
    """rich draws a bar of unknown total as complete unless it pulses: a queued run looked
    done. Its bar must draw as a run at 0 of 10 does (only the unfilled part)."""
    from slmtui.protocol import RunProgress
    from slmtui.reports.headless import _samples_cells

    def ansi(run: RunState) -> str:
        console = Console(
            file=io.StringIO(), width=16, force_terminal=True, color_system="truecolor"
        )
        console.print(_samples_cells(run)[0])
        return console.file.getvalue()

    queued = RunState("q", spec("m"), "queued", queued_at=100.0)
    at_zero = RunState(
        "z",
        spec("m"),
        "running",
        queued_at=100.0,
        launched_at=100.0,
        progress=RunProgress("z", phase="measuring", done=0, total=10),
    )
    done = replace(at_zero, progress=RunProgress("z", phase="measuring", done=10, total=10))
    assert ansi(queued) == ansi(at_zero)
    assert ansi(queued) != ansi(done)
