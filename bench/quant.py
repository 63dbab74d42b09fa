"""Quantised variants beside full precision: bf16 vs int8 vs int4 weight-only, one GPU.

On the H200 (torch 2.11; torchao 0.18.0 from its wheel: ``pip download torchao==0.18.0 --no-deps
-d .whl`` here, then carry ``.whl``; it is py3-abi3 manylinux x86_64, so Python 3.12 takes it).
Two calls of under ten minutes each (torchao goes to a folder of its own, on PYTHONPATH)::

    python -m pip install -q --no-deps --target /tmp/tao .whl/torchao-0.18.0-*.whl && \
        PYTHONPATH=/tmp/tao:.whl/gemlite-0.6.0.post2 PYTHONUNBUFFERED=1 \
        python bench/quant.py --rows 7b-b1,05b-b64 --out $OUT/quant-1.json
    (the same with --rows 05b-b1,7b-b64 --out $OUT/quant-2.json)

    python bench/quant.py --smoke        # 2-layer models: a dry run, on a CPU too (~1 min)

Variants (``--variants``): ``bf16``; ``int8`` and ``int4`` with torchao's own kernels
(``SLMTUI_QUANT_KERNELS=torchao``; int4 packed in 128-column tiles, ``int4-padded``: torchao's own
tensor, input widths padded to 1,024); ``int8-gemlite`` and ``int4-gemlite`` through torchao's UIntx
tensor with gemlite's Triton kernels (``SLMTUI_QUANT_KERNELS=gemlite``; gemlite 0.6 is pure
Python on triton >= 3.6: ``pip download gemlite==0.6.0.post2 --no-deps -d .whl``, build its
wheel, carry it; the gemlite variants join the default list when gemlite is installed). Each
runs the engine's default decode step (native, layers compiled, on CUDA); a ``+eager`` suffix
runs it with the compile off. One variant failing (a kernel this device lacks, an OOM) costs
only its own entry: the error is recorded and the bench goes on.

Models are random-initialised from the real Qwen2.5-7B and Qwen2.5-0.5B configs (no hub; the
same builder as ``bench/engine.py``), in bfloat16, then quantised in place by the worker's own
``slmtui.worker.quantize.quantize_model`` (torchao; ``slmtui.quantization`` names the schemes).
Speed and memory are real; the text is meaningless (accuracy on real weights: run
``profiles/quant.toml``).

Rows (``--rows``; each runs every variant of ``--variants`` on a freshly built model):
  7b-b1      Qwen2.5-7B, one sequence, 128-token prompt, 128 new tokens (issue 17: int4 >= 1.6x
             and weights <= 0.35x of bf16; int8 >= 1.3x and weights <= 0.55x)
  05b-b64    Qwen2.5-0.5B, 64 sequences, 128-token prompts, 256 new tokens (reported beside bf16)
  05b-b1     Qwen2.5-0.5B, one sequence
  7b-b64     Qwen2.5-7B, 64 sequences
Per entry: ``tokens_per_s`` (best of ``--repeats`` timed runs, after the engine's warm-up),
``x_bf16`` (over the row's bf16 entry), ``weight_bytes`` (as stored: torchao's int data, scales
and zero points; tied matrices once) and ``weights_x_bf16``, ``peak_mem_mib``
(``torch.cuda.max_memory_allocated`` over warm-up and runs, weights included), ``quantize_s``,
``warmup_s``, whether the decode step ran in CUDA graphs, and in b1 rows teacher-forced log-probs
against bf16 on the same prompts (``logprob_abs_diff_*``, ``top1_agreement``: on random weights
these measure quantisation noise, not accuracy; near-tied logits make greedy text diverge).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from importlib.util import find_spec
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
    log,
    plain_forward_logprobs,
    prompts,
    reset_memory,
    run_environment,
    timed,
)

from slmtui.quantization import gemlite_version, torchao_version
from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.plain import PlainEngine
from slmtui.worker.quantize import quantize_model

ROWS: dict[str, tuple[str, dict[str, Any], int]] = {
    "7b-b1": ("Qwen2.5-7B", QWEN25_7B, 1),
    "05b-b64": ("Qwen2.5-0.5B", QWEN25_05B, 64),
    "05b-b1": ("Qwen2.5-0.5B", QWEN25_05B, 1),
    "7b-b64": ("Qwen2.5-7B", QWEN25_7B, 64),
}
"""Row name -> (model, config, sequences)."""
TARGETS: dict[str, dict[str, dict[str, float]]] = {
    "7b-b1": {
        "int4": {"x_bf16_min": 1.6, "weights_x_bf16_max": 0.35},
        "int8": {"x_bf16_min": 1.3, "weights_x_bf16_max": 0.55},
    },
}
"""Issue 17's targets (a variant meets one when any of its entries does)."""
PROMPT_TOKENS = 128
FIDELITY_PROMPTS = 4
FIDELITY_TOKENS = 32


