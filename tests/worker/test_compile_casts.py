"""The compiled native layer asks inductor to round between ops as eager torch does
(``emulate_precision_casts``) unless ``SLMTUI_COMPILE_EXACT_CASTS=0``; measured on the H200
(docs/benchmarks.md): teacher-forced |d log p| median 0.0156 without, 0.00014 with, same speed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slmtui.worker.engines.fast.native import step
from slmtui.worker.engines.fast.native.layer import LayerPlan

PLAN = LayerPlan(
    heads=4,
    kv_heads=2,
    head_dim=8,
    norm="scaled",
    eps=1e-6,
    qk_norm=False,
    sandwich=False,
    scaling=8**-0.5,
    fused_qkv=True,
    fused_gate_up=True,
)


def _compile_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(step, "_COMPILED", {})
    return calls


def _attend(*args: Any) -> torch.Tensor:
    raise AssertionError("not called")


def test_inductor_is_asked_for_eager_rounding_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLMTUI_COMPILE_EXACT_CASTS", raising=False)
    calls = _compile_calls(monkeypatch)
    step.compiled_layer(PLAN, "gqa", _attend, torch.nn.SiLU(), "inductor")
    assert calls[-1]["options"] == {"emulate_precision_casts": True}
    assert calls[-1]["fullgraph"] is True


def test_the_variable_turns_it_off_and_gets_its_own_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _compile_calls(monkeypatch)
    monkeypatch.setenv("SLMTUI_COMPILE_EXACT_CASTS", "1")
    exact = step.compiled_layer(PLAN, "gqa", _attend, torch.nn.SiLU(), "inductor")
    monkeypatch.setenv("SLMTUI_COMPILE_EXACT_CASTS", "0")
    loose = step.compiled_layer(PLAN, "gqa", _attend, torch.nn.SiLU(), "inductor")
    assert [c["options"] for c in calls] == [{"emulate_precision_casts": True}, None]
    assert exact is not loose


def test_another_backend_gets_no_inductor_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLMTUI_COMPILE_EXACT_CASTS", raising=False)
    calls = _compile_calls(monkeypatch)
    step.compiled_layer(PLAN, "gqa", _attend, torch.nn.SiLU(), "aot_eager")
    assert calls[-1]["options"] is None
