"""What a finished run reports: ``RunMetrics``, the typed record behind ``RunFinished.metrics``.

The wire format stays one flat JSON object (``protocol.RunFinished.metrics``; stored as is), so
old stores and exports read unchanged. ``RunMetrics.from_dict`` gives the typed view of such a
dict (every field optional: older runs lack newer fields; keys it does not know are kept in
``extra``, never dropped) and ``to_dict`` gives the dict back. Units are in the names (``_s``,
``_ms``, ``_mb``, ``_j``, ``_w``, ``_pct``) and in each field's docstring.

A new figure a run reports is a field here; the worker fills it, and a column in
``reports/columns.py`` (``metric=`` the field's name) shows it in Rank and every export. Stdlib
only: both processes import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class RunMetrics:
    # -- quality ----------------------------------------------------------------------------------
    accuracy: float | None = None
    """The task's primary metric, 0..1 (gsm8k exact_match, squad_v2 f1, hellaswag acc_norm,
    arc_easy and imdb acc)."""
    task_metrics: dict[str, float] | None = None
    """Every aggregated task metric (exact_match, f1, acc, acc_norm, ...)."""
    n_samples: int | None = None
    n_errors: int | None = None
    """Samples whose scoring failed (counted wrong)."""

    # -- speed (the measured window only) ---------------------------------------------------------
    throughput: float | None = None
    """THR per GPU (the CPU counts as one): tokens/s (generate) or samples/s (loglikelihood)."""
    throughput_unit: str | None = None
    """"tokens/s" or "samples/s"."""
    latency_ms: float | None = None
    """LAT: ms per generated token (generate) or per sample (loglikelihood)."""
    tokens_per_s: float | None = None
    """Generated tokens/s over all the run's GPUs."""
    samples_per_s: float | None = None
    ms_per_token: float | None = None
    ms_per_sample: float | None = None
    ttft_ms: float | None = None
    """Mean time to first token, ms."""
    tokens_in: int | None = None
    tokens_out: int | None = None
    prefill_s: float | None = None
    """Generate, one process or tp: each batch's time to its first token, counted once."""
    prefill_tokens_per_s: float | None = None
    decode_s: float | None = None
    """The measured window less the prefills."""
    decode_tokens: int | None = None
    decode_tokens_per_s: float | None = None
    decode_ms_per_token: float | None = None
    ttft_p50_ms: float | None = None
    """Per-sequence time to first token, median, ms (continuous batching: from taking a slot)."""
    ttft_p95_ms: float | None = None
    itl_p50_ms: float | None = None
    """Per-sequence inter-token latency (the mean gap between its tokens), median, ms."""
    itl_p95_ms: float | None = None
    rank_measured_s: list[float] | None = None
    """Each rank's measured window, s (several processes)."""

    # -- time outside the window ------------------------------------------------------------------
    load_s: float | None = None
    """Data, model and engine set-up; without the model load when ``model_reused``."""
    warmup_s: float | None = None
    prepare_s: float | None = None
    """Tokenising every request before the window (``Engine.prepare``)."""
    measured_s: float | None = None
    model_reused: bool | None = None
    """The worker kept the model loaded from an earlier run of its group."""

    # -- memory -----------------------------------------------------------------------------------
    peak_mem_mb: float | None = None
    """MEM, MB; which counter in ``mem_source``."""
    mem_source: str | None = None
    """"nvml_process", "nvml_device", "torch_reserved" or "rss"."""
    torch_peak_allocated_mb: float | None = None
    torch_peak_reserved_mb: float | None = None

    # -- energy and GPU telemetry (None on the CPU) -----------------------------------------------
    energy_j: float | None = None
    """Energy of the measured window, J (NVML's counter; see ``energy_source``)."""
    energy_per_token_j: float | None = None
    energy_per_sample_j: float | None = None
    energy_per_correct_j: float | None = None
    energy_source: str | None = None
    """"nvml_counter" or "power_integral"."""
    energy_flagged: str | None = None
    """Why the energy figure is doubtful (a zero or negative counter delta, ...), or None."""
    gpu_util_mean_pct: float | None = None
    power_mean_w: float | None = None
    power_max_w: float | None = None
    contaminated: bool | None = None
    """Another process used the run's GPU during the window."""
    telemetry: dict[str, Any] | None = None
    """Peaks and series from the GPU backend."""
    telemetry_degraded: str | None = None
    """Why GPU telemetry stopped or never started mid-run (NVML erroring or blocking), or None."""

    # -- what ran ---------------------------------------------------------------------------------
    mode: str | None = None
    """"generate" or "loglikelihood"."""
    engine: str | None = None
    """The engine that ran."""
    engine_requested: str | None = None
    """The engine the spec asked for."""
    engine_fallback: str | None = None
    """Why ``engine`` is plain although fast was asked for, or None."""
    device: str | None = None
    """Where the engine computed: "cpu", "cuda:0" (the first device of a layer-sharded model)."""
    threads: int | None = None
    """CPU threads the engine computed with, on the CPU (torch's intra-op threads; llama.cpp's
    ``n_threads``)."""
    decode_step: str | None = None
    """The fast engine's decode step: "native" (its own layer function over fused weights) or
    "transformers" (the model's forward), with " compiled" when it ran through torch.compile;
    None for plain and for log-likelihood runs (nothing decodes). Why native did not run is in
    ``notes``."""
    dtype: str | None = None
    """What the weights were loaded as ("bfloat16", "float32"; llama.cpp: the GGUF file's
    type, "Q4_1")."""
    weights: str | None = None
    """What the run computed with: "bfloat16", "gguf Q4_1 dequantised to float32" (or "gguf
    Q4_1 as stored (llama.cpp)"), plus the quantisation scheme."""
    weight_bytes: int | None = None
    """The parameters as stored (torchao's int data, scales and zero points; tied matrices once)."""
    weight_bytes_this_process: int | None = None
    """Several GPUs: rank 0's share of ``weight_bytes``."""
    quantize: str | None = None
    """The ``quantize`` setting: "none", "int8" or "int4" (``slmtui/quantization.py``)."""
    quantize_scheme: str | None = None
    quantize_s: float | None = None
    """Seconds spent quantising (inside ``load_s``)."""
    quantized_layers: int | None = None
    quantize_fused_groups: int | None = None
    """Groups of projections (a layer's QKV, its gate and up) quantised as one matrix each."""
    quantize_unfused: list[str] | None = None
    """Groups that could not be quantised fused, and why (each was quantised layer by layer)."""
    quantize_skipped: list[str] | None = None
    """Linear layers torchao left in full precision."""
    torchao_version: str | None = None
    quantize_kernels: str | None = None
    """Whose kernels ran the quantised matmuls: "torchao", or "gemlite 0.6.0" (through torchao's
    UIntx tensor)."""
    llama_cpp_version: str | None = None
    """llama-cpp-python's version, for a llamacpp run (its llama.cpp is vendored with it)."""
    batch_size: int | None = None
    """Most sequences in flight (fast) or per batch (plain); what the engine chose for "auto"."""
    batch_size_requested: int | str | None = None
    """The spec's batch_size (an integer or "auto")."""
    num_fewshot: int | None = None
    max_new_tokens: int | None = None
    task_version: str | None = None
    data_source: str | None = None
    """"file", "data_dir", "hub" or "sample" (slmtui's embedded items, never the benchmark)."""
    data_location: str | None = None
    notes: list[str] | None = None
    """Facts a reader of the result should know (truncated prompts, a halved batch, ...)."""
    hardware: dict[str, Any] | None = None
    """gpu_name, gpu_count, driver, cuda, torch, transformers, python, cpu."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (a newer worker's), kept as they came."""
    given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    """The keys ``from_dict`` found (a key present with None is kept as such by ``to_dict``)."""

    @classmethod
    def from_dict(cls, metrics: dict[str, Any] | None) -> RunMetrics:
        source = dict(metrics or {})
        record = cls(**{k: v for k, v in source.items() if k in FIELD_NAMES})
        record.extra = {k: v for k, v in source.items() if k not in FIELD_NAMES}
        record.given = frozenset(source)
        return record

    def to_dict(self) -> dict[str, Any]:
        """The flat dict again: every field that is set or was given, then ``extra``."""
        out = {
            name: getattr(self, name)
            for name in _ORDER
            if getattr(self, name) is not None or name in self.given
        }
        out.update(self.extra)
        return out


_ORDER: tuple[str, ...] = tuple(
    f.name for f in fields(RunMetrics) if f.name not in ("extra", "given")
)
FIELD_NAMES: frozenset[str] = frozenset(_ORDER)
"""Every key ``RunFinished.metrics`` may carry."""
