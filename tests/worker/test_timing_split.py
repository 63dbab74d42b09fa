"""Prefill apart from decode in a run's metrics, on hand-made completions (no model)."""

from __future__ import annotations

import pytest

from slmtui.tasks.base import GenerateResponse
from slmtui.worker.engines.base import Completed
from slmtui.worker.runner import _prefill_decode_split


def answer(index: int, batch: int | None, ttft_s: float, tokens_in: int, tokens_out: int):
    response = GenerateResponse(text="x", tokens_out=tokens_out)
    return Completed(index, response, tokens_in, tokens_out, ttft_s, batch=batch)


def test_each_batch_prefill_counts_once_and_decode_gets_the_rest() -> None:
    completions = [
        answer(0, batch=0, ttft_s=0.5, tokens_in=100, tokens_out=11),
        answer(1, batch=0, ttft_s=0.5, tokens_in=100, tokens_out=1),
        answer(2, batch=2, ttft_s=0.25, tokens_in=50, tokens_out=21),
        answer(3, batch=2, ttft_s=0.25, tokens_in=50, tokens_out=0),  # stopped at once
    ]
    split = _prefill_decode_split(completions, measured_s=4.75)
    # prefill 0.5 + 0.25 = 0.75 s for 300 prompt tokens; decode 4.0 s for 10 + 0 + 20 + 0 tokens
    assert split["prefill_s"] == pytest.approx(0.75)
    assert split["prefill_tokens_per_s"] == pytest.approx(400.0)
    assert split["decode_s"] == pytest.approx(4.0)
    assert split["decode_tokens"] == 30
    assert split["decode_tokens_per_s"] == pytest.approx(7.5)
    assert split["decode_ms_per_token"] == pytest.approx(4000 / 30)


def test_no_split_when_the_engine_does_not_name_batches() -> None:
    completions = [answer(0, batch=None, ttft_s=0.5, tokens_in=10, tokens_out=5)]
    assert _prefill_decode_split(completions, measured_s=1.0) == {}
    assert _prefill_decode_split([], measured_s=1.0) == {}


def test_only_first_tokens_leave_decode_without_a_rate() -> None:
    completions = [answer(0, batch=0, ttft_s=1.0, tokens_in=10, tokens_out=1)]
    split = _prefill_decode_split(completions, measured_s=1.0)
    assert split["decode_tokens"] == 0 and split["decode_ms_per_token"] is None
    assert split["decode_s"] == 0.0 and split["decode_tokens_per_s"] is None
