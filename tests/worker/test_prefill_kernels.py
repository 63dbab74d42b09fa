"""Which SDPA backends a fast-engine prefill may use (``attention.variable_shape_kernels``).

Measured on the H200 (``bench/fidelity_probe.py``, docs/benchmarks.md): plain's causal prefill
runs cuDNN there; the fast engine's identical call kept off cuDNN ran flash, rounded differently
in 18 of 64 rows, and greedy text matched plain's 7/64 times against 28/64 with cuDNN allowed.
cuDNN builds a plan per new shape (70-80 ms each on the H200), which a run's one-row refills
would pay inside the measured window for every prompt length, so by default (``batched``) only
plain's own call of two or more rows has cuDNN; ``plain`` lets one-row calls have it too and
``never`` keeps it out of every prefill.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines.fast import engine as engine_module
from slmtui.worker.engines.fast.attention import prefill_cudnn_setting, variable_shape_kernels
from slmtui.worker.engines.fast.engine import FastEngine

CUDA = torch.device("cuda")


def _cudnn_inside(plain_call: bool, device: torch.device = CUDA, rows: int = 1) -> bool:
    with variable_shape_kernels(device, plain_call, rows):
        return torch.backends.cuda.cudnn_sdp_enabled()


def test_a_call_that_is_not_plains_keeps_cudnn_out(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLMTUI_PREFILL_CUDNN", raising=False)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert not _cudnn_inside(plain_call=False)
    assert not _cudnn_inside(plain_call=False, rows=64)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()


def test_by_default_plains_own_call_of_several_rows_keeps_cudnn(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLMTUI_PREFILL_CUDNN", raising=False)
    assert prefill_cudnn_setting() == "batched"
    assert _cudnn_inside(plain_call=True, rows=2)
    assert _cudnn_inside(plain_call=True, rows=64)


def test_by_default_a_one_row_prefill_keeps_cudnn_out(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLMTUI_PREFILL_CUDNN", raising=False)
    assert not _cudnn_inside(plain_call=True, rows=1)


def test_plain_lets_one_row_calls_keep_every_backend(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLMTUI_PREFILL_CUDNN", "plain")
    assert _cudnn_inside(plain_call=True, rows=1)
    assert _cudnn_inside(plain_call=True, rows=8)
    assert not _cudnn_inside(plain_call=False, rows=8)


def test_never_keeps_cudnn_out_of_every_prefill(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLMTUI_PREFILL_CUDNN", "never")
    assert not _cudnn_inside(plain_call=True, rows=1)
    assert not _cudnn_inside(plain_call=True, rows=64)


def test_a_cpu_forward_is_left_alone(monkeypatch: pytest.MonkeyPatch):
    assert _cudnn_inside(plain_call=False, device=torch.device("cpu"))


def test_an_unknown_setting_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLMTUI_PREFILL_CUDNN", "always")
    allowed = r"^SLMTUI_PREFILL_CUDNN='always': allowed batched, plain, never$"
    with pytest.raises(ValueError, match=allowed):
        prefill_cudnn_setting()


def test_an_unknown_setting_stops_the_engine_before_any_forward(
    monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any]
):
    monkeypatch.setenv("SLMTUI_PREFILL_CUDNN", "sometimes")
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="SLMTUI_PREFILL_CUDNN='sometimes'"):
        FastEngine(model, tokenizer, batch_size=4)


def _prefill_calls(
    monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any], prompts: list[str]
) -> list[tuple[bool, int]]:
    seen: list[tuple[bool, int]] = []
    real = engine_module.variable_shape_kernels

    def spy(device: torch.device, plain_call: bool = False, rows: int = 1) -> Any:
        seen.append((plain_call, rows))
        return real(device, plain_call, rows)

    monkeypatch.setattr(engine_module, "variable_shape_kernels", spy)
    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size=4)
    list(engine.generate([GenerateRequest(p, 3) for p in prompts]))
    return seen


def test_whole_equal_prompts_prefill_as_plains_call(
    monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any]
):
    assert _prefill_calls(monkeypatch, tiny_model, ["abcd", "efgh", "ijkl"]) == [(True, 3)]


def test_prompts_of_different_lengths_prefill_padded_not_as_plains_call(
    monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any]
):
    assert _prefill_calls(monkeypatch, tiny_model, ["abcd", "ef", "ijklmn"]) == [(False, 3)]


def test_a_refill_is_a_one_row_call(monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any]):
    calls = _prefill_calls(monkeypatch, tiny_model, ["abcd", "efgh", "ijkl", "mnop", "qrst"])
    assert calls[0] == (True, 4)
    assert calls[1:] == [(True, 1)]
