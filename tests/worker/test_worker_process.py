"""The real worker process on the tiny model: event stream, metrics, error classes, cancellation."""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from slmtui.protocol import (
    RunFailed,
    RunFinished,
    RunProgress,
    RunStarted,
    SampleScored,
    parse_event,
)
from slmtui.spec import ModelRef, RunSpec, TaskOptions

METRIC_KEYS = {
    "accuracy", "task_metrics", "throughput", "throughput_unit", "latency_ms", "tokens_per_s",
    "samples_per_s", "ms_per_token", "ms_per_sample", "ttft_ms", "peak_mem_mb", "mem_source",
    "torch_peak_allocated_mb", "torch_peak_reserved_mb", "energy_j", "energy_per_token_j",
    "energy_per_sample_j", "energy_source", "load_s", "warmup_s", "measured_s", "tokens_in",
    "tokens_out", "n_samples", "n_errors", "mode", "engine", "dtype", "batch_size",
    "task_version", "data_source", "data_location", "hardware", "telemetry",
}  # fmt: skip
"""Every key docs/architecture.md lists for RunFinished.metrics."""

HARDWARE_KEYS = {
    "gpu_name",
    "gpu_count",
    "driver",
    "cuda",
    "torch",
    "transformers",
    "python",
    "cpu",
}


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def arc_doc(i: int, answer: str = "B") -> dict[str, Any]:
    return {
        "id": f"arc-{i}",
        "question": f"Which planet is number {i} from the sun?",
        "choices": {"text": ["Mars", "Venus", "Earth", "Saturn"], "label": ["A", "B", "C", "D"]},
        "answerKey": answer,
    }


