"""Fast engine vs plain vs transformers' best path, on one GPU, in one call.

    PYTHONUNBUFFERED=1 python bench/engine.py --out results.json            # every GPU row
    python bench/engine.py --smoke                                         # 2-layer models, seconds

``--smoke`` also runs on a CPU (tiny widths, no compile, no bandwidth meaning): a dry run of the
code paths before the GPU call.

Models are random-initialised from the real Qwen2.5-0.5B and Qwen2.5-7B configs (below; no hub),
in bfloat16. Speed and memory are real; the text is meaningless (accuracy is not measured here).
Prompts are random token ids written as text for a whitespace "tokenizer", so every engine sees
exactly the same ids; EOS is switched off so every sequence runs its full budget.

Rows (each prints plain, transformers' best path where one applies, fast, and the ratios):
  b1-0.5b, b1-7b      one sequence, 128-token prompt, 128 new tokens: plain generate,
                      transformers' static cache + torch.compile generate, fast (graphs), and
                      fast with the decode step compiled (0.5B only)
  b64, b256           Qwen2.5-0.5B, 64 / 256 sequences, 128-token prompts, 256 new tokens: plain
                      generate at that batch size, transformers' generate_batch (continuous
                      batching, as many requests as sequences), fast
  loglik              Qwen2.5-0.5B, hellaswag-shaped: 256 items, 96-token context, 4 endings of 24
                      tokens, batch 32: plain engine vs fast engine, items/s
  fidelity            Qwen2.5-0.5B, 32 prompts x 64 tokens: teacher-forced log-probs of the fast
                      decode path (graphs) vs one plain forward; greedy sequences identical to plain
                      for fast (every decode attention: auto, gqa, grouped, sdpa) and for
                      transformers' static-cache generate; the SDPA backend of each decode call
The b1 and batched rows also run fast with every other decode attention (``fast_<name>``:
gqa, expand, grouped = the earlier default, sdpa; ``--no-variants`` skips them). ``b1`` is short
for ``b1-0.5b``.

Floor: a device-to-device copy measures the memory bandwidth in the same run; a decode step must
at least read the weights (all parameters but an untied input embedding) and, batched, the KV
cache. ``floor_tokens_per_s`` = rows / (bytes per step / bandwidth); "% of floor" is the measured
rate over it. Peak memory is ``torch.cuda.max_memory_allocated`` from engine construction to the
end of its run (weights included, same for every engine), in MiB.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmtui.tasks.base import GenerateRequest, LoglikelihoodRequest
from slmtui.worker.engines.fast import DECODE_ATTENTIONS, FastEngine, decode_backend
from slmtui.worker.engines.plain import PlainEngine

MIB = 2**20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEVICE == "cuda"

TARGETS: dict[str, dict[str, Any]] = {
    "b1 Qwen2.5-0.5B": {"fast_tokens_per_s": 800, "issue_plain": "34-41", "issue_hf_best": 284},
    "b1 Qwen2.5-7B": {"fast_tokens_per_s": 150, "issue_plain": "34-36", "issue_hf_best": 106},
    "b64 Qwen2.5-0.5B": {"fast_tokens_per_s": 20_000, "issue_plain": 1331, "issue_hf_best": 650},
    "b256 Qwen2.5-0.5B": {"fast_tokens_per_s": 30_000, "issue_hf_best": 1981},
}
"""Issue 9's targets table (H100, bf16), printed beside the measured rows."""
WARMUP_TARGET_S = 20.0
BENCH_ORDER = ("gqa", "grouped", "sdpa", "expand")
"""Decode attentions in the order the bench runs them: ``expand`` (stride-0 K/V heads, the one
a kernel is likeliest to refuse) last."""
assert sorted(BENCH_ORDER) == sorted(DECODE_ATTENTIONS)
MEMORY_TARGET_X = 1.10

QWEN25_05B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
"""Qwen/Qwen2.5-0.5B config.json (model fields)."""

QWEN25_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
"""Qwen/Qwen2.5-7B config.json (model fields)."""

