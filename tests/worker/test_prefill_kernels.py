"""Which SDPA backends a fast-engine prefill may use (``attention.variable_shape_kernels``).

Measured on the H200 (``bench/fidelity_probe.py``, docs/benchmarks.md): plain's causal prefill
runs cuDNN there; the fast engine's identical call kept off cuDNN ran flash, rounded differently
in 18 of 64 rows, and greedy text matched plain's 7/64 times against 28/64 with cuDNN allowed.
cuDNN builds a plan per new shape (about 50 ms each on the H200), which a run's one-row refills
would pay inside the measured window, so cuDNN stays out of every prefill by default and
``SLMTUI_PREFILL_CUDNN=plain`` lets plain's own call have it.
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


def _cudnn_inside(plain_call: bool, device: torch.device = CUDA) -> bool:
    with variable_shape_kernels(device, plain_call):
        return torch.backends.cuda.cudnn_sdp_enabled()


def test_a_call_that_is_not_plains_keeps_cudnn_out(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLMTUI_PREFILL_CUDNN", raising=False)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert not _cudnn_inside(plain_call=False)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()


def test_by_default_plains_own_prefill_call_keeps_cudnn_out_too(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLMTUI_PREFILL_CUDNN", raising=False)
    assert prefill_cudnn_setting() == "never"
    assert not _cudnn_inside(plain_call=True)


def test_plain_lets_plains_own_prefill_call_keep_every_backend(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLMTUI_PREFILL_CUDNN", "plain")
    assert _cudnn_inside(plain_call=True)
    assert not _cudnn_inside(plain_call=False)


def test_a_cpu_forward_is_left_alone(monkeypatch: pytest.MonkeyPatch):
    assert _cudnn_inside(plain_call=False, device=torch.device("cpu"))


def test_an_unknown_setting_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLMTUI_PREFILL_CUDNN", "always")
    with pytest.raises(ValueError, match=r"^SLMTUI_PREFILL_CUDNN='always': allowed never, plain$"):
        prefill_cudnn_setting()


def _prefill_calls(
    monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any], prompts: list[str]
) -> list[bool]:
    seen: list[bool] = []
    real = engine_module.variable_shape_kernels

    def spy(device: torch.device, plain_call: bool = False) -> Any:
        seen.append(plain_call)
        return real(device, plain_call)

    monkeypatch.setattr(engine_module, "variable_shape_kernels", spy)
    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size=4)
    list(engine.generate([GenerateRequest(p, 3) for p in prompts]))
    return seen


def test_whole_equal_prompts_prefill_as_plains_call(
    monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any]
):
    assert _prefill_calls(monkeypatch, tiny_model, ["abcd", "efgh", "ijkl"]) == [True]


def test_prompts_of_different_lengths_prefill_padded_not_as_plains_call(
    monkeypatch: pytest.MonkeyPatch, tiny_model: tuple[Any, Any]
):
    assert _prefill_calls(monkeypatch, tiny_model, ["abcd", "ef", "ijklmn"]) == [False]