def run_variant(
    config: dict[str, Any],
    layers: int | None,
    variant: str,
    compile_step: bool | None,
    sequences: int,
    new: int,
    repeats: int,
    reference: dict[str, Any],
) -> dict[str, Any]:
    """Build the model, quantise it (``variant``: bf16 = none; ``-gemlite``: gemlite's kernels,
    else torchao's), run the fast engine."""
    quantize, _, library = variant.partition("-")
    quantize = "none" if quantize == "bf16" else quantize
    os.environ["SLMTUI_INT4_PACKING"] = "torchao" if library == "padded" else "tight"
    os.environ["SLMTUI_QUANT_KERNELS"] = "torchao" if library in ("", "padded") else library
    reset_memory()
    model = build_model(config, layers)
    try:
        info = quantize_model(model, quantize)
        out: dict[str, Any] = {
            "weight_bytes": info["weight_bytes"],
            "quantize_scheme": info.get("quantize_scheme"),
            "quantize_s": info.get("quantize_s", 0.0),
            "quantized_layers": info.get("quantized_layers", 0),
            "quantize_kernels": info.get("quantize_kernels"),
            "quantize_fused_groups": info.get("quantize_fused_groups"),
            "quantize_unfused": info.get("quantize_unfused"),
        }
        if sequences == 1 and compile_step is None:
            out.update(fidelity(model, reference, quantize))
        ids = prompts(sequences, PROMPT_TOKENS, model.config.vocab_size, seed=1)
        reqs = [GenerateRequest(as_text(p), new) for p in ids]
        out.update(speed(model, reqs, sequences, compile_step, repeats))
        return out
    finally:
        del model
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()


def speed(
    model: Any, reqs: list[GenerateRequest], batch: int, compile_step: bool | None, repeats: int
) -> dict[str, Any]:
    """Fast engine: warm-up timed apart, best of ``repeats`` runs; peak memory over all.
    ``compile_step`` None: the engine's default (native compiled on CUDA)."""
    start_mib = reset_memory()
    engine = FastEngine(model, IdTokenizer(), batch_size=batch, compile_step=compile_step)
    warm_s, _ = timed(lambda: engine.warmup(reqs[:batch], []))
    best_s, tokens = float("inf"), 0
    for _ in range(repeats):
        seconds, done = timed(lambda: list(engine.generate(reqs)))
        tokens = sum(c.tokens_out for c in done)
        best_s = min(best_s, seconds)
    return {
        "engine": "fast",
        "cuda_graphs": engine.use_graphs,
        "decode_step": engine.decode_step,
        "decode_attention": engine.decode_attention,
        "tokens": tokens,
        "seconds": best_s,
        "tokens_per_s": tokens / best_s,
        "warmup_s": warm_s,
        "peak_mem_mib": torch.cuda.max_memory_allocated() / MIB if CUDA else None,
        "start_mem_mib": start_mib,
        "notes": list(engine.notes),
    }


def fidelity(model: Any, reference: dict[str, Any], quantize: str) -> dict[str, Any]:
    """Teacher-forced log-probs on bf16's greedy tokens against bf16's own (the first variant
    of a b1 row, bf16, sets ``reference``)."""
    vocab = model.config.vocab_size
    ids = prompts(FIDELITY_PROMPTS, PROMPT_TOKENS, vocab, seed=5)
    if quantize == "none" or "forced" not in reference:
        reqs = [GenerateRequest(as_text(p), FIDELITY_TOKENS) for p in ids]
        done = PlainEngine(model, IdTokenizer(), batch_size=1).generate(reqs)
        outputs = {c.index: [int(t) for t in c.response.text.split()] for c in done}
        reference["forced"] = [outputs[i] for i in range(len(ids))]
    forced = reference["forced"]
    logp, top1 = [], []
    for prompt, tokens in zip(ids, forced, strict=True):
        logp.append(plain_forward_logprobs(model, prompt, tokens))
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + tokens], device=DEVICE)).logits[0]
        top1.append(logits[len(prompt) - 1 : -1].argmax(-1).cpu())
    mine = torch.stack(logp).cpu()
    argmax = torch.stack(top1)
    if quantize == "none":
        reference.update(logprobs=mine, argmax=argmax)
        return {}
    if "logprobs" not in reference:
        return {}
    diff = (mine - reference["logprobs"]).abs().flatten()
    return {
        "logprob_abs_diff_median": float(diff.median()),
        "logprob_abs_diff_max": float(diff.max()),
        "top1_agreement": float((argmax == reference["argmax"]).float().mean()),
    }