SMOKE_CPU: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
}
"""Widths for ``--smoke`` on a CPU (the real vocabulary alone would take minutes there)."""


class IdTokenizer:
    """Text is whitespace-separated token ids: prompts reach every engine as the same ids."""

    pad_token_id = 0
    eos_token_id = None
    bos_token_id = None

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """One text's ids, or a list of texts' (``Engine.prepare`` tokenises in batches)."""
        if isinstance(text, list):
            return {"input_ids": [[int(t) for t in item.split()] for item in text]}
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)


# -- helpers ------------------------------------------------------------------------------------


def build_model(config: dict[str, Any], layers: int | None = None) -> Any:
    from transformers import Qwen2Config

    fields = dict(config)
    if layers is not None:
        fields["num_hidden_layers"] = layers
        fields["max_window_layers"] = layers
        if not CUDA:
            fields.update(SMOKE_CPU)
    cfg = Qwen2Config(**fields, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    return random_model(cfg, attn_implementation="sdpa")


def random_model(config: Any, **kwargs: Any) -> Any:
    """A bf16 model of ``config`` on the bench device, random weights (seed 0), eval mode, no
    EOS (every sequence runs its full budget) and pad id 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes_per_step(model: Any) -> int:
    """Parameters a decode step reads: all but an untied input embedding (one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def kv_bytes_per_token(model: Any) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2  # K and V, bf16


def copy_bandwidth_bytes_per_s() -> float:
    """Device-to-device copy of 1 GiB: bytes moved (read + write) per second, best of 10.

    The floor treats this as the rate at which a decode step can stream its bytes (DESIGN.md's
    0.33 ms/token for Qwen2.5-0.5B is 0.99 GB at 3.0 TB/s, the same convention).
    On a CPU (smoke runs) a 64 MiB copy timed by the host clock."""
    size = 2**30 if CUDA else 2**26
    x = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    best = float("inf")
    for _ in range(10):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.copy_(x)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            y.copy_(x)
            best = min(best, time.perf_counter() - began)
    del x, y
    return 2 * size / best


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def as_text(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def reset_memory() -> float:
    """Collect, reset the peak; the memory still allocated (MiB: the weights, plus whatever an
    earlier path has not returned: run 3 saw later paths of a row start higher each time)."""
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MIB
    return 0.0


def peak_mib() -> float:
    """torch's peak allocated memory since the last reset (0 on a CPU: not measured there)."""
    return torch.cuda.max_memory_allocated() / MIB if CUDA else 0.0


def floor_tokens_per_s(model: Any, rows: int, mean_context: float, bandwidth: float) -> float:
    step_bytes = weight_bytes_per_step(model) + rows * mean_context * kv_bytes_per_token(model)
    return rows / (step_bytes / bandwidth)


def log(*parts: Any) -> None:
    print(*parts, flush=True)


# -- engines ------------------------------------------------------------------------------------


def run_engine(
    engine_cls: type, model: Any, reqs: list[GenerateRequest], batch: int, **kwargs: Any
) -> dict[str, Any]:
    """Construct, warm up (timed apart), run; tokens/s over the run, peak memory (also over
    the memory allocated at the start, so that what an earlier path left does not count)."""
    start_mib = reset_memory()
    engine = engine_cls(model, IdTokenizer(), batch_size=batch, **kwargs)
    warm_s, _ = timed(lambda e=engine: e.warmup(reqs[:batch], []))
    run_s, done = timed(lambda e=engine: list(e.generate(reqs)))
    tokens = sum(c.tokens_out for c in done)
    out = {
        "tokens": tokens,
        "seconds": run_s,
        "tokens_per_s": tokens / run_s,
        "warmup_s": warm_s,
        "peak_mem_mib": peak_mib(),
        "start_mem_mib": start_mib,
        "peak_over_start_mib": peak_mib() - start_mib,
        "outputs": {c.index: [int(t) for t in c.response.text.split()] for c in done},
    }
    report = getattr(engine, "warmup_report", None)
    if report is not None:
        out.update(capture_s=report.capture_s, compile_graphs=report.graphs)
    if hasattr(engine, "decode_attention"):
        out.update(decode_attention=engine.decode_attention, decode_backends=engine.decode_backends)
    del engine
    return out


def run_hf_static_compiled(model: Any, ids: list[list[int]], new: int) -> dict[str, Any]:
    """transformers' static cache + compiled generate (batch 1): warm-up = first two calls."""
    reset_memory()
    input_ids = torch.tensor(ids, device=DEVICE)
    kwargs = dict(
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
        disable_compile=not CUDA,  # a CPU smoke run checks the call, not inductor
    )
    warm_s, _ = timed(lambda: [model.generate(input_ids, **kwargs) for _ in range(2)])
    run_s, out = timed(lambda: model.generate(input_ids, **kwargs))
    tokens = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    return {
        "tokens": tokens,
        "seconds": run_s,
        "tokens_per_s": tokens / run_s,
        "warmup_s": warm_s,
        "peak_mem_mib": peak_mib(),
    }


def run_hf_generate_batch(model: Any, ids: list[list[int]], new: int) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``); its own warm-up is timed apart."""
    from transformers import GenerationConfig

    reset_memory()
    config = GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    kwargs: dict[str, Any] = {}
    if "persistent_manager" in inspect.signature(model.generate_batch).parameters:
        kwargs["persistent_manager"] = True  # the timed call reuses the warmed-up manager
    warm_s, _ = timed(
        lambda: model.generate_batch(inputs=ids[:4], generation_config=config, **kwargs)
    )
    run_s, out = timed(lambda: model.generate_batch(inputs=ids, generation_config=config, **kwargs))
    if kwargs and hasattr(model, "destroy_cached_continuous_batching_manager"):
        model.destroy_cached_continuous_batching_manager()
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {
        "requests": len(ids),
        "persistent_manager": bool(kwargs),
        "sequences_returned": len(out),
        "tokens": tokens,
        "seconds": run_s,
        "tokens_per_s": tokens / run_s,
        "warmup_s": warm_s,
        "peak_mem_mib": peak_mib(),
    }


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # a path that fails is reported, the bench goes on
        log(f"  {name} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def over(result: dict[str, Any]) -> str:
    """ ", +N MiB over its start" when the path started with more allocated than the weights."""
    if "peak_over_start_mib" not in result:
        return ""
    return f"; +{result['peak_over_start_mib']:,.0f} over start {result['start_mem_mib']:,.0f}"


def summarise(row: dict[str, Any], floor: float) -> None:
    """Ratios to plain and to transformers' best path, % of the floor, targets; prints the row.

    transformers' best path is the fastest of the ``hf_*`` entries measured in the row.
    """
    plain = row["plain"].get("tokens_per_s")
    hf = {
        k: v["tokens_per_s"] for k, v in row.items() if k.startswith("hf_") and "tokens_per_s" in v
    }
    best_key = max(hf, key=hf.__getitem__) if hf else None
    best = hf[best_key] if best_key else None
    row["hf_best"] = best_key
    log(f"== {row['name']}  floor {floor:,.0f} tok/s")
    for key, result in row.items():
        if not isinstance(result, dict) or "tokens_per_s" not in result:
            continue
        rate = result["tokens_per_s"]
        result["x_plain"] = rate / plain if plain else None
        result["x_hf_best"] = rate / best if best else None
        result["pct_floor"] = 100 * rate / floor
        if "peak_mem_mib" in row["plain"] and row["plain"]["peak_mem_mib"]:
            result["mem_x_plain"] = result["peak_mem_mib"] / row["plain"]["peak_mem_mib"]
        result.pop("outputs", None)
        extra = f" warm-up {result['warmup_s']:.1f} s" if "warmup_s" in result else ""
        log(
            f"  {key:<18} {rate:>10,.0f} tok/s  x{result['x_plain'] or 0:>6.1f} plain"
            f"  x{result['x_hf_best'] or 0:>5.2f} hf-best  {result['pct_floor']:5.1f}% floor"
            f"  peak {result['peak_mem_mib']:,.0f} MiB"
            f" (x{result.get('mem_x_plain') or 0:.2f} plain"
            f"{over(result)}){extra}"
        )
    row["floor_tokens_per_s"] = floor
    target = TARGETS.get(row["name"])
    fast = row.get("fast", {})
    if target and "tokens_per_s" in fast:
        row["target"] = target
        row["meets"] = {
            "tokens_per_s": fast["tokens_per_s"] >= target["fast_tokens_per_s"],
            "warmup_s": fast["warmup_s"] <= WARMUP_TARGET_S,
            "memory": fast.get("mem_x_plain") is None or fast["mem_x_plain"] <= MEMORY_TARGET_X,
        }
        log(f"  target fast >= {target['fast_tokens_per_s']:,} tok/s: {row['meets']}")


# -- rows ---------------------------------------------------------------------------------------


def row_batch1(
    name: str,
    model: Any,
    bandwidth: float,
    new: int,
    compiled: bool,
    hf_compiled: bool,
    variants: bool = False,
) -> dict[str, Any]:
    ids = prompts(1, 128, model.config.vocab_size, seed=1)
    reqs = [GenerateRequest(as_text(ids[0]), new)]
    row: dict[str, Any] = {"name": name, "prompt_tokens": 128, "new_tokens": new, "rows": 1}
    plain_reqs = [GenerateRequest(as_text(ids[0]), min(new, 32))]
    row["plain"] = guarded("plain", lambda: run_engine(PlainEngine, model, plain_reqs, 1))
    row["plain"]["note"] = f"{min(new, 32)} new tokens (its rate does not depend on the count)"
    if hf_compiled:
        row["hf_static_compiled"] = guarded(
            "hf static+compile", lambda: run_hf_static_compiled(model, ids, new)
        )
    row["fast"] = guarded("fast", lambda: run_engine(FastEngine, model, reqs, 1))
    if variants:  # every other decode attention, for its speed and memory
        for variant in BENCH_ORDER:
            if variant != row["fast"].get("decode_attention"):
                row[f"fast_{variant}"] = guarded(
                    f"fast {variant}",
                    lambda v=variant: run_engine(FastEngine, model, reqs, 1, decode_attention=v),
                )
    if compiled:
        row["fast_compiled"] = guarded(
            "fast compiled",
            lambda: run_engine(FastEngine, model, reqs, 1, compile_step=True),
        )
    summarise(row, floor_tokens_per_s(model, 1, 128 + new / 2, bandwidth))
    return row


def row_batched(
    name: str,
    model: Any,
    bandwidth: float,
    n: int,
    new: int,
    hf_batch: bool,
    variants: bool = False,
) -> dict[str, Any]:
    """Plain generate at batch n is also transformers' best plain path here; ``generate_batch``
    (continuous batching) is its other batched path."""
    ids = prompts(n, 128, model.config.vocab_size, seed=2)
    reqs = [GenerateRequest(as_text(p), new) for p in ids]
    row: dict[str, Any] = {"name": name, "prompt_tokens": 128, "new_tokens": new, "rows": n}
    row["plain"] = guarded("plain", lambda: run_engine(PlainEngine, model, reqs, n))
    if hf_batch:
        row["hf_generate_batch"] = guarded(
            "hf generate_batch", lambda: run_hf_generate_batch(model, ids, new)
        )
    row["fast"] = guarded("fast", lambda: run_engine(FastEngine, model, reqs, n))
    if variants:  # every other decode attention, for its speed and memory
        for variant in BENCH_ORDER:
            if variant != row["fast"].get("decode_attention"):
                row[f"fast_{variant}"] = guarded(
                    f"fast {variant}",
                    lambda v=variant: run_engine(FastEngine, model, reqs, n, decode_attention=v),
                )
    summarise(row, floor_tokens_per_s(model, n, 128 + new / 2, bandwidth))
    return row


def row_loglik(model: Any, items: int, batch: int) -> dict[str, Any]:
    vocab = model.config.vocab_size
    contexts = prompts(items, 96, vocab, seed=3)
    endings = prompts(items * 4, 24, vocab, seed=4)
    reqs = [
        LoglikelihoodRequest(as_text(c), tuple(" " + as_text(endings[4 * i + k]) for k in range(4)))
        for i, c in enumerate(contexts)
    ]
    row: dict[str, Any] = {"name": "loglik", "items": items, "batch": batch}
    answers = {}
    for key, cls in (("plain", PlainEngine), ("fast", FastEngine)):
        reset_memory()
        engine = cls(model, IdTokenizer(), batch_size=batch)
        warm_s, _ = timed(lambda e=engine: e.warmup([], reqs[:batch]))
        run_s, done = timed(lambda e=engine: list(e.loglikelihood(reqs)))
        answers[key] = {c.index: c.response.logprobs for c in done}
        row[key] = {
            "items_per_s": items / run_s,
            "seconds": run_s,
            "warmup_s": warm_s,
            "peak_mem_mib": peak_mib(),
        }
    diffs = torch.tensor(
        [
            abs(a - b)
            for i in answers["plain"]
            for a, b in zip(answers["plain"][i], answers["fast"][i], strict=True)
        ]
    )
    same_choice = sum(
        max(range(4), key=lambda k, i=i: answers["plain"][i][k])
        == max(range(4), key=lambda k, i=i: answers["fast"][i][k])
        for i in answers["plain"]
    )
    row["fast"]["x_plain"] = row["fast"]["items_per_s"] / row["plain"]["items_per_s"]
    row["logprob_abs_diff_max"] = float(diffs.max())
    row["logprob_abs_diff_median"] = float(diffs.median())
    row["same_choice"] = f"{same_choice}/{items}"
    log(
        f"== loglik ({items} items x 4 endings, batch {batch})\n"
        f"  plain {row['plain']['items_per_s']:,.1f} items/s  fast "
        f"{row['fast']['items_per_s']:,.1f} items/s  x{row['fast']['x_plain']:.2f}; "
        f"peak {row['plain']['peak_mem_mib']:,.0f} vs {row['fast']['peak_mem_mib']:,.0f} MiB; "
        f"|dlogp| max {row['logprob_abs_diff_max']:.3g} median "
        f"{row['logprob_abs_diff_median']:.3g}; same argmax choice {row['same_choice']}"
    )
    return row


def plain_forward_logprobs(model: Any, prompt: list[int], forced: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + forced], device=DEVICE)).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(1, torch.tensor(forced, device=DEVICE)[:, None]).squeeze(1)


def sdpa_backends(model: Any, capacity: int) -> dict[str, str]:
    """The SDPA backend this device picks for each decode attention's call (batch 1), and for
    plain's decode call (no mask, GQA in the kernel)."""
    from torch.nn.attention import SDPBackend

    c = model.config
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    dtype = next(model.parameters()).dtype
    out = {v: decode_backend(v, heads, kv, dim, capacity, dtype, DEVICE) for v in DECODE_ATTENTIONS}
    query = torch.zeros((1, heads, 1, dim), dtype=dtype, device=DEVICE)
    key = torch.zeros((1, kv, capacity, dim), dtype=dtype, device=DEVICE)
    choice = int(torch._fused_sdp_choice(query, key, key, dropout_p=0.0, enable_gqa=True))
    names = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    out["plain decode"] = next(
        (n for n in names if hasattr(SDPBackend, n) and getattr(SDPBackend, n).value == choice),
        str(choice),
    )
    return out


def row_fidelity(model: Any, n: int, new: int) -> dict[str, Any]:
    """Greedy sequences identical to plain's (fast's decode attentions, transformers' static
    cache) and teacher-forced log-probs of each fast decode attention against a plain forward."""
    ids = prompts(n, 128, model.config.vocab_size, seed=5)
    reqs = [GenerateRequest(as_text(p), new) for p in ids]
    plain = run_engine(PlainEngine, model, reqs, n)["outputs"]
    forced = [plain[i] for i in range(n)]
    ref = torch.stack([plain_forward_logprobs(model, ids[i], forced[i]) for i in range(n)])
    row: dict[str, Any] = {"name": "fidelity", "sequences": n, "new_tokens": new}
    row["sdpa_backend"] = sdpa_backends(model, 128 + new)
    variants: dict[str, dict[str, Any]] = {}

    def identity(variant: str) -> dict[str, Any]:
        engine = FastEngine(model, IdTokenizer(), batch_size=n, decode_attention=variant)
        outs = {c.index: [int(t) for t in c.response.text.split()] for c in engine.generate(reqs)}
        diff = (engine.teacher_forced_logprobs(ids, forced) - ref).abs().flatten()
        return {
            "decode_attention": engine.decode_attention,
            "identical_vs_plain": sum(outs[i] == plain[i] for i in range(n)),
            "teacher_forced_abs_diff_max": float(diff.max()),
            "teacher_forced_abs_diff_median": float(diff.median()),
        }

    static = static_generate(model, ids, new, 128)
    # the same plain forward, batched with the sequences of the others: bf16's own spread
    with torch.inference_mode():
        logits = model(
            torch.tensor([p + f for p, f in zip(ids, forced, strict=True)], device=DEVICE)
        )
        logp = torch.log_softmax(logits.logits[:, 127:-1].float(), dim=-1)
        batched = logp.gather(2, torch.tensor(forced, device=DEVICE)[:, :, None]).squeeze(2)
    spread = (batched - ref).abs().flatten()
    for variant in ("auto", *BENCH_ORDER):
        variants[variant] = guarded(f"fast {variant}", lambda v=variant: identity(v))
    default = variants["auto"]
    row.update(
        {
            "fast_decode_attention": default.get("decode_attention"),
            "teacher_forced_abs_diff_max": default.get("teacher_forced_abs_diff_max"),
            "teacher_forced_abs_diff_median": default.get("teacher_forced_abs_diff_median"),
            "plain_batched_vs_single_abs_diff_max": float(spread.max()),
            "plain_batched_vs_single_abs_diff_median": float(spread.median()),
            "identical_fast_vs_plain": default.get("identical_vs_plain", -1),
            "identical_hf_static_vs_plain": sum(static[i] == plain[i] for i in range(n)),
            "decode_attention_variants": variants,
        }
    )
    row["fast_meets_hf_static"] = (
        row["identical_fast_vs_plain"] >= row["identical_hf_static_vs_plain"]
    )
    log(
        f"== fidelity ({n} x {new} tokens, random weights)\n"
        f"  SDPA backends: {row['sdpa_backend']}\n"
        "  plain batched vs single forward: max "
        f"{row['plain_batched_vs_single_abs_diff_max']:.3g} median "
        f"{row['plain_batched_vs_single_abs_diff_median']:.3g}\n"
        f"  identical greedy sequences vs plain: transformers static cache "
        f"{row['identical_hf_static_vs_plain']}/{n}"
    )
    for variant, v in variants.items():
        if "error" in v:
            continue
        log(
            f"  fast decode {variant:<8} ({v['decode_attention']}): identical "
            f"{v['identical_vs_plain']}/{n}, teacher-forced |dlogp| max "
            f"{v['teacher_forced_abs_diff_max']:.3g} median "
            f"{v['teacher_forced_abs_diff_median']:.3g}"
        )
    log(f"  fast (default) >= transformers static: {row['fast_meets_hf_static']}")
    return row


# -- main ---------------------------------------------------------------------------------------


def run_environment(smoke: bool) -> dict[str, Any]:
    """What every bench result file starts with: date, command, device and versions."""
    import transformers

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "smoke": smoke,
    }


def static_generate(model: Any, ids: list[list[int]], new: int, prompt: int) -> list[list[int]]:
    """transformers' static-cache greedy ``generate`` of exactly ``new`` tokens per row (the
    fidelity reference), the prompt's ``prompt`` tokens cut off."""
    with torch.inference_mode():
        return model.generate(
            torch.tensor(ids, device=DEVICE),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
            disable_compile=True,
        )[:, prompt:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument("--smoke", action="store_true", help="2-layer models, small counts")
    parser.add_argument(
        "--rows",
        default="fidelity,b1-0.5b,b64,b256,b1-7b,loglik",
        help="comma-separated rows to run",
    )
    parser.add_argument("--no-hf-compile", action="store_true")
    parser.add_argument("--no-hf-batch", action="store_true")
    parser.add_argument("--no-fast-compile", action="store_true")
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="skip fast with the other decode attentions in the b1/b64/b256 rows",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="start no further row once this many seconds have passed (0: no limit)",
    )
    args = parser.parse_args()
    began = time.perf_counter()
    if not CUDA:
        args.no_fast_compile = True  # inductor on 2 CPU cores: minutes, and nothing to learn
    import transformers

    rows = args.rows.split(",")
    layers = 2 if args.smoke else None
    result: dict[str, Any] = run_environment(args.smoke)
    bandwidth = copy_bandwidth_bytes_per_s()
    result["copy_bandwidth_gb_per_s"] = bandwidth / 1e9
    log(f"{result['device']}  torch {torch.__version__}  transformers {transformers.__version__}")
    log(f"device-to-device copy: {bandwidth / 1e9:,.0f} GB/s (read + write)")
    out_rows: list[dict[str, Any]] = []
    result["rows"] = out_rows
    n_small, n_big, new = (4, 8, 16) if args.smoke else (64, 256, 256)

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    held: dict[str, Any] = {}

    def model(key: str) -> Any:
        """The row's model, built on first use; only one is held at a time (7B: 15 GiB)."""
        if key not in held:
            held.clear()
            reset_memory()
            config = QWEN25_05B if key == "0.5b" else QWEN25_7B
            held[key] = build_model(config, layers)
            result[f"qwen25_{key.replace('.', '')}_weight_mib_per_step"] = (
                weight_bytes_per_step(held[key]) / MIB
            )
        return held[key]

    def run_row(name: str) -> None:
        if name == "fidelity":
            out_rows.append(
                row_fidelity(model("0.5b"), 4 if args.smoke else 32, 16 if args.smoke else 64)
            )
        elif name in ("b1-0.5b", "b1"):
            out_rows.append(
                row_batch1(
                    "b1 Qwen2.5-0.5B",
                    model("0.5b"),
                    bandwidth,
                    new=32 if args.smoke else 128,
                    compiled=not args.no_fast_compile,
                    hf_compiled=not args.no_hf_compile,
                    variants=not args.no_variants,
                )
            )
        elif name in ("b64", "b256"):
            n = n_small if name == "b64" else n_big
            out_rows.append(
                row_batched(
                    f"{name} Qwen2.5-0.5B",
                    model("0.5b"),
                    bandwidth,
                    n,
                    new,
                    not args.no_hf_batch,
                    variants=not args.no_variants,
                )
            )
        elif name == "loglik":
            out_rows.append(
                row_loglik(model("0.5b"), 32 if args.smoke else 256, 8 if args.smoke else 32)
            )
        elif name == "b1-7b":
            out_rows.append(
                row_batch1(
                    "b1 Qwen2.5-7B",
                    model("7b"),
                    bandwidth,
                    new=32 if args.smoke else 128,
                    compiled=False,
                    hf_compiled=not args.no_hf_compile,
                )
            )
        else:
            raise SystemExit(f"unknown row '{name}'")

    for name in rows:
        started = time.perf_counter()
        if args.deadline_s and started - began > args.deadline_s:
            log(f"  ({name}: skipped, past the {args.deadline_s:.0f} s deadline)")
            result.setdefault("skipped_rows", []).append(name)
            continue
        try:
            run_row(name)
        except Exception as exc:  # one row failing costs only that row
            log(f"  ({name}: failed: {type(exc).__name__}: {exc})")
            out_rows.append({"name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        out_rows[-1]["row_wall_s"] = time.perf_counter() - started
        log(f"  ({name}: {out_rows[-1]['row_wall_s']:.0f} s)")
        save()
    save()


if __name__ == "__main__":
    main()
