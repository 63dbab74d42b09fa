"""One run from spec to metrics: data, model, engine, warm-up, the measured window, scoring.

Phases, each announced by ``RunProgress`` at least once a second (a heartbeat thread):

loading    task data first (a bad file fails in a second, not after a model load), then the
           model and tokenizer as the spec's engine loads them (``Engine.load``; ``load_s``, a
           first-time GGUF conversion included). The step
           under way is named in ``RunProgress.step``. Within one worker serving several runs of
           one model (``Models``), later runs reuse the loaded model: their ``load_s`` holds only
           their data and engine set-up, and ``model_reused`` says so.
warmup     ``engine.prepare`` on every request (tokenising, sizing buffers; ``prepare_s``), then
           ``engine.warmup`` on the first ``WARMUP_REQUESTS`` (``warmup_s``), both outside the
           window.
measuring  every request: a synchronised clock starts, the engine answers, each answer is scored
           and sent as ``SampleScored``, the clock stops after a final synchronise
           (``measured_s``). Load and warm-up are never inside THR/LAT. Live tokens/s counts the
           tokens the engine has generated so far (``Engine.live_tokens``), not finished samples.

THR / LAT (DESIGN.md): generate mode, THR = generated tokens/s ÷ max(gpus, 1) and LAT = ms per
generated token over the window; loglikelihood mode, THR = samples/s ÷ max(gpus, 1) and LAT =
ms per sample. ``tokens_per_s`` / ``samples_per_s`` are totals over the run's GPUs.

Latency per sequence (generate mode): ``ttft_*_ms`` over the sequences' times to first token,
``itl_*_ms`` over their mean inter-token latencies (``Completed``), p50 and p95 by linear
interpolation between the closest ranks (``percentile``).

MEM: with NVML telemetry (``slmtui.telemetry``, when present) its figure and source; otherwise on
a GPU torch's peak reserved memory (``mem_source`` "torch_reserved": the CUDA context is not in
it), on the CPU the process's peak resident memory from the end of loading to the end of the run
(``mem_source`` "rss"; a first-time GGUF conversion would otherwise count). MB here = 2**20 bytes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psutil
import torch

from slmtui.errors import UserError
from slmtui.protocol import Event, RunProgress, RunStarted, SampleScored
from slmtui.spec import RunSpec
from slmtui.tasks import build_requests, get_task, load_task_data, resolve_settings
from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    Item,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
    Request,
    Scored,
)
from slmtui.worker import distributed as dist
from slmtui.worker.engines import load_model_for, loader_of, release_device_memory, start_engine
from slmtui.worker.engines.base import Completed, Engine, LoadedModel, LoadError
from slmtui.worker.hardware import describe_hardware
from slmtui.worker.quantize import save_kernel_tuning

MB = 1024 * 1024
WARMUP_REQUESTS = 2
WINDOW = "measured"
"""Name of the telemetry window around the measured phase."""
NVML_MEM_SOURCES = ("nvml_process", "nvml_device")
HEARTBEAT_PERIOD_S = 0.5
"""Progress period; half the protocol's one-second promise leaves room for a busy GIL."""

Emit = Callable[[Event], None]


class RunError(Exception):
    """A classified failure: ``reason`` is a protocol ErrorReason, the message one line."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class LiveState:
    """What the heartbeat reports; written by the main thread, read by the heartbeat."""

    phase: str = "loading"
    step: str | None = None
    done: int = 0
    total: int = 0
    measure_started: float | None = None
    tokens_out: int = 0
    engine: Engine | None = None
    """While measuring: the engine whose ``live_tokens`` count generated tokens as they come."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def live_tokens(self) -> int:
        engine = self.engine
        return max(self.tokens_out, engine.live_tokens if engine is not None else 0)


STEP_DATA = "reading task data"
STEP_WARMUP = "warming up / capturing graphs"
STEP_TOKENISING = "tokenising"


