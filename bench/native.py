"""The native decode step against today's fast step, on one GPU, in one call (issue 15).

    PYTHONUNBUFFERED=1 python bench/native.py --out $OUT/native_h200.json    # GPU, 4-8 min
    python bench/native.py --smoke --out /tmp/native_smoke.json               # CPU, 2-layer

Models are random-initialised from the real Qwen2.5-0.5B and Qwen2.5-7B configs (bf16, no hub;
``bench/engine.py`` builds them); prompts are 128 random token ids through an id tokenizer, EOS
off, so every path generates its full budget. Speed and memory are real, text is meaningless.

Decode paths (``PATHS``), each a ``FastEngine`` with everything else the same:
  transformers           today's fast step: the model's forward in one CUDA graph per bucket
  native                 the native step (fused weights, one layer function), eager in the graph
  native_compiled        the native step with its layer function compiled (inductor)
  transformers_compiled  today's step compiled whole (``--with-transformers-compiled``)

Parts (``--parts``; a part that fails is recorded and the rest go on; ``--deadline-s`` skips
the parts not yet started):
  b1-0.5b, b1-7b   one sequence, 128 + 256 (0.5B) / 128 (7B) new tokens: tokens/s (best of
                   ``--repeats`` runs), % of the bandwidth floor, warm-up (the first compiled
                   engine of a shape in this process compiles cold: the compile cache starts
                   empty), and per decode step the kernels and GPU time from ``torch.profiler``
                   (graph replay, and the eager step) and the replayed step's time by CUDA events
  b64, b256        Qwen2.5-0.5B, 64 / 256 sequences x (128 + 256): tokens/s and peak memory of
                   every path against plain generate at that batch size (peak allocated over the
                   memory allocated when the path started, so what a path before it left does
                   not count), split into the warm-up's peak and the runs' peak, with the KV
                   cache's size, the memory still allocated after warm-up and torch's reserved
  fidelity         Qwen2.5-0.5B, 32 prompts x 64 tokens: teacher-forced log-probs of each path's
                   decode step against transformers' forward of the whole sequence (max and
                   median |d log p|), and greedy sequences identical to plain's, for each path
                   and for transformers' static-cache generate (and native vs that path)
  warm             the native compiled warm-up again in a second process on the same compile
                   cache (cache hits): 0.5B batch 1, 0.5B 64 sequences, 7B batch 1
  b1-7b-int4       last: 7B int4 (torchao, fused QKV and gate/up quantised in place), native
                   compiled against bf16 native compiled: the issue-17 ratio (needs torchao)

Floor: a device-to-device copy gives the bandwidth; a step must read every weight (all but an
untied input embedding) and, batched, the KV cache (``bench/engine.py``'s definition).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import (
    CUDA,
    DEVICE,
    MIB,
    QWEN25_05B,
    QWEN25_7B,
    IdTokenizer,
    as_text,
    build_model,
    copy_bandwidth_bytes_per_s,
    floor_tokens_per_s,
    log,
    peak_mib,
    plain_forward_logprobs,
    prompts,
    reset_memory,
    run_environment,
    sdpa_backends,
    static_generate,
    sync,
    timed,
    weight_bytes_per_step,
)

from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.plain import PlainEngine
from slmtui.worker.fusion import fuse_projections

PATHS: dict[str, tuple[str, bool]] = {
    "transformers": ("transformers", False),
    "native": ("native", False),
    "native_compiled": ("native", True),
    "transformers_compiled": ("transformers", True),
}
"""Path -> (decode_step, compile_step)."""
TARGETS = {
    "b1 Qwen2.5-0.5B": 1_000,
    "b1 Qwen2.5-7B": 240,
    "b64 Qwen2.5-0.5B": 30_000,
}
"""Issue 15's tokens/s targets (H200)."""
MEMORY_TARGET_X = 1.10
WARMUP_COLD_TARGET_S = 20.0
WARMUP_WARM_TARGET_S = 5.0
PROMPT = 128
DEFAULT_PARTS = "b1-0.5b,b64,b256,fidelity,b1-7b,warm,b1-7b-int4"


