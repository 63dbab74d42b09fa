"""Engines by name. Imported lazily: ``fast`` pulls in more than ``plain`` needs.

An engine module defines one ``Engine`` subclass whose class attribute ``name`` is its name, and
is registered here in ``_MODULES`` (its name also in ``slmtui.spec.ENGINES``, with what a profile
must give it). The class loads its own model (``Engine.load``), so a backend with its own
loader (``llamacpp``: llama.cpp on a GGUF file) is that one module.

``get_engine("fast")`` falls back to ``plain`` only when ``engines/fast/`` is missing, and
says so in ``notes``; any other import error in it is a bug and propagates.

A run goes through two calls: ``load_model_for(spec)`` (the spec's engine loads the model; the
runner keeps it for a worker's next run of the same model and loader) and ``start_engine``,
which builds, prepares and warms the engine up on it. When an engine with a ``fallback`` (fast)
refuses the model (``Engine.refusal``) or fails in its set-up (an unknown architecture, a
transformers release that calls the cache differently), the run goes on with the fallback on
the same loaded model, before its measured window, and says why. One incompatibility never
costs a sweep.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.spec import ENGINES, RunSpec
from slmtui.tasks.base import GenerateRequest, LoglikelihoodRequest
from slmtui.worker.engines.base import Engine, LoadedModel, Step

_MODULES: dict[str, str] = {
    "plain": "slmtui.worker.engines.plain",
    "fast": "slmtui.worker.engines.fast",
    "llamacpp": "slmtui.worker.engines.llamacpp",
}


def get_engine(name: str, notes: list[str] | None = None) -> type[Engine]:
    """The engine class called ``name``; a fallback to plain is appended to ``notes``."""
    if name not in _MODULES:
        raise UserError(
            f"engine '{name}' is unknown{did_you_mean(name, ENGINES)}; "
            f"allowed: {allowed_list(ENGINES)}"
        )
    module_name = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if name == "plain" or exc.name != module_name:
            raise
        if notes is not None:
            notes.append(f"engine '{name}' is not installed ({module_name}); ran 'plain'")
        return get_engine("plain", notes)
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, Engine)
            and value.__dict__.get("name") == name
        ):
            return value
    raise ImportError(f"{module_name} defines no Engine subclass with name = '{name}'")


def load_model_for(
    spec: RunSpec, *, ctx: Any | None = None, on_step: Step | None = None
) -> LoadedModel | None:
    """The model of ``spec`` as its engine loads it (``Engine.load``); LoadError when it cannot,
    None on a rank with no part in the run."""
    return get_engine(spec.engine).load(spec, ctx=ctx, on_step=on_step)


def loader_of(name: str) -> str:
    """What engine ``name`` loads (``Engine.loader``): runs whose engines share it share a
    loaded model."""
    return get_engine(name).loader


@dataclass
class StartedEngine:
    """An engine built and warmed up, and what happened on the way."""

    engine: Engine
    fallback: str | None = None
    """Why the run runs the requested engine's fallback instead (one line), or None."""


def start_engine(
    name: str,
    loaded: LoadedModel,
    *,
    batch_size: int | str,
    prepare: Callable[[Engine], None] | None = None,
    warmup_generate: Sequence[GenerateRequest] = (),
    warmup_loglikelihood: Sequence[LoglikelihoodRequest] = (),
    notes: list[str] | None = None,
) -> StartedEngine:
    """The engine ``name`` on ``loaded``, prepared (``prepare(engine)``: the runner's tokenising
    step, before the measured window) and warmed up on the given requests.

    An engine with a ``fallback`` (fast -> plain) that refuses the model or raises in its set-up
    gives way to the fallback on the same loaded model (noted); an out-of-memory error, or a
    failure of an engine without a fallback, propagates: those are the run's own.
    """
    from slmtui.worker.engines.plain import is_oom

    notes = notes if notes is not None else []
    engine_class = get_engine(name, notes)
    if engine_class.loader != loaded.loader:
        raise ValueError(
            f"engine '{engine_class.name}' loads '{engine_class.loader}' models, "
            f"not this '{loaded.loader}' one"
        )
    fallback: str | None = None
    if engine_class.fallback is not None:
        fallback = engine_class.refusal(loaded)
        if fallback is None:
            try:
                return StartedEngine(
                    _started(
                        engine_class,
                        loaded,
                        batch_size,
                        prepare,
                        warmup_generate,
                        warmup_loglikelihood,
                    )
                )
            except Exception as exc:
                if is_oom(exc):
                    raise
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                fallback = f"it failed in its set-up ({type(exc).__name__}: {first})"
            release_device_memory(loaded.device)  # what the failed engine held can go
        fallback = f"{engine_class.name} engine: {fallback}; ran {engine_class.fallback}"
        notes.append(fallback)
        engine_class = get_engine(engine_class.fallback, notes)
    engine = _started(
        engine_class, loaded, batch_size, prepare, warmup_generate, warmup_loglikelihood
    )
    return StartedEngine(engine, fallback)


def _started(
    engine_class: type[Engine],
    loaded: LoadedModel,
    batch_size: int | str,
    prepare: Callable[[Engine], None] | None,
    warmup_generate: Sequence[GenerateRequest],
    warmup_loglikelihood: Sequence[LoglikelihoodRequest],
) -> Engine:
    engine = engine_class.start(loaded, batch_size=batch_size)
    if prepare is not None:
        prepare(engine)
    engine.warmup(warmup_generate, warmup_loglikelihood)
    return engine


def release_device_memory(device: Any) -> None:
    """Give back what an engine that is gone allocated (its KV cache, graph pools): before plain
    replaces a failed fast engine, and before a reused model's next run builds its engine."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
