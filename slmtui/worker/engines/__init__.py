"""Engines by name. Imported lazily: ``fast`` pulls in more than ``plain`` needs.

An engine module defines one ``Engine`` subclass whose class attribute ``name`` is its name.

``get_engine("fast")`` falls back to ``plain`` only when ``engines/fast/`` is missing, and
says so in ``notes``; any other import error in it is a bug and propagates.

``start_engine`` is how a run gets its engine: it builds, prepares and warms it up; when the fast
engine refuses the model (``support.fast_refusal``) or fails in its warm-up (an unknown
architecture, a transformers release that calls the cache differently), the run goes on with
``plain``, before its measured window, and says why. One incompatibility never costs a sweep.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.spec import ENGINES
from slmtui.tasks.base import GenerateRequest, LoglikelihoodRequest
from slmtui.worker.engines.base import Engine

_MODULES: dict[str, str] = {
    "plain": "slmtui.worker.engines.plain",
    "fast": "slmtui.worker.engines.fast",
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


@dataclass
class StartedEngine:
    """An engine built and warmed up, and what happened on the way."""

    engine: Engine
    fallback: str | None = None
    """Why the run runs ``plain`` instead of ``requested`` (one line), or None."""


def start_engine(
    name: str,
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int | str,
    prepare: Callable[[Engine], None] | None = None,
    warmup_generate: Sequence[GenerateRequest] = (),
    warmup_loglikelihood: Sequence[LoglikelihoodRequest] = (),
    notes: list[str] | None = None,
) -> StartedEngine:
    """The engine ``name`` for ``model``, prepared (``prepare(engine)``: the runner's tokenising
    step, before the measured window) and warmed up on the given requests.

    ``fast`` that refuses the model or raises in its warm-up gives way to ``plain`` (noted); an
    out-of-memory error, or a failure of ``plain`` itself, propagates: those are the run's own.
    """
    from slmtui.worker.engines.plain import is_oom
    from slmtui.worker.engines.support import fast_refusal

    notes = notes if notes is not None else []
    engine_class = get_engine(name, notes)
    fallback: str | None = None
    if engine_class.name == "fast":
        fallback = fast_refusal(model)
        if fallback is None:
            try:
                engine = engine_class(model, tokenizer, batch_size=batch_size)
                if prepare is not None:
                    prepare(engine)
                engine.warmup(warmup_generate, warmup_loglikelihood)
                return StartedEngine(engine)
            except Exception as exc:
                if is_oom(exc):
                    raise
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                fallback = f"it failed in its set-up ({type(exc).__name__}: {first})"
            engine = None  # what the failed engine held can go
            release_device_memory(next(model.parameters()).device)
        fallback = f"fast engine: {fallback}; ran plain"
        notes.append(fallback)
        engine_class = get_engine("plain", notes)
    engine = engine_class(model, tokenizer, batch_size=batch_size)
    if prepare is not None:
        prepare(engine)
    engine.warmup(warmup_generate, warmup_loglikelihood)
    return StartedEngine(engine, fallback)


def release_device_memory(device: Any) -> None:
    """Give back what an engine that is gone allocated (its KV cache, graph pools): before plain
    replaces a failed fast engine, and before a reused model's next run builds its engine."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
