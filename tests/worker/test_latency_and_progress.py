"""Per-sequence latency under continuous batching (hand-computed on a fake clock), its p50/p95
metrics, live token counts while generating, and the loading steps a run names."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from slmtui.tasks.base import GenerateRequest, GenerateResponse
from slmtui.worker.engines.base import Completed
from slmtui.worker.engines.fast.batching import LoopSettings, PrefillChunk, run_continuous
from slmtui.worker.runner import Heartbeat, LiveState, Telemetry, latency_metrics, percentile

TOKEN = 7


class FakeDecoder:
    """A slot decoder on a fake clock: a prefill forward costs 1 s, a decode step 0.5 s."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.t = 0.0
        self.events: list[str] = []

    def prefill(self, chunks: Sequence[PrefillChunk]) -> None:
        self.t += 1.0

    def decode(self, rows: int, steps: int) -> None:
        self.t += 0.5 * steps

    def fetch(self, rows: int, steps: int, firsts: Sequence[int]) -> tuple[list, list]:
        return [TOKEN] * len(firsts), [[TOKEN] * steps for _ in range(rows)]

    def stop_rows(self, rows: Sequence[int]) -> None:
        pass

    def move_rows_to_front(self, rows: Sequence[int]) -> None:
        self.events.append(f"move {list(rows)}")

    def synchronize(self) -> None:
        pass

    def ready_bucket(self, n: int) -> int:
        return 1 if n <= 1 else self.max_batch

    def is_finished(self, request: GenerateRequest, tokens: list[int]) -> bool:
        return len(tokens) >= request.max_new_tokens

    def finish(self, request: GenerateRequest, tokens: list[int]) -> tuple[str, int]:
        n = min(len(tokens), request.max_new_tokens)
        return "x" * n, n


def test_ttft_and_inter_token_latency_per_sequence_on_a_fake_clock():
    """Two slots, check every 4 steps, prompts chunked at 4 tokens:

    t=0  A (7 new) and B (1 new) take slots; one prefill -> t=1: both first tokens at 1.
         A decodes 4 steps -> t=3 (tokens at 1.5, 2, 2.5, 3). B is done: TTFT 1, no ITL.
    t=3  C (6-token prompt, 2 new) takes B's slot; its first chunk -> t=4; A decodes its last
         2 steps -> t=5 (4.5, 5). A is done: TTFT 1, ITL (5 - 1) / 6.
    t=5  nothing waits: C moves to the front; its last chunk -> t=6 (first token), one step
         -> t=6.5. C: TTFT 6 - 3 = 3, ITL 0.5.
    """
    decoder = FakeDecoder(max_batch=2)
    requests = [GenerateRequest("A", 7), GenerateRequest("B", 1), GenerateRequest("C", 2)]
    prompts = [[1, 2, 3], [1, 2], [1, 2, 3, 4, 5, 6]]
    counted: list[int] = []
    done: list[tuple[str, Completed]] = []
    for index, completed in run_continuous(
        decoder,
        requests,
        prompts,
        [0, 1, 2],
        LoopSettings(check_every=4, chunk_tokens=4),
        on_tokens=counted.append,
        clock=lambda: decoder.t,
    ):
        done.append((requests[index].prompt, completed))
        counted.append(-1)  # a completion, in order with the token counts
    by_name = dict(done)
    assert [name for name, _ in done] == ["B", "A", "C"]
    assert by_name["A"].ttft_s == 1.0 and by_name["A"].itl_s == pytest.approx(4 / 6)
    assert by_name["B"].ttft_s == 1.0 and by_name["B"].itl_s is None
    assert by_name["C"].ttft_s == 3.0 and by_name["C"].itl_s == 0.5
    assert [c.tokens_out for _, c in done] == [1, 7, 2]
    assert decoder.events == ["move [1]"]
    # tokens are counted as they come, before the completions they belong to
    assert counted == [2 + 4, -1, 2, -1, 1 + 1, -1]


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([400.0, 100.0, 300.0, 200.0], 50) == 250.0
    assert percentile([100.0, 200.0, 300.0, 400.0], 95) == pytest.approx(385.0)  # 300 + .85*100


def test_latency_metrics_p50_p95_in_ms_leave_out_missing_values():
    def done(ttft_s: float | None, itl_s: float | None) -> Completed:
        return Completed(0, GenerateResponse("", 2), 3, 2, ttft_s, itl_s=itl_s)

    metrics = latency_metrics([done(1.0, 4 / 6), done(1.0, None), done(3.0, 0.5)])
    assert metrics["ttft_p50_ms"] == pytest.approx(1000.0)
    assert metrics["ttft_p95_ms"] == pytest.approx(2800.0)  # 1000 + 0.9 * 2000
    assert metrics["itl_p50_ms"] == pytest.approx(583.333, abs=1e-3)  # (500 + 666.67) / 2
    assert metrics["itl_p95_ms"] == pytest.approx(658.333, abs=1e-3)  # 500 + .95 * 166.67
    assert latency_metrics([done(None, None)]) == dict.fromkeys(metrics)


def test_live_tokens_per_second_come_from_the_engine_before_any_sample_finishes():
    class Engine:
        live_tokens = 300

    state = LiveState(phase="measuring", total=10, measure_started=time.perf_counter() - 2.0)
    state.engine = Engine()  # type: ignore[assignment]
    progress = Heartbeat("r1", state, lambda e: None, Telemetry()).progress()
    assert progress.done == 0
    assert progress.tokens_per_s == pytest.approx(150, rel=0.05)
    assert progress.ms_per_token == pytest.approx(1000 * 2.0 / 300, rel=0.05)


def test_the_fast_engine_counts_tokens_while_rows_are_still_running(tiny_model: tuple[Any, Any]):
    from slmtui.worker.engines.fast import FastEngine

    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size=2, check_every_tokens=4)
    answers = engine.generate([GenerateRequest("abc", 40), GenerateRequest("de", 40)])
    first = next(answers)  # both rows ran side by side: the other one's tokens are counted
    assert first.tokens_out == 40 and engine.live_tokens >= 80
    list(answers)


def test_loading_names_its_steps(tiny_model_dir: Path):
    from slmtui.spec import ModelRef
    from slmtui.worker.loading import load_model

    steps: list[str] = []
    load_model(
        ModelRef("tiny", str(tiny_model_dir), "local"), dtype="float32", on_step=steps.append
    )
    assert steps == ["loading weights", "loading tokenizer"]


def test_warmup_and_loading_steps_reach_the_progress_event():
    state = LiveState(phase="loading", step="converting GGUF (one time)")
    progress = Heartbeat("r1", state, lambda e: None, Telemetry()).progress()
    assert progress.phase == "loading" and progress.step == "converting GGUF (one time)"
    from slmtui.protocol import RunProgress, parse_event

    again = parse_event(progress.to_json())
    assert isinstance(again, RunProgress) and again.step == progress.step
