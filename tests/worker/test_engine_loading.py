"""Engines own their loading: the runner asks the spec's engine for its model (``Engine.load``),
keeps it for the worker's next run only when that run's engine loads alike, and an engine with
its own loader is one module and one registration."""

from __future__ import annotations

import contextlib
import json
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from slmtui.metrics import FIELD_NAMES
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
)
from slmtui.worker import engines
from slmtui.worker.engines.base import Completed, Engine, LoadedModel
from slmtui.worker.runner import Models, run_spec


class EchoEngine(Engine):
    """An engine with a loader of its own: no transformers model anywhere."""

    name = "echo"
    loader = "echo"
    loads: ClassVar[list[str]] = []

    @classmethod
    def load(cls, spec: RunSpec, *, ctx: Any = None, on_step: Any = None) -> LoadedModel:
        cls.loads.append(spec.model.source)
        metrics = {"weights": "echo as stored", "weight_bytes": 0, "threads": 1}
        return LoadedModel("echo-model", None, torch.device("cpu"), "echo", "", [], metrics, "echo")

    def generate(self, requests: Sequence[GenerateRequest]) -> Iterator[Completed]:
        for index, request in enumerate(requests):
            text = "B"
            yield Completed(index, GenerateResponse(text, 1), len(request.prompt), 1, 0.001, index)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> Iterator[Completed]:
        for index, request in enumerate(requests):
            logprobs = tuple(0.0 if "Venus" in c else -1.0 for c in request.continuations)
            greedy = tuple(False for _ in request.continuations)
            yield Completed(index, LoglikelihoodResponse(logprobs, greedy), 3, 0)


@pytest.fixture
def echo_registered(monkeypatch: pytest.MonkeyPatch) -> type[EchoEngine]:
    module = types.ModuleType("echo_engine_for_tests")
    module.EchoEngine = EchoEngine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(engines._MODULES, "echo", module.__name__)
    monkeypatch.setattr("slmtui.spec.ENGINES", ("fast", "plain", "echo"))
    EchoEngine.loads = []
    return EchoEngine


def arc_data(tmp_path: Path) -> str:
    docs = [
        {
            "id": f"q{i}",
            "question": f"Which planet is number {i}?",
            "choices": {"text": ["Mars", "Venus"], "label": ["A", "B"]},
            "answerKey": "B",
        }
        for i in range(3)
    ]
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def test_an_engine_with_its_own_loader_runs_through_the_runner(
    echo_registered: type[EchoEngine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_transformers_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the runner loaded a transformers model for an engine of its own")

    monkeypatch.setattr("slmtui.worker.loading.load_model", no_transformers_load)
    data = arc_data(tmp_path)
    models = Models()
    for mode in ("generate", "loglikelihood"):
        spec = RunSpec(
            model=ModelRef("echo", "/models/echo", "local"),
            task="arc_easy",
            options=TaskOptions(data_file=data, mode=mode),
            engine="echo",  # type: ignore[arg-type]
        )
        metrics = run_spec(spec, f"r-{mode}", lambda event: None, models)
        assert metrics is not None and metrics["n_samples"] == 3
        assert metrics["engine"] == "echo" and metrics["engine_fallback"] is None
        assert metrics["weights"] == "echo as stored" and metrics["dtype"] == "echo"
        assert metrics["device"] == "cpu" and metrics["threads"] == 1
        assert metrics["accuracy"] == 1.0  # "B", "Venus": the echo engine's answers
        assert set(metrics) - FIELD_NAMES == set()
    assert echo_registered.loads == ["/models/echo"]  # the second run reused the first's load


def loaded_stub(loader: str = "transformers") -> LoadedModel:
    return LoadedModel(object(), object(), torch.device("cpu"), torch.float32, "", loader=loader)


def test_a_worker_reuses_a_model_only_for_the_same_loader_and_quantisation(
    echo_registered: type[EchoEngine],
) -> None:
    ref = ModelRef("m", "/models/m", "local")
    fast = RunSpec(model=ref, task="gsm8k", engine="fast")
    loaded = loaded_stub()
    models = Models()
    models.keep(fast, loaded, "r1")
    assert models.take(RunSpec(model=ref, task="hellaswag", engine="plain")) is loaded
    assert models.take(RunSpec(model=ref, task="hellaswag", engine="fast", quantize="int8")) is None
    assert models.loaded is None  # forgotten: the int8 run loads its own weights
    models.keep(fast, loaded, "r1")
    echo = RunSpec(model=ref, task="gsm8k", engine="echo")  # type: ignore[arg-type]
    assert models.take(echo) is None


def test_start_engine_refuses_a_model_another_loader_made(
    echo_registered: type[EchoEngine],
) -> None:
    with pytest.raises(ValueError, match="engine 'plain' loads 'transformers' models"):
        engines.start_engine("plain", loaded_stub("echo"), batch_size=1)
    started = engines.start_engine("echo", loaded_stub("echo"), batch_size=4)
    assert isinstance(started.engine, EchoEngine) and started.fallback is None
    assert started.engine.batch_size_used(4) == 4 and started.engine.batch_size_used("auto") == 4


def test_a_reused_models_memory_is_released_before_the_next_runs_sampler_starts(
    echo_registered: type[EchoEngine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NVML counts a process's reserved memory: the previous run's engine must be gone from the
    GPU before the sampler's first look, or the run reports the one before's peak."""
    from slmtui.worker import runner

    order: list[str] = []
    real_start = runner.Telemetry.start

    def start(*args: Any, **kwargs: Any) -> Any:
        order.append("telemetry")
        return real_start(*args, **kwargs)

    monkeypatch.setattr(runner.Telemetry, "start", start)
    monkeypatch.setattr(runner, "release_device_memory", lambda device: order.append("release"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    spec = RunSpec(
        model=ModelRef("echo", "/models/echo", "local"),
        task="arc_easy",
        options=TaskOptions(data_file=arc_data(tmp_path)),
        engine="echo",  # type: ignore[arg-type]
    )
    models = Models()
    models.keep(spec, loaded_stub("echo"), "r0")
    models.loaded.device = torch.device("cuda", 0)  # type: ignore[union-attr]
    models.release_previous_run()
    assert order == ["release"]
    order.clear()
    models.loaded.device = torch.device("cpu")  # type: ignore[union-attr]
    run_spec(spec, "r1", lambda event: None, models)
    assert order == ["telemetry"]  # a CPU model: nothing to give back
    models.loaded.device = torch.device("cuda", 0)  # type: ignore[union-attr]
    order.clear()
    # A CPU-only box cannot run the "cuda" stub; the order before it fails is what counts.
    with contextlib.suppress(Exception):
        run_spec(spec, "r2", lambda event: None, models)
    assert order[:2] == ["release", "telemetry"]