def gsm8k_doc(i: int) -> dict[str, Any]:
    return {"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"#### {i + 2}"}


def spec_json(model_dir: Path, task: str, data_file: Path, **options: Any) -> str:
    limit = options.pop("limit", None)
    spec = RunSpec(
        model=ModelRef("tiny", str(model_dir), "local"),
        task=task,
        options=TaskOptions(limit=limit, data_file=str(data_file), **options),
        engine=options.pop("engine", "plain"),
        batch_size=2,
    )
    return spec.to_json()


def check_stream(run: Any, n: int) -> dict[str, Any]:
    """started, progress from the loading phase on, n samples, result last; the metrics."""
    events = run.events
    assert run.returncode == 0, run.stderr[-2000:]
    assert isinstance(events[0], RunStarted)
    assert events[0].pid > 0
    assert set(events[0].hardware) >= HARDWARE_KEYS
    assert isinstance(events[1], RunProgress) and events[1].phase == "loading"
    assert isinstance(events[-1], RunFinished)
    assert all(e.run_id == "r1" for e in events)
    phases = [e.phase for e in run.of_type("progress")]
    assert phases == sorted(phases, key=["loading", "warmup", "measuring"].index)
    samples = run.of_type("sample")
    assert sorted(s.index for s in samples) == list(range(n))
    metrics = events[-1].metrics
    assert set(metrics) >= METRIC_KEYS
    assert metrics["n_samples"] == n and metrics["n_errors"] == 0
    assert metrics["engine"] == "plain" and metrics["dtype"] == "float32"
    assert metrics["data_source"] == "file"
    assert metrics["mem_source"] == "rss" and metrics["peak_mem_mb"] > 50
    assert metrics["energy_j"] is None and metrics["telemetry"] == {}
    assert metrics["load_s"] > 0 and metrics["warmup_s"] > 0 and metrics["measured_s"] > 0
    assert metrics["samples_per_s"] == pytest.approx(n / metrics["measured_s"])
    assert metrics["accuracy"] == pytest.approx(sum(s.score for s in samples) / n)
    return metrics


def test_generate_run_streams_started_progress_samples_result(
    worker: Any, tiny_model_dir: Path, tmp_path: Path
):
    data = write_jsonl(tmp_path / "arc.jsonl", [arc_doc(i) for i in range(3)])
    run = worker.run(spec_json(tiny_model_dir, "arc_easy", data, mode="generate"))
    metrics = check_stream(run, 3)
    assert metrics["mode"] == "generate" and metrics["throughput_unit"] == "tokens/s"
    assert metrics["tokens_out"] >= 3  # every item generated at least one token
    # THR = generated tokens/s on the CPU (counts as one GPU); LAT = ms per generated token.
    assert metrics["throughput"] == pytest.approx(metrics["tokens_out"] / metrics["measured_s"])
    assert metrics["latency_ms"] == pytest.approx(
        1000 * metrics["measured_s"] / metrics["tokens_out"]
    )
    assert metrics["ttft_ms"] > 0
    # Prefill apart from decode: every token but each answer's first is decode's.
    assert 0 < metrics["prefill_s"] < metrics["measured_s"]
    assert metrics["prefill_s"] + metrics["decode_s"] == pytest.approx(metrics["measured_s"])
    assert metrics["decode_tokens"] == metrics["tokens_out"] - 3
    samples = run.of_type("sample")
    assert sum(s.extra["tokens_out"] for s in samples) == metrics["tokens_out"]
    for sample in samples:
        assert isinstance(sample, SampleScored)
        assert sample.prompt.endswith("Answer:")  # the full prompt
        assert "Which planet is number" in sample.prompt
        assert sample.gold == "B" and sample.score in (0.0, 1.0)
        assert "\n" not in sample.output  # cut at the task's stop string


def test_loglikelihood_run_reports_samples_per_second(
    worker: Any, tiny_model_dir: Path, tmp_path: Path
):
    data = write_jsonl(tmp_path / "arc.jsonl", [arc_doc(i) for i in range(4)])
    run = worker.run(spec_json(tiny_model_dir, "arc_easy", data, mode="loglikelihood", limit=3))
    metrics = check_stream(run, 3)
    assert metrics["mode"] == "loglikelihood" and metrics["throughput_unit"] == "samples/s"
    assert metrics["throughput"] == pytest.approx(3 / metrics["measured_s"])
    assert metrics["latency_ms"] == pytest.approx(1000 * metrics["measured_s"] / 3)
    assert metrics["tokens_out"] == 0 and metrics["tokens_per_s"] is None
    for sample in run.of_type("sample"):
        assert len(sample.extra["logprobs"]) == 4
        assert sample.output in "ABCD"


def test_stdout_holds_only_events_even_when_libraries_print(
    worker: Any, tiny_model_dir: Path, tmp_path: Path
):
    # Wrap the model load so that it prints from Python and writes to fd 1 directly (as C does).
    wrapper = tmp_path / "noisy_worker.py"
    wrapper.write_text(
        "import os, sys\n"
        "import slmtui.worker.loading as loading\n"
        "real = loading._from_pretrained\n"
        "def noisy(*args, **kwargs):\n"
        "    print('PYTHON NOISE')\n"
        "    os.write(1, b'C NOISE\\n')\n"
        "    return real(*args, **kwargs)\n"
        "loading._from_pretrained = noisy\n"
        "from slmtui.worker.__main__ import main\n"
        "raise SystemExit(main())\n",
        encoding="utf-8",
    )
    data = write_jsonl(tmp_path / "arc.jsonl", [arc_doc(0)])
    spec = spec_json(tiny_model_dir, "arc_easy", data, mode="loglikelihood")
    run = worker.run(spec, prefix=[sys.executable, str(wrapper)])  # parse_event on every line
    assert isinstance(run.events[-1], RunFinished)
    assert "PYTHON NOISE" in run.stderr and "C NOISE" in run.stderr


def failure(run: Any) -> RunFailed:
    assert run.returncode == 1
    assert isinstance(run.events[-1], RunFailed), run.stderr[-2000:]
    assert not run.of_type("result")
    return run.events[-1]


def test_missing_model_directory_is_load_failed(worker: Any, tmp_path: Path):
    data = write_jsonl(tmp_path / "arc.jsonl", [arc_doc(0)])
    error = failure(worker.run(spec_json(tmp_path / "no-such-model", "arc_easy", data)))
    assert error.reason == "load_failed"
    assert "no-such-model" in error.message and "does not exist" in error.message


def test_uncached_hub_model_offline_is_load_failed_naming_what_is_allowed(
    worker: Any, tmp_path: Path
):
    data = write_jsonl(tmp_path / "arc.jsonl", [arc_doc(0)])
    spec = RunSpec(
        model=ModelRef("nope", "slmtui-test/no-such-model", "hub"),
        task="arc_easy",
        options=TaskOptions(data_file=str(data)),
        engine="plain",
    )
    worker.env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    error = failure(worker.run(spec.to_json()))
    assert error.reason == "load_failed"
    assert "slmtui-test/no-such-model" in error.message
    assert "HF_HUB_OFFLINE" in error.message and "smollm2-135m-instruct" in error.message


def test_bad_task_data_is_data_failed(worker: Any, tiny_model_dir: Path, tmp_path: Path):
    data = tmp_path / "arc.jsonl"
    data.write_text(json.dumps(arc_doc(0)) + '\n{"id": "x", "question": 3}\n', encoding="utf-8")
    run = worker.run(spec_json(tiny_model_dir, "arc_easy", data))
    error = failure(run)
    assert error.reason == "data_failed"
    assert "arc.jsonl" in error.message and "line 2" in error.message
    assert [e.type for e in run.events[:1]] == ["started"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{not json", "JSONDecodeError"),
        (json.dumps({"model": {"name": "m", "source": "m", "kind": "hub"}}), "task"),
    ],
)
def test_unreadable_spec_is_bad_spec(worker: Any, spec: str, words: str):
    error = failure(worker.run(spec))
    assert error.reason == "bad_spec" and words in error.message


def test_unknown_task_is_bad_spec(worker: Any, tiny_model_dir: Path, tmp_path: Path):
    spec = RunSpec(model=ModelRef("tiny", str(tiny_model_dir), "local"), task="gsm9k")
    error = failure(worker.run(spec.to_json()))
    assert error.reason == "bad_spec" and "did you mean 'gsm8k'" in error.message


def test_progress_every_second_and_sigterm_cancels_promptly(
    worker: Any, tiny_model_dir: Path, tmp_path: Path
):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [gsm8k_doc(i) for i in range(40)])
    spec = spec_json(tiny_model_dir, "gsm8k", data, num_fewshot=0, max_new_tokens=256)
    proc = worker.start(spec)
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(parse_event(line))
            measuring = [e for e in seen if e.type == "progress" and e.phase == "measuring"]
            if measuring and any(e.type == "sample" for e in seen):
                break
        else:
            pytest.fail("the run ended before it was measuring")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = [parse_event(line) for line in proc.stdout]
        returncode = proc.wait(timeout=10)
        took_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    gaps = [(b.t - a.t, a.type, b.type) for a, b in itertools.pairwise(seen)]
    # The heartbeat is once a second; a stalled one shows gaps of many seconds. The margin is for
    # a box whose two cores are shared with other test runs (a 1.37 s gap was seen there).
    assert max(gaps)[0] < 2.0, max(gaps)
    assert {e.phase for e in seen if e.type == "progress"} >= {"loading", "measuring"}
    assert all(e.total == 40 for e in measuring)
    assert returncode == 1
    assert isinstance(rest[-1], RunFailed) and rest[-1].reason == "cancelled"
    assert not any(e.type == "result" for e in rest)
    assert took_s < 5, took_s