class Models:
    """One loaded model kept across the runs of one worker.

    A worker serving several runs of one (model, dtype, engine, GPU count) group loads the model
    once. Each run still builds its own engine (KV cache sized for its task, graphs captured in
    its warm-up) after the previous one's memory is released and torch's peaks are reset, so
    MEM is the run's own. Only single-process runs share (a torchrun job's process group lives
    for one run), and only runs whose engines load alike (``Engine.loader``) with the same
    quantisation: an int8 run never reuses the full-precision weights.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.loaded: LoadedModel | None = None
        self.loaded_by: str | None = None

    @staticmethod
    def model_key(spec: RunSpec) -> tuple[Any, ...]:
        return (
            loader_of(spec.engine),
            spec.model.kind,
            spec.model.source,
            spec.dtype,
            spec.gpus,
            spec.parallel,
            spec.quantize,
        )

    def take(self, spec: RunSpec) -> LoadedModel | None:
        """The model loaded for an earlier run of the same model, else None (and forget it)."""
        if self.key == self.model_key(spec) and self.loaded is not None:
            return self.loaded
        self.drop()
        return None

    def keep(self, spec: RunSpec, loaded: LoadedModel, run_id: str) -> None:
        if spec.gpus > 1 or dist.dist_context().is_distributed:
            return
        self.key, self.loaded, self.loaded_by = self.model_key(spec), loaded, run_id

    def drop(self) -> None:
        self.key = self.loaded = self.loaded_by = None

    def release_previous_run(self) -> None:
        """Give back what the previous run's engine reserved on the GPU (its KV cache, graph
        pools, log-likelihood buffers) before this run's sampler first looks: NVML counts a
        process's reserved memory, so without this a run reports the one before's peak
        (measured: an ARC run after a HellaSwag run of Gemma-3-270M reported HellaSwag's 51 GB)."""
        if self.loaded is not None and self.loaded.device.type == "cuda":
            release_device_memory(self.loaded.device)
            torch.cuda.reset_peak_memory_stats(self.loaded.device)


# -- entry point ----------------------------------------------------------------------------------


def run_spec(
    spec: RunSpec, run_id: str, emit: Emit, models: Models | None = None
) -> dict[str, Any] | None:
    """Run ``spec``, emitting events; return the metrics of ``RunFinished``.

    Under torchrun every rank calls this; rank 0 alone emits and gets the metrics, the other
    ranks get None. Raises RunError for classified failures, torch.OutOfMemoryError for OOM,
    anything else for a crash; the caller turns them into ``RunFailed``. ``models`` keeps the
    loaded model for the worker's next run of the same model.
    """
    check_spec(spec)
    try:
        ctx = dist.init_distributed(dist.dist_context())
    except UserError as exc:
        raise RunError("bad_spec", str(exc)) from None
    try:
        hardware = describe_hardware()
        emit(RunStarted(run_id, spec=spec.to_dict(), pid=os.getpid(), hardware=hardware))
        state = LiveState()
        if models is not None:
            models.release_previous_run()
        telemetry = Telemetry.start(spec.gpus if ctx.is_primary else 0)
        heartbeat = Heartbeat(run_id, state, emit, telemetry)
        if ctx.is_primary:
            heartbeat.start()
        try:
            metrics = _run(spec, run_id, emit, state, telemetry, ctx, models or Models())
        finally:
            heartbeat.stop()
            report = telemetry.stop()
    finally:
        dist.finish_distributed()
    if metrics is None:
        return None
    metrics["hardware"] = hardware
    _apply_telemetry(metrics, telemetry, report)
    return metrics


def check_spec(spec: RunSpec) -> None:
    """RunError("bad_spec") for values no part of the run could use."""
    from slmtui.spec import DTYPES, ENGINES, PARALLEL_MODES, QUANTIZE

    problems = []
    if spec.model.kind not in ("hub", "local", "gguf", "pypi"):
        problems.append(f"model.kind '{spec.model.kind}' (allowed: hub, local, gguf, pypi)")
    if not isinstance(spec.gpus, int) or spec.gpus < 0:
        problems.append(f"gpus {spec.gpus!r} (allowed: an integer >= 0)")
    if spec.batch_size != "auto" and (not isinstance(spec.batch_size, int) or spec.batch_size < 1):
        problems.append(f"batch_size {spec.batch_size!r} (allowed: an integer >= 1, or auto)")
    if spec.dtype not in DTYPES:
        problems.append(f"dtype '{spec.dtype}' (allowed: {', '.join(DTYPES)})")
    if spec.engine not in ENGINES:
        problems.append(f"engine '{spec.engine}' (allowed: {', '.join(ENGINES)})")
    if spec.parallel not in PARALLEL_MODES:
        problems.append(f"parallel '{spec.parallel}' (allowed: {', '.join(PARALLEL_MODES)})")
    if spec.quantize not in QUANTIZE:
        problems.append(f"quantize '{spec.quantize}' (allowed: {', '.join(QUANTIZE)})")
    if problems:
        raise RunError("bad_spec", "run spec: bad " + "; bad ".join(problems))


def _run(
    spec: RunSpec,
    run_id: str,
    emit: Emit,
    state: LiveState,
    telemetry: Telemetry,
    ctx: dist.DistContext,
    models: Models,
) -> dict[str, Any] | None:
    load_started = time.perf_counter()
    state.step = STEP_DATA
    try:
        task = get_task(spec.task)
        settings = resolve_settings(task, spec.options)
    except UserError as exc:
        raise RunError("bad_spec", str(exc)) from None
    try:
        data = load_task_data(spec.task, spec.options, spec.data_dir)
        settings, requests = build_requests(task, data, spec.options)
    except (UserError, OSError, ValueError) as exc:
        raise RunError("data_failed", f"task {spec.task}: {exc}") from None
    if not requests:
        raise RunError("data_failed", f"task {spec.task}: no items in {data.location}")
    state.total = len(requests)

    notes: list[str] = []
    loaded = models.take(spec)
    reused = loaded is not None
    if loaded is None:
        loaded = _load(spec, ctx, state)
        if loaded is None:
            return None  # a rank with no part in the run (layer-sharded on rank 0 alone)
        models.keep(spec, loaded, run_id)
    else:
        notes.append(
            f"model reused: loaded once by run {models.loaded_by} of this worker; load_s holds "
            "no model load"
        )
    state.device = loaded.device
    if reused and loaded.device.type == "cuda":
        release_device_memory(loaded.device)  # the previous run's engine is gone: its cache too
        torch.cuda.reset_peak_memory_stats(loaded.device)
    load_s = time.perf_counter() - load_started

    state.phase = "warmup"
    prepare_s = 0.0

    def prepare(engine: Engine) -> None:
        """Tokenise and pack before the window (timed apart): once, or twice after a fallback."""
        nonlocal prepare_s
        state.step = STEP_TOKENISING
        started = time.perf_counter()
        engine.prepare(
            [r for r in requests if isinstance(r, GenerateRequest)],
            [r for r in requests if isinstance(r, LoglikelihoodRequest)],
        )
        prepare_s += time.perf_counter() - started
        state.step = STEP_WARMUP

    warm = requests[:WARMUP_REQUESTS]
    started = time.perf_counter()
    chosen = start_engine(
        spec.engine,
        loaded,
        batch_size=spec.batch_size,
        prepare=prepare,
        warmup_generate=[r for r in warm if isinstance(r, GenerateRequest)],
        warmup_loglikelihood=[r for r in warm if isinstance(r, LoglikelihoodRequest)],
        notes=notes,
    )
    engine = chosen.engine
    _synchronize(loaded.device)
    warmup_s = time.perf_counter() - started - prepare_s
    save_kernel_tuning()  # gemlite's autotuned kernels, for the next run of these shapes
    engine.live_tokens = 0
    rss_window = _reset_peak_rss()

    # This rank's share: every item (tp, one process) or items[rank::world] (dp).
    mine = dist.shard_items(list(range(len(requests))), ctx, spec.parallel)
    answered: dict[int, Completed] = {}
    scored: dict[int, tuple[Scored, str | None]] = {}

    def record(completed: Completed) -> None:
        """Score one answer and send it (rank 0 only)."""
        result = _score(task, data.items[completed.index], completed, settings.mode)
        scored[completed.index] = result
        item, request = data.items[completed.index], requests[completed.index]
        emit(_sample_event(run_id, completed, item, request, *result))

    state.phase, state.step, state.engine = "measuring", None, engine
    with dist.measured_window(ctx) as window:
        telemetry.begin_window(WINDOW)
        state.measure_started = time.perf_counter()
        for local in _answer(engine, [requests[i] for i in mine], settings.mode):
            completed = replace(local, index=mine[local.index])
            answered[local.index] = completed
            if ctx.is_primary:
                record(completed)
            state.tokens_out += completed.tokens_out
            state.done = dist.job_progress(len(answered), len(requests), ctx, spec.parallel)
    telemetry.end_window(WINDOW)
    state.engine = None
    timing = dist.reduce_timing(window.seconds, ctx, spec.parallel)
    everything = dist.gather_results([answered[k] for k in range(len(mine))], ctx, spec.parallel)
    if everything is None:
        return None  # not rank 0: rank 0 reports
    for completed in everything:
        if completed.index not in scored:
            record(completed)  # other ranks' items (dp), sent once gathered
    completions = sorted(everything, key=lambda c: c.index)
    n_errors = sum(error is not None for _, error in scored.values())
    task_metrics = task.aggregate([scored[c.index][0] for c in completions])
    notes += getattr(engine, "notes", [])
    metrics = _timing_metrics(spec, settings.mode, completions, timing.measured_s)
    if settings.mode == "generate":
        metrics |= latency_metrics(completions)
    if settings.mode == "generate" and (ctx.world_size == 1 or spec.parallel != "dp"):
        # dp ranks prefill at the same time: their sum is not a share of the window.
        metrics |= _prefill_decode_split(completions, timing.measured_s)
    metrics.update(
        accuracy=task_metrics.get(task.primary_metric),
        task_metrics=task_metrics,
        load_s=load_s,
        model_reused=reused,
        warmup_s=warmup_s,
        prepare_s=prepare_s,
        measured_s=timing.measured_s,
        n_samples=len(requests),
        n_errors=n_errors,
        mode=settings.mode,
        engine=engine.name,
        engine_requested=spec.engine,
        engine_fallback=chosen.fallback,
        decode_step=getattr(engine, "decode_step", None) if settings.mode == "generate" else None,
        dtype=loaded.dtype_name,
        batch_size=engine.batch_size_used(spec.batch_size),
        batch_size_requested=spec.batch_size,
        num_fewshot=settings.num_fewshot,
        max_new_tokens=settings.max_new_tokens if settings.mode == "generate" else None,
        task_version=task.version,
        data_source=data.source,
        data_location=data.location,
        notes=loaded.notes + notes,
    )
    metrics["device"] = str(loaded.device)
    if loaded.device.type == "cpu":
        metrics["threads"] = torch.get_num_threads()
    metrics.update(loaded.metrics)  # weights, weight_bytes, quantize, scheme (device, threads)
    if len(timing.rank_seconds) > 1:
        metrics["rank_measured_s"] = list(timing.rank_seconds)
    metrics.update(_memory_metrics(loaded.device, rss_window))
    metrics.update(
        energy_j=None, energy_per_token_j=None, energy_per_sample_j=None, energy_source=None
    )
    metrics["telemetry"] = {}
    return metrics


def _load(spec: RunSpec, ctx: dist.DistContext, state: LiveState) -> LoadedModel | None:
    """Load the model the spec's engine's way; classify what goes wrong (OOM propagates as
    itself)."""

    def on_step(step: str) -> None:
        state.step = step

    try:
        return load_model_for(spec, ctx=ctx, on_step=on_step)
    except LoadError as exc:
        raise RunError("load_failed", str(exc)) from None
    except UserError as exc:
        raise RunError("bad_spec", str(exc)) from None


def _answer(engine: Engine, requests: Sequence[Request], mode: str) -> Any:
    if mode == "generate":
        return engine.generate([r for r in requests if isinstance(r, GenerateRequest)])
    return engine.loglikelihood([r for r in requests if isinstance(r, LoglikelihoodRequest)])


def _score(task: Any, item: Item, completed: Completed, mode: str) -> tuple[Scored, str | None]:
    """The item's score; a scoring failure counts as an error scoring 0, the run goes on."""
    try:
        return task.score(item, completed.response, mode), None
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        print(f"slmtui: scoring item {item.id} failed: {message}", file=sys.stderr)
        return Scored(score=0.0, prediction="", gold=""), message


def _sample_event(
    run_id: str,
    completed: Completed,
    item: Item,
    request: Request,
    scored: Scored,
    error: str | None,
) -> SampleScored:
    response = completed.response
    extra: dict[str, Any] = dict(scored.metrics)
    extra.update(tokens_in=completed.tokens_in, tokens_out=completed.tokens_out)
    if completed.ttft_s is not None:
        extra["ttft_ms"] = completed.ttft_s * 1000
    if isinstance(response, GenerateResponse):
        prompt, output = request.prompt, response.text  # type: ignore[union-attr]
        extra["prediction"] = scored.prediction
    else:
        assert isinstance(request, LoglikelihoodRequest)
        assert isinstance(response, LoglikelihoodResponse)
        prompt, output = request.context, scored.prediction
        extra.update(
            continuations=list(request.continuations),
            logprobs=list(response.logprobs),
            greedy=list(response.greedy),
        )
    if error is not None:
        extra["error"] = error
    return SampleScored(
        run_id,
        index=completed.index,
        item_id=item.id,
        prompt=prompt,
        output=output,
        gold=scored.gold,
        score=scored.score,
        extra=extra,
    )


# -- metrics --------------------------------------------------------------------------------------


def _timing_metrics(
    spec: RunSpec, mode: str, completions: list[Completed], measured_s: float
) -> dict[str, Any]:
    """THR, LAT and their parts (see the module docstring)."""
    per_gpu = max(spec.gpus, 1)
    n = len(completions)
    tokens_in = sum(c.tokens_in for c in completions)
    tokens_out = sum(c.tokens_out for c in completions)
    seconds = max(measured_s, 1e-9)
    samples_per_s = n / seconds
    ms_per_sample = 1000 * seconds / n if n else None
    tokens_per_s = tokens_out / seconds if mode == "generate" else None
    ms_per_token = 1000 * seconds / tokens_out if mode == "generate" and tokens_out else None
    ttfts = [c.ttft_s for c in completions if c.ttft_s is not None]
    if mode == "generate":
        throughput = tokens_per_s / per_gpu if tokens_per_s is not None else None
        unit, latency = "tokens/s", ms_per_token
    else:
        throughput, unit, latency = samples_per_s / per_gpu, "samples/s", ms_per_sample
    return {
        "throughput": throughput,
        "throughput_unit": unit,
        "latency_ms": latency,
        "tokens_per_s": tokens_per_s,
        "samples_per_s": samples_per_s,
        "ms_per_token": ms_per_token,
        "ms_per_sample": ms_per_sample,
        "ttft_ms": 1000 * sum(ttfts) / len(ttfts) if ttfts else None,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
    }


def _prefill_decode_split(completions: list[Completed], measured_s: float) -> dict[str, Any]:
    """Prefill (each batch's time to first token, counted once per batch) apart from decode.

    ``decode_s`` is the window less the prefills, so it holds the host's work between steps
    (stop checks, scoring) as THR and LAT do; the first token of each answer is prefill's.
    Empty when the engine does not say which batch answered a request.
    """
    if not completions or any(c.batch is None or c.ttft_s is None for c in completions):
        return {}
    prefill_s = sum({c.batch: c.ttft_s for c in completions}.values())  # type: ignore[misc]
    decode_s = max(measured_s - prefill_s, 0.0)
    tokens_in = sum(c.tokens_in for c in completions)
    decode_tokens = sum(max(c.tokens_out - 1, 0) for c in completions)
    return {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": tokens_in / prefill_s if prefill_s > 0 else None,
        "decode_s": decode_s,
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
        "decode_ms_per_token": 1000 * decode_s / decode_tokens if decode_tokens else None,
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between the closest ranks
    (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_metrics(completions: Sequence[Completed]) -> dict[str, Any]:
    """Per-sequence time to first token and inter-token latency, p50 and p95, in ms.

    Under continuous batching a sequence's TTFT runs from taking a slot to its first token; its
    ITL is the mean gap between its consecutive tokens. Sequences without a value (one token,
    or an engine that does not say) are left out of that statistic.
    """
    ttfts = [1000 * c.ttft_s for c in completions if c.ttft_s is not None]
    itls = [1000 * c.itl_s for c in completions if c.itl_s is not None]
    return {
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p95_ms": percentile(ttfts, 95),
        "itl_p50_ms": percentile(itls, 50),
        "itl_p95_ms": percentile(itls, 95),
    }


def _memory_metrics(device: torch.device, rss_window: bool) -> dict[str, Any]:
    if device.type == "cuda":
        peaks = dist.rank_memory_mb()  # summed over the GPUs this process used
        return {
            "peak_mem_mb": peaks["torch_peak_reserved_mb"],
            "mem_source": "torch_reserved",
        } | peaks
    return {
        "peak_mem_mb": _peak_rss_mb(),
        "mem_source": "rss",
        "torch_peak_allocated_mb": None,
        "torch_peak_reserved_mb": None,
    }


def _apply_telemetry(metrics: dict[str, Any], telemetry: Telemetry, report: dict[str, Any]) -> None:
    """NVML's memory and the measured window's energy replace torch's figures where measured."""
    if not report:
        return
    metrics["telemetry"] = report
    lifted = telemetry.metrics(
        report,
        tokens_out=metrics["tokens_out"] if metrics["mode"] == "generate" else None,
        n_samples=metrics["n_samples"],
        n_correct=(metrics["accuracy"] or 0.0) * metrics["n_samples"],
    )
    nvml_mem = lifted.pop("mem_source", None) in NVML_MEM_SOURCES
    peak_mem_mb = lifted.pop("peak_mem_mb", None)
    if nvml_mem and peak_mem_mb is not None:
        metrics.update(peak_mem_mb=peak_mem_mb, mem_source=report["mem_source"])
    metrics.update({k: v for k, v in lifted.items() if k not in metrics or v is not None})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM (since the last reset), else ru_maxrss."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def current_mem_mb(device: torch.device) -> float:
    """Now: torch's reserved GPU memory on a GPU, the process RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device) / MB
    return psutil.Process().memory_info().rss / MB


# -- live progress --------------------------------------------------------------------------------


class Heartbeat:
    """Emits ``RunProgress`` every ``HEARTBEAT_PERIOD_S`` until stopped (a daemon thread)."""

    def __init__(self, run_id: str, state: LiveState, emit: Emit, telemetry: Telemetry) -> None:
        self.run_id = run_id
        self.state = state
        self.emit = emit
        self.telemetry = telemetry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slmtui-heartbeat", daemon=True)

    def start(self) -> None:
        self.emit(self.progress())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_PERIOD_S):
            self.emit(self.progress())

    def progress(self) -> RunProgress:
        s = self.state
        elapsed_s = 0.0
        tokens_per_s = ms_per_token = samples_per_s = None
        if s.phase == "measuring" and s.measure_started is not None:
            elapsed_s = time.perf_counter() - s.measure_started
            tokens = s.live_tokens()
            if elapsed_s > 0:
                samples_per_s = s.done / elapsed_s
                if tokens:
                    tokens_per_s = tokens / elapsed_s
                    ms_per_token = 1000 * elapsed_s / tokens
        live = self.telemetry.snapshot()
        mem_mb = live.get("mem_mb") if live.get("mem_source") in NVML_MEM_SOURCES else None
        if mem_mb is None:
            with contextlib.suppress(Exception):
                mem_mb = current_mem_mb(s.device)
        return RunProgress(
            self.run_id,
            phase=s.phase,  # type: ignore[arg-type]
            done=s.done,
            total=s.total,
            elapsed_s=elapsed_s,
            tokens_per_s=tokens_per_s,
            ms_per_token=ms_per_token,
            samples_per_s=samples_per_s,
            mem_mb=mem_mb,
            telemetry=live,
            step=s.step,
        )


# -- telemetry (NVML, built elsewhere) ------------------------------------------------------------


class Telemetry:
    """``slmtui.telemetry.TelemetrySampler`` for a GPU run when it is importable; else nothing.

    Every call is guarded: telemetry trouble is logged to stderr and never fails the run.
    """

    def __init__(self, sampler: Any | None = None, lift: Callable[..., dict] | None = None) -> None:
        self.sampler = sampler
        self._lift = lift

    @classmethod
    def start(cls, gpus: int) -> Telemetry:
        if gpus <= 0:
            return cls()
        try:
            from slmtui.telemetry import TelemetrySampler, metrics_from_report
        except ImportError:
            return cls()
        # CUDA ordinals (the sampler maps them through CUDA_VISIBLE_DEVICES). Under torchrun the
        # ranks are the launcher's children: watch the launcher's process tree.
        under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        pid = os.getppid() if under_torchrun else os.getpid()
        try:
            sampler = TelemetrySampler(list(range(gpus)), pid, period_s=0.2)
            sampler.start()
        except Exception as exc:
            print(f"slmtui: telemetry did not start: {exc!r}", file=sys.stderr)
            return cls()
        return cls(sampler, metrics_from_report)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            print(f"slmtui: telemetry {what} failed: {exc!r}", file=sys.stderr)
            return None

    def begin_window(self, name: str) -> None:
        if self.sampler is not None:
            self._call("begin_window", lambda: self.sampler.begin_window(name))

    def end_window(self, name: str) -> None:
        if self.sampler is not None:
            self._call("end_window", lambda: self.sampler.end_window(name))

    def snapshot(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        result = self._call("snapshot", self.sampler.snapshot)
        return result if isinstance(result, dict) else {}

    def stop(self) -> dict[str, Any]:
        """The sampler's report ({} without telemetry); later calls return {}."""
        if self.sampler is None:
            return {}
        result = self._call("stop", self.sampler.stop)
        self.sampler = None
        return result if isinstance(result, dict) else {}

    def metrics(self, report: dict[str, Any], **counts: Any) -> dict[str, Any]:
        """The flat metrics the report gives for the measured window (energy, MEM, power)."""
        if self._lift is None:
            return {}
        lift = self._lift
        result = self._call("metrics", lambda: lift(report, window=WINDOW, **counts))
        return result if isinstance(result, dict) else {}