def judge(name: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the row's bf16 entry of the same step (default or ``+eager``), and the
    issue's targets."""
    for key, entry in entries.items():
        base = entries.get("bf16+eager" if key.endswith("+eager") else "bf16", {})
        if "tokens_per_s" in entry and "tokens_per_s" in base:
            entry["x_bf16"] = entry["tokens_per_s"] / base["tokens_per_s"]
        if "weight_bytes" in entry and "weight_bytes" in entries.get("bf16", {}):
            entry["weights_x_bf16"] = entry["weight_bytes"] / entries["bf16"]["weight_bytes"]
        if entry.get("peak_mem_mib") and base.get("peak_mem_mib"):
            entry["mem_x_bf16"] = entry["peak_mem_mib"] / base["peak_mem_mib"]
    meets: dict[str, Any] = {}
    for variant, target in TARGETS.get(name, {}).items():
        tried = [
            e
            for k, e in entries.items()
            if k.split("+")[0].split("-")[0] == variant and "x_bf16" in e
        ]
        meets[variant] = {
            "speed": any(e["x_bf16"] >= target["x_bf16_min"] for e in tried),
            "weights": any(e["weights_x_bf16"] <= target["weights_x_bf16_max"] for e in tried),
            "target": target,
        }
    return meets


def show(key: str, entry: dict[str, Any]) -> None:
    if "error" in entry:
        log(f"  {key:<14} failed: {entry['error']}")
        return
    mem = f"{entry['peak_mem_mib']:,.0f} MiB" if entry.get("peak_mem_mib") else "-"
    fid = ""
    if "top1_agreement" in entry:
        fid = (
            f"  top1 {entry['top1_agreement']:.2f}"
            f"  |dlogp| med {entry['logprob_abs_diff_median']:.3f}"
        )
    log(
        f"  {key:<14} {entry['tokens_per_s']:>10,.0f} tok/s  x{entry.get('x_bf16', 0):.2f} bf16"
        f"  weights {entry['weight_bytes'] / MIB:,.1f} MiB (x{entry.get('weights_x_bf16', 0):.2f})"
        f"  peak {mem}  warm-up {entry['warmup_s']:.1f} s  {entry['decode_step']}{fid}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument("--smoke", action="store_true", help="2-layer models, small counts")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument(
        "--variants",
        default="bf16,int8,int4" + (",int8-gemlite,int4-gemlite" if find_spec("gemlite") else ""),
        help="comma-separated: bf16, int8, int4, int4-padded, int8-gemlite, int4-gemlite; a "
        "+eager suffix runs the native step uncompiled",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per entry (best)")
    args = parser.parse_args()

    layers = 2 if args.smoke else None
    result: dict[str, Any] = {
        **run_environment(args.smoke),
        "torchao": torchao_version(),
        "gemlite": gemlite_version(),
        "rows": [],
    }
    log(f"{result['device']}  torch {torch.__version__}  torchao {result['torchao']}")

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    began = time.perf_counter()
    for name in args.rows.split(","):
        model_name, config, sequences = ROWS[name]
        sequences = min(sequences, 4) if args.smoke else sequences
        new = (16 if args.smoke else 128) if sequences == 1 else (16 if args.smoke else 256)
        row: dict[str, Any] = {
            "name": name,
            "model": model_name,
            "sequences": sequences,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": new,
            "entries": {},
        }
        result["rows"].append(row)
        log(f"== {name}: {model_name}, {sequences} sequence(s), {new} new tokens")
        reference: dict[str, Any] = {}
        for key in args.variants.split(","):
            variant, _, step = key.partition("+")
            compile_step = False if step == "eager" or not CUDA else None
            try:
                entry = run_variant(
                    config, layers, variant, compile_step, sequences, new, args.repeats, reference
                )
            except Exception as exc:  # one variant failing costs only its own entry
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                entry = {
                    "error": f"{type(exc).__name__}: {first}",
                    "traceback": traceback.format_exc()[-3000:],
                }
                gc.collect()
                if CUDA:
                    torch.cuda.empty_cache()
            row["entries"][key] = entry
            row["meets"] = judge(name, row["entries"])
            show(key, entry)
            save()
        if row.get("meets"):
            log(f"  targets: { {k: (v['speed'], v['weights']) for k, v in row['meets'].items()} }")
    result["total_s"] = time.perf_counter() - began
    save()
    log(f"done in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