class Settings:
    """Sizes: the GPU run's, or the smoke run's (2 layers, CPU widths, few tokens)."""

    def __init__(self, smoke: bool, repeats: int, with_transformers_compiled: bool) -> None:
        self.smoke = smoke
        self.layers = 2 if smoke else None
        self.repeats = repeats
        self.new_b1 = 16 if smoke else 256
        self.new_b1_7b = 16 if smoke else 128
        self.new_batched = 8 if smoke else 256
        self.rows_small, self.rows_big = (4, 8) if smoke else (64, 256)
        self.fidelity = (4, 8) if smoke else (32, 64)
        self.backend = "inductor" if CUDA else "aot_eager"
        """CPU: AOT autograd without inductor (the code path, not its speed)."""
        self.paths = ["transformers", "native", "native_compiled"]
        if with_transformers_compiled:
            self.paths.append("transformers_compiled")


# -- one path ---------------------------------------------------------------------------------


def engine_for(
    model: Any,
    batch: int,
    path: str,
    backend: str,
    prefill_chunk_tokens: int | None = None,
    decode_attention: str = "auto",
) -> FastEngine:
    decode_step, compile_step = PATHS[path]
    engine = FastEngine(
        model,
        IdTokenizer(),
        batch_size=batch,
        decode_step=decode_step,
        compile_step=compile_step,
        compile_backend=backend,
        decode_attention=decode_attention,
        **({"prefill_chunk_tokens": prefill_chunk_tokens} if prefill_chunk_tokens else {}),
    )
    want = decode_step + (" compiled" if compile_step else "")
    if engine.decode_step != want:
        raise RuntimeError(f"asked for {want}, got {engine.decode_step}: {engine.notes}")
    return engine


def run_path(
    model: Any,
    reqs: list[GenerateRequest],
    batch: int,
    path: str,
    s: Settings,
    profile: bool = False,
) -> dict[str, Any]:
    """Warm-up timed apart, then ``repeats`` runs (best and median tokens/s); memory over the
    path's start; optionally the profiler's view of one decode step."""
    start_mib = reset_memory()
    built_s, engine = timed(lambda: engine_for(model, batch, path, s.backend))
    engine.prepare(reqs, [])  # as the runner does: the cache sized for these requests
    warm_s, _ = timed(lambda: engine.warmup(reqs[:batch], []))
    after_warmup_mib = (torch.cuda.memory_allocated() / MIB - start_mib) if CUDA else 0.0
    warmup_peak_mib = peak_mib() - start_mib if CUDA else 0.0
    if CUDA:  # the runs' own peak, apart from the warm-up's (capture, check, warm-up prefill)
        torch.cuda.reset_peak_memory_stats()
    rates, tokens = [], 0
    for _ in range(s.repeats):
        seconds, done = timed(lambda: list(engine.generate(reqs)))
        tokens = sum(c.tokens_out for c in done)
        rates.append(tokens / seconds)
    report = engine.warmup_report
    out: dict[str, Any] = {
        "decode_step": engine.decode_step,
        "tokens": tokens,
        "tokens_per_s": max(rates),
        "tokens_per_s_median": statistics.median(rates),
        "runs": len(rates),
        "build_s": built_s,
        "warmup_s": warm_s,
        "check_s": report.check_s,
        "capture_s": report.capture_s,
        "graphs": report.graphs,
        "native_max_abs_diff": report.native_max_abs_diff,
        "cache_mib": report.cache_bytes / MIB,
        "start_mem_mib": start_mib,
        "after_warmup_over_start_mib": after_warmup_mib,
        "warmup_peak_over_start_mib": warmup_peak_mib,
        "run_peak_over_start_mib": peak_mib() - start_mib if CUDA else 0.0,
        "reserved_mib": torch.cuda.memory_reserved() / MIB if CUDA else 0.0,
        "peak_mem_mib": start_mib + max(warmup_peak_mib, peak_mib() - start_mib),
        "peak_over_start_mib": max(warmup_peak_mib, peak_mib() - start_mib),
        "decode_attention": engine.decode_attention,
        "notes": list(engine.notes),
    }
    if engine.decode_step != PATHS[path][0] + (" compiled" if PATHS[path][1] else ""):
        out["error"] = f"the engine gave way: {engine.decode_step}"
    if profile:
        out["step_profile"] = profile_step(engine, batch)
    return out


def run_plain(model: Any, reqs: list[GenerateRequest], batch: int) -> dict[str, Any]:
    start_mib = reset_memory()
    engine = PlainEngine(model, IdTokenizer(), batch_size=batch)
    warm_s, _ = timed(lambda: engine.warmup(reqs[: min(batch, 4)], []))
    warmup_peak_mib = peak_mib() - start_mib if CUDA else 0.0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    seconds, done = timed(lambda: list(engine.generate(reqs)))
    tokens = sum(c.tokens_out for c in done)
    run_peak_mib = peak_mib() - start_mib if CUDA else 0.0
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "warmup_s": warm_s,
        "start_mem_mib": start_mib,
        "warmup_peak_over_start_mib": warmup_peak_mib,
        "run_peak_over_start_mib": run_peak_mib,
        "peak_mem_mib": start_mib + max(warmup_peak_mib, run_peak_mib),
        "peak_over_start_mib": max(warmup_peak_mib, run_peak_mib),
    }


def profile_step(engine: FastEngine, rows: int) -> dict[str, Any]:
    """Per decode step: kernels and their GPU time (``torch.profiler``) for the replayed graph
    and for the same step run eagerly, and the replay's time by CUDA events. Every row is held
    still (the trash slot), which runs the same kernels as decoding rows."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = engine.check_every_tokens
    engine._active.zero_()
    activities = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]

    def replay() -> None:
        engine._step_idx.zero_()
        for _ in range(steps):
            engine._decode_step(rows)

    def eager() -> None:
        engine._step_idx.zero_()
        with torch.inference_mode(), engine._attention():
            for _ in range(steps):
                engine._step_fn(rows)

    def count(fn: Callable[[], None]) -> dict[str, float]:
        fn()
        sync()
        with profile(activities=activities) as prof:
            fn()
            sync()
        kernels, device_us, cpu_ops = 0, 0.0, 0
        by_name: list[tuple[str, float, float]] = []
        for event in prof.key_averages():
            if event.device_type == DeviceType.CUDA:
                kernels += event.count
                us = getattr(
                    event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)
                )
                device_us += us
                by_name.append((event.key[:90], event.count / steps, us / steps))
            elif event.key.startswith("aten::"):
                cpu_ops += event.count
        by_name.sort(key=lambda k: -k[2])
        out = {
            "kernels_per_step": kernels / steps,
            "gpu_us_per_step": device_us / steps,
            "top_kernels": [
                {"kernel": k, "per_step": round(c, 2), "us_per_step": round(u, 1)}
                for k, c, u in by_name[:25]
            ],
        }
        if not CUDA:
            out = {"aten_ops_per_step": cpu_ops / steps}
        return out

    result: dict[str, Any] = {"rows": rows, "steps_profiled": steps}
    if engine.use_graphs:
        result["replay"] = count(replay)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replay()
        start.record()
        for _ in range(4):
            replay()
        end.record()
        sync()
        result["replay_ms_per_step"] = start.elapsed_time(end) / (4 * steps)
    result["eager"] = count(eager)
    engine._step_idx.zero_()
    return result


# -- parts -------------------------------------------------------------------------------------


def part_speed(
    name: str, model: Any, rows: int, new: int, bandwidth: float, s: Settings, profile: bool
) -> dict[str, Any]:
    ids = prompts(rows, PROMPT, model.config.vocab_size, seed=1)
    reqs = [GenerateRequest(as_text(p), new) for p in ids]
    floor = floor_tokens_per_s(model, rows, PROMPT + new / 2, bandwidth)
    row: dict[str, Any] = {"name": name, "rows": rows, "new_tokens": new, "floor": floor}
    log(f"== {name}: floor {floor:,.0f} tok/s")
    if rows > 1:
        row["plain"] = guarded("plain", lambda: run_plain(model, reqs, rows))
    for path in s.paths:
        row[path] = guarded(path, lambda p=path: run_path(model, reqs, rows, p, s, profile))
        show(path, row[path], floor, row.get("plain"))
    target = TARGETS.get(name)
    best = max(
        (row[p]["tokens_per_s"] for p in s.paths if "tokens_per_s" in row[p]),
        default=None,
    )
    if target and best is not None:
        row["target_tokens_per_s"] = target
        row["meets_target"] = best >= target
    return row


def show(path: str, r: dict[str, Any], floor: float, plain: dict[str, Any] | None) -> None:
    if "tokens_per_s" not in r:
        return
    r["pct_floor"] = 100 * r["tokens_per_s"] / floor
    memory = ""
    if plain and plain.get("peak_over_start_mib"):
        r["mem_x_plain"] = r["peak_over_start_mib"] / plain["peak_over_start_mib"]
        r["peak_x_plain"] = (
            r["peak_mem_mib"] / plain["peak_mem_mib"] if plain["peak_mem_mib"] else None
        )
        memory = (
            f"  peak +{r['peak_over_start_mib']:,.0f} MiB (plain +"
            f"{plain['peak_over_start_mib']:,.0f}: x{r['mem_x_plain']:.2f}; cache "
            f"{r['cache_mib']:,.0f}, after warm-up +{r['after_warmup_over_start_mib']:,.0f}, "
            f"warm-up peak +{r['warmup_peak_over_start_mib']:,.0f}, runs' peak "
            f"+{r['run_peak_over_start_mib']:,.0f})"
        )
    profile = r.get("step_profile", {})
    kernels = ""
    if "replay" in profile:
        kernels = (
            f"  {profile['replay']['kernels_per_step']:.0f} kernels, "
            f"{profile['replay_ms_per_step']:.3f} ms/step"
        )
    elif "eager" in profile:
        kernels = f"  eager {profile['eager']}"
    log(
        f"  {path:<22} {r['tokens_per_s']:>10,.0f} tok/s  {r['pct_floor']:5.1f}% floor  "
        f"warm-up {r['warmup_s']:.1f} s (check {r['check_s']:.1f}){kernels}{memory}"
    )


FIDELITY_VARIANTS: dict[str, dict[str, Any]] = {
    "native_compiled_fp32_between_ops": {
        "path": "native_compiled",
        "env": {"SLMTUI_COMPILE_EXACT_CASTS": "0"},
    },
    "native_compiled_one_prefill": {"path": "native_compiled", "prefill": 1 << 20},
    **{
        f"{path}_prefill_cudnn_{setting}": {"path": path, "env": {"SLMTUI_PREFILL_CUDNN": setting}}
        for path in ("transformers", "native", "native_compiled")
        for setting in ("never", "batched", "plain")
    },
    "native_one_prefill": {"path": "native", "prefill": 1 << 20},
    "transformers_one_prefill": {"path": "transformers", "prefill": 1 << 20},
    "transformers_no_graphs": {"path": "transformers", "graphs": False},
    **{
        f"{path}_sdpa_{backend.lower()}": {"path": path, "sdpa": backend}
        for path in ("transformers", "native")
        for backend in ("EFFICIENT_ATTENTION", "MATH")
    },
    "native_no_graphs": {"path": "native", "graphs": False},
    **{
        f"{path}_{attention}": {"path": path, "attention": attention}
        for path in ("transformers", "native")
        for attention in ("gqa", "expand", "grouped", "sdpa")
    },
    **{
        f"{path}_{attention}_448": {"path": path, "attention": attention, "capacity": 447}
        for path in ("transformers", "native")
        for attention in ("gqa", "expand")
    },
}
"""Fidelity-only variants: path, environment, prefill chunk tokens (``one_prefill``: every
prompt in one forward, as plain does), decode attention, cache capacity (tokens per row), CUDA
graphs off (``no_graphs``: the same step run eagerly), the SDPA backends allowed while the engine
warms up (captures) and runs (``sdpa_efficient_attention``: not cuDNN, which the masked decode
call gets on the H200 while plain's unmasked call may not)."""


def divergence_margins(
    model: Any, ids: list[list[int]], reference: dict[int, list[int]], outs: dict[int, list[int]]
) -> dict[str, Any]:
    """For each sequence that differs from ``reference``: where it first differs, and the gap
    between the reference forward's two best logits there (a near-tie any rounding flips)."""
    gaps, firsts = [], []
    for i, ref in reference.items():
        mine = outs.get(i, [])
        first = next((j for j, (a, b) in enumerate(zip(ref, mine, strict=False)) if a != b), None)
        if first is None:
            continue
        with torch.inference_mode():
            logits = model(torch.tensor([ids[i] + ref[: first + 1]], device=DEVICE)).logits[0]
        top2 = logits[len(ids[i]) - 1 + first].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        firsts.append(first)
    pairs = sorted(zip(firsts, gaps, strict=True))
    gaps.sort()
    return {
        "first_divergences": [[f, round(g, 4)] for f, g in pairs],
        "first_divergence_median": statistics.median(firsts) if firsts else None,
        "top2_gap_at_divergence_median": statistics.median(gaps) if gaps else None,
        "top2_gap_at_divergence_max": max(gaps) if gaps else None,
        "top2_gaps_at_divergence": [round(g, 4) for g in gaps],
    }


def part_fidelity(model: Any, s: Settings, variants: Sequence[str] = ()) -> dict[str, Any]:
    """bf16: each path's teacher-forced log-probs against transformers' forward; greedy
    sequences identical to plain's, and transformers' static-cache path's; where and at which
    logit gap each path's sequences first leave plain's."""
    n, new = s.fidelity
    ids = prompts(n, PROMPT, model.config.vocab_size, seed=5)
    reqs = [GenerateRequest(as_text(p), new) for p in ids]
    plain = {
        c.index: [int(t) for t in c.response.text.split()]
        for c in PlainEngine(model, IdTokenizer(), batch_size=n).generate(reqs)
    }
    forced = [plain[i] for i in range(n)]
    ref = torch.stack([plain_forward_logprobs(model, ids[i], forced[i]) for i in range(n)])
    static = static_generate(model, ids, new, PROMPT)
    static_outs = dict(enumerate(static))
    row: dict[str, Any] = {
        "name": "fidelity",
        "sequences": n,
        "new_tokens": new,
        "identical_hf_static_vs_plain": sum(static[i] == plain[i] for i in range(n)),
        "hf_static_divergence": divergence_margins(model, ids, plain, static_outs),
        "sdpa_backends": sdpa_backends(model, PROMPT + new + 16) if CUDA else None,
    }
    log(f"== fidelity ({n} x {new}, random weights, bf16)")
    log(
        f"  transformers static cache: identical to plain {row['identical_hf_static_vs_plain']}/{n}"
        f"; top-2 gap where it leaves plain: median "
        f"{row['hf_static_divergence']['top2_gap_at_divergence_median']}"
    )

    def check(variant: dict[str, Any]) -> dict[str, Any]:
        if variant.get("sdpa"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, variant["sdpa"])]):
                return checked({k: v for k, v in variant.items() if k != "sdpa"}) | {
                    "sdpa_backend": variant["sdpa"]
                }
        return checked(variant)

    def checked(variant: dict[str, Any]) -> dict[str, Any]:
        env = variant.get("env", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # for the whole check: some settings are read at each call
        try:
            return checked_here(variant)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def checked_here(variant: dict[str, Any]) -> dict[str, Any]:
        engine = engine_for(
            model,
            n,
            variant["path"],
            s.backend,
            variant.get("prefill"),
            variant.get("attention", "auto"),
        )
        engine.prepare(reqs, [])
        if variant.get("capacity"):
            engine._planned_tokens = variant["capacity"]
        if variant.get("graphs") is False:
            engine.use_graphs = False
        engine.warmup(reqs[:n], [])
        outs = {c.index: [int(t) for t in c.response.text.split()] for c in engine.generate(reqs)}
        diff = (engine.teacher_forced_logprobs(ids, forced) - ref).abs().flatten()
        return {
            "decode_step": engine.decode_step,
            "variant": variant,
            "decode_attention": engine.decode_attention,
            "decode_backends": engine.decode_backends,
            "cache_slots": engine._cache.capacity if engine._cache is not None else None,
            "identical_vs_plain": sum(outs[i] == plain[i] for i in range(n)),
            "identical_vs_hf_static": sum(outs[i] == static[i] for i in range(n)),
            "teacher_forced_abs_diff_max": float(diff.max()),
            "teacher_forced_abs_diff_median": float(diff.median()),
            "native_max_abs_diff_at_warmup": engine.warmup_report.native_max_abs_diff,
            "divergence": divergence_margins(model, ids, plain, outs),
        }

    runs: dict[str, dict[str, Any]] = {path: {"path": path} for path in s.paths}
    runs.update({name: FIDELITY_VARIANTS[name] for name in variants})
    for name, variant in runs.items():
        reset_memory()
        result = guarded(name, lambda v=variant: check(v))
        row[name] = result
        if "error" not in result:
            result["meets_hf_static"] = (
                result["identical_vs_plain"] >= row["identical_hf_static_vs_plain"]
            )
            log(
                f"  {name:<34} identical to plain {result['identical_vs_plain']}/{n}, to the "
                f"static path {result['identical_vs_hf_static']}/{n}; teacher-forced |dlogp| "
                f"max {result['teacher_forced_abs_diff_max']:.3g} median "
                f"{result['teacher_forced_abs_diff_median']:.3g}; top-2 gap at divergence median "
                f"{result['divergence']['top2_gap_at_divergence_median']}"
            )
    return row


def part_int4(model: Any, new: int, bandwidth: float, s: Settings) -> dict[str, Any]:
    """7B int4 (quantised in place, fused groups) native compiled vs bf16 native compiled."""
    from slmtui.worker.quantize import quantize_model

    ids = prompts(1, PROMPT, model.config.vocab_size, seed=1)
    reqs = [GenerateRequest(as_text(ids[0]), new)]
    row: dict[str, Any] = {"name": "b1 Qwen2.5-7B int4", "new_tokens": new}
    row["bf16"] = guarded("bf16", lambda: run_path(model, reqs, 1, "native_compiled", s))
    reset_memory()
    started = time.perf_counter()
    info = quantize_model(model, "int4")
    row["quantize"] = {k: v for k, v in info.items() if k != "quantize_skipped"}
    row["quantize"]["seconds"] = time.perf_counter() - started
    row["int4"] = guarded("int4", lambda: run_path(model, reqs, 1, "native_compiled", s))
    if "tokens_per_s" in row["bf16"] and "tokens_per_s" in row["int4"]:
        row["int4_x_bf16"] = row["int4"]["tokens_per_s"] / row["bf16"]["tokens_per_s"]
        row["meets_1_6x"] = row["int4_x_bf16"] >= 1.6
        log(f"== int4 / bf16 (7B, native compiled, batch 1): x{row['int4_x_bf16']:.2f}")
    return row


def part_warm(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """The native compiled warm-up in a second process over the same compile cache."""
    cases = "0.5b:1,0.5b:64" + ("" if "b1-7b" not in args.parts else ",7b:1")
    if args.smoke:
        cases = "0.5b:1,0.5b:4"
    argv = [sys.executable, __file__, "--probe", cases, *(["--smoke"] if args.smoke else [])]
    env = dict(os.environ, SLMTUI_CACHE_DIR=str(cache))
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe exited {proc.returncode}: {proc.stderr[-600:]}")
    result = json.loads(lines[-1])
    result["process_wall_s"] = time.perf_counter() - started
    for case, r in result["cases"].items():
        log(f"  warm {case}: warm-up {r.get('warmup_s', float('nan')):.1f} s ({r})")
    return {"name": "warm", **result}


def probe(cases: str, smoke: bool) -> None:
    """(Child process) each case's native compiled warm-up; one JSON line on stdout."""
    s = Settings(smoke, 1, False)
    out: dict[str, Any] = {"cases": {}, "compile_cache": os.environ.get("SLMTUI_CACHE_DIR")}
    held: dict[str, Any] = {}
    for case in cases.split(","):
        key, rows_text = case.split(":")
        rows = int(rows_text)
        if key not in held:
            held.clear()
            reset_memory()
            held[key] = fused_model(key, s)
        model = held[key]
        ids = prompts(rows, PROMPT, model.config.vocab_size, seed=1)
        new = s.new_b1 if rows == 1 else s.new_batched
        reqs = [GenerateRequest(as_text(p), new) for p in ids]
        try:
            engine = engine_for(model, rows, "native_compiled", s.backend)
            engine.prepare(reqs, [])
            warm_s, _ = timed(lambda e=engine, r=reqs[:rows]: e.warmup(r, []))
            out["cases"][case] = {
                "warmup_s": warm_s,
                "check_s": engine.warmup_report.check_s,
                "capture_s": engine.warmup_report.capture_s,
                "decode_step": engine.decode_step,
                "meets_warm_target": warm_s <= WARMUP_WARM_TARGET_S,
            }
            del engine
        except Exception as exc:
            out["cases"][case] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(json.dumps(out), flush=True)


def fused_model(key: str, s: Settings) -> Any:
    """The model, its QKV and gate/up fused at once (row views: transformers' forward is
    unchanged), so that no path's peak holds the fusion's one-layer transient."""
    model = build_model(QWEN25_05B if key == "0.5b" else QWEN25_7B, s.layers)
    fuse_projections(model)
    reset_memory()
    return model


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # a path that fails is reported, the bench goes on
        log(f"  {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--smoke", action="store_true", help="2-layer models, CPU-sized")
    parser.add_argument("--parts", default=DEFAULT_PARTS, help=f"default: {DEFAULT_PARTS}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (best)")
    parser.add_argument("--with-transformers-compiled", action="store_true")
    parser.add_argument("--deadline-s", type=float, default=480.0, help="0: none")
    parser.add_argument(
        "--compile-cache", type=Path, default=None, help="default: a fresh temporary directory"
    )
    parser.add_argument(
        "--fidelity-sequences", type=int, default=32, help="prompts in the fidelity part"
    )
    parser.add_argument(
        "--fidelity-variants",
        default="",
        help=f"also in the fidelity part, comma-separated: {', '.join(FIDELITY_VARIANTS)}",
    )
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, args.smoke)
        return
    began = time.perf_counter()
    cache = args.compile_cache or Path(tempfile.mkdtemp(prefix="slmtui-native-compile-"))
    os.environ["SLMTUI_CACHE_DIR"] = str(cache)  # empty: the first compile of a shape is cold
    s = Settings(args.smoke, args.repeats if not args.smoke else 1, args.with_transformers_compiled)
    if not args.smoke:
        s.fidelity = (args.fidelity_sequences, s.fidelity[1])
    import transformers

    result: dict[str, Any] = {
        **run_environment(args.smoke),
        "compile_cache": str(cache),
        "compile_backend": s.backend,
        "paths": s.paths,
        "parts": [],
    }
    bandwidth = copy_bandwidth_bytes_per_s()
    result["copy_bandwidth_gb_per_s"] = bandwidth / 1e9
    log(f"{result['device']}  torch {torch.__version__}  transformers {transformers.__version__}")
    log(f"device-to-device copy: {bandwidth / 1e9:,.0f} GB/s; compile cache {cache}")

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))

    held: dict[str, Any] = {}

    def model(key: str) -> Any:
        """One model at a time (7B: 15 GiB)."""
        if key not in held:
            held.clear()
            reset_memory()
            held[key] = fused_model(key, s)
            result[f"weight_mib_per_step_{key}"] = weight_bytes_per_step(held[key]) / MIB
        return held[key]

    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "b1-0.5b": lambda: part_speed(
            "b1 Qwen2.5-0.5B", model("0.5b"), 1, s.new_b1, bandwidth, s, True
        ),
        "b64": lambda: part_speed(
            "b64 Qwen2.5-0.5B", model("0.5b"), s.rows_small, s.new_batched, bandwidth, s, True
        ),
        "b256": lambda: part_speed(
            "b256 Qwen2.5-0.5B", model("0.5b"), s.rows_big, s.new_batched, bandwidth, s, False
        ),
        "fidelity": lambda: part_fidelity(
            model("0.5b"), s, [v for v in args.fidelity_variants.split(",") if v]
        ),
        "b1-7b": lambda: part_speed(
            "b1 Qwen2.5-7B", model("7b"), 1, s.new_b1_7b, bandwidth, s, True
        ),
        "warm": lambda: part_warm(args, cache),
        "b1-7b-int4": lambda: part_int4(model("7b"), s.new_b1_7b, bandwidth, s),
    }
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        if name not in parts:
            raise SystemExit(f"--parts: unknown '{name}'; allowed: {', '.join(parts)}")
        started = time.perf_counter()
        if args.deadline_s and started - began > args.deadline_s:
            log(f"  ({name}: skipped, past the {args.deadline_s:.0f} s deadline)")
            result.setdefault("skipped", []).append(name)
            continue
        entry = guarded(name, parts[name])
        entry.setdefault("name", name)
        entry["wall_s"] = time.perf_counter() - started
        result["parts"].append(entry)
        log(f"  ({name}: {entry['wall_s']:.0f} s)")
        save()
    result["wall_s"] = time.perf_counter() - began
    result["summary"] = summary(result)
    log(json.dumps(result["summary"], indent=1))
    save()
    if args.compile_cache is None:  # the fresh cache this run made
        shutil.rmtree(cache, ignore_errors=True)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's table: best tokens/s per row and path, memory ratios, warm-ups."""
    out: dict[str, Any] = {}
    for part in result["parts"]:
        name = part.get("name", "")
        for path in PATHS:
            r = part.get(path)
            if not isinstance(r, dict):
                continue
            entry = {
                k: r[k]
                for k in (
                    "tokens_per_s",
                    "pct_floor",
                    "warmup_s",
                    "mem_x_plain",
                    "identical_vs_plain",
                    "teacher_forced_abs_diff_max",
                    "teacher_forced_abs_diff_median",
                    "error",
                )
                if k in r
            }
            profile = r.get("step_profile", {})
            if "replay" in profile:
                entry["kernels_per_step"] = profile["replay"]["kernels_per_step"]
                entry["replay_ms_per_step"] = profile["replay_ms_per_step"]
            if "eager" in profile:
                entry["eager_profile"] = profile["eager"]
            out[f"{name} / {path}"] = entry
        if name == "warm":
            out["warm"] = part.get("cases")
        if name.startswith("b1 Qwen2.5-7B int4"):
            out["int4_x_bf16"] = part.get("int4_x_bf16")
    return out


if __name__ == "__main__":
    main()
