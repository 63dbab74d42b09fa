"""Where bf16 decoding first leaves plain's numbers, module by module and bit for bit.

Issue 15 asks for greedy sequences identical to plain's at least as often as transformers'
static-cache path. Every divergence happens at a near-tie (``bench/native.py --parts
fidelity``), so what decides the count is how often a path computes plain's logits *exactly*.
This probe answers that directly, on Qwen2.5-0.5B's config (random weights, bf16):

* plain's ``generate`` (dynamic cache, batch ``--sequences``) is run with forward hooks on every
  module of interest; its prefill call and its first ``--steps`` decode calls are kept;
* plain again (is plain itself repeatable?), transformers' static cache, and the fast engine's
  transformers step (CUDA graphs off, so the same hooks fire; fed plain's tokens) are run with
  the same hooks and compared with plain's record, bitwise;
* every fast path (native, compiled, transformers; graphs on) is compared on its logits only
  (the native layer has no transformers modules to hook), with plain's 64-row prefill call
  allowed cuDNN (``SLMTUI_PREFILL_CUDNN=batched``, the default) and with ``never``;
* what cuDNN costs a prefill: a first call at a new prompt length against a repeated one.

The same with PyTorch's opt-in ragged cuDNN path, meant to skip the per-length plan, checked
against a plain that ran without it (plain's logits kept in the first process, read in the
second; on the H200 with torch 2.11 the path does not apply to transformers' prefill call, whose
queries and keys are not in BSHD layout: it warns, falls back, and the first call at a new length
still costs ~80 ms, ``bench/results/fidelity_probe_avoid_recompile_h200.json``)::

    python bench/fidelity_probe.py --out $OUT/probe.json --save-reference /tmp/plain.pt && \
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python bench/fidelity_probe.py \
        --reference /tmp/plain.pt --out $OUT/probe_avoid_recompile.json

Per path and call: the first module, in plain's execution order, whose output is not bitwise
plain's, and how many elements, rows and the largest |difference|; the share of rows whose
logits are bitwise plain's at each step. Rows whose input token already differs (the static
path's own greedy choice) are left out of that call's comparison.

    python bench/fidelity_probe.py --out $OUT/probe.json            # H200: ~2 min
    python bench/fidelity_probe.py --smoke                          # 2 layers, a CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import CUDA, QWEN25_05B, IdTokenizer, as_text, build_model, log, prompts, timed
from native import engine_for

from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.fast import engine as engine_module

PROMPT = 128
WATCHED = (
    "embed_tokens",
    "input_layernorm",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj<",  # the attention kernel's output, as o_proj takes it
    "o_proj",
    "post_attention_layernorm",
    "gate_proj",
    "up_proj",
    "down_proj<",
    "down_proj",
    "layer",  # a decoder layer's output
    "norm",
    "lm_head",
)


def watched_modules(model: Any) -> Iterator[tuple[str, Any, bool]]:
    """(name, module, input?) for every module the probe records."""
    inner = model.model
    yield "embed_tokens", inner.embed_tokens, False
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"{i}.input_layernorm", layer.input_layernorm, False
        for proj in ("q_proj", "k_proj", "v_proj"):
            yield f"{i}.{proj}", getattr(attn, proj), False
        yield f"{i}.o_proj<", attn.o_proj, True
        yield f"{i}.o_proj", attn.o_proj, False
        yield f"{i}.post_attention_layernorm", layer.post_attention_layernorm, False
        for proj in ("gate_proj", "up_proj"):
            yield f"{i}.{proj}", getattr(mlp, proj), False
        yield f"{i}.down_proj<", mlp.down_proj, True
        yield f"{i}.down_proj", mlp.down_proj, False
        yield f"{i}.layer", layer, False
    yield "norm", inner.norm, False
    yield "lm_head", model.lm_head, False


class Recorder:
    """Forward hooks: the first ``calls`` model calls' outputs of every watched module."""

    def __init__(self, model: Any, calls: int) -> None:
        self.calls = calls
        self.call = -1
        self.order: list[str] = []
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = [model.model.register_forward_pre_hook(self._next_call)]
        for name, module, is_input in watched_modules(model):
            if is_input:
                hook = module.register_forward_pre_hook(self._keep_input(name))
            else:
                hook = module.register_forward_hook(self._keep_output(name))
            self.handles.append(hook)

    def _next_call(self, *_: Any) -> None:
        self.call += 1

    def _keep(self, name: str, value: Any) -> None:
        if isinstance(value, tuple):
            value = value[0]
        if not isinstance(value, torch.Tensor) or not 0 <= self.call < self.calls:
            return
        if self.call == 0:
            self.order.append(name)
        self.outputs[(name, self.call)] = value.detach().clone()

    def _keep_output(self, name: str) -> Any:
        return lambda module, args, output: self._keep(name, output)

    def _keep_input(self, name: str) -> Any:
        return lambda module, args: self._keep(name, args[0])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def compare(
    reference: Recorder, other: Recorder, rows: torch.Tensor | None = None
) -> list[dict[str, Any]]:
    """Per call: the first module whose output differs bitwise from ``reference``'s (rows
    where ``rows[call]`` is False are left out), with counts; and where the layers' outputs
    first differ."""
    out = []
    for call in range(reference.calls):
        first: dict[str, Any] | None = None
        modules_differing = 0
        for name in reference.order:
            mine, ref = other.outputs.get((name, call)), reference.outputs.get((name, call))
            if mine is None or ref is None:
                continue
            if mine.shape != ref.shape:
                mine = mine.reshape(ref.shape)
            if rows is not None:
                keep = rows[:, call].to(ref.device)
                mine, ref = mine[keep], ref[keep]
            differs = mine != ref
            n = int(differs.sum())
            if not n:
                continue
            modules_differing += 1
            if first is None:
                first = {
                    "module": name,
                    "elements": n,
                    "of": differs.numel(),
                    "rows": int(differs.flatten(1).any(1).sum()),
                    "of_rows": differs.shape[0],
                    "max_abs_diff": float((mine.float() - ref.float()).abs().max()),
                }
        out.append(
            {"call": call, "first_difference": first, "modules_differing": modules_differing}
        )
    return out


def plain_generate(model: Any, ids: list[list[int]], new: int, static: bool) -> Any:
    """plain's own call (slmtui's PlainEngine: left-padded batch, greedy), or with
    transformers' static cache."""
    input_ids = torch.tensor(ids, device=model.device)
    with torch.inference_mode():
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **({"cache_implementation": "static", "disable_compile": True} if static else {}),
        )


def fast_logits(
    model: Any,
    ids: list[list[int]],
    forced: list[list[int]],
    path: str,
    graphs: bool,
    recorder: list[Recorder] | None = None,
) -> tuple[torch.Tensor, FastEngine]:
    """The fast engine's teacher-forced logits on plain's tokens (after its warm-up); with
    ``recorder``, a Recorder is started just before (and appended)."""
    n = len(ids)
    engine = engine_for(model, n, path, "inductor" if CUDA else "aot_eager")
    reqs = [GenerateRequest(as_text(p), len(forced[0])) for p in ids]
    engine.prepare(reqs, [])
    if not graphs:
        engine.use_graphs = False
    engine.warmup(reqs, [])
    if recorder is not None:
        recorder.append(Recorder(model, recorder_calls(recorder)))
    try:
        return engine.teacher_forced_logits(ids, forced), engine
    finally:
        if recorder is not None:
            recorder[-1].remove()


def recorder_calls(recorder: list[Recorder]) -> int:
    return recorder[0].calls


def same_logits(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Rows whose logits are bitwise the reference's, per step; the argmax agreement."""
    equal = (logits == reference).all(-1)  # [rows, steps]
    return {
        "rows_bitwise_equal_per_step": equal.sum(0).tolist(),
        "all_steps_bitwise_equal_rows": int(equal.all(1).sum()),
        "max_abs_diff": float((logits - reference).abs().max()),
        "argmax_agrees": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, kv, length, d = x.shape
    return x[:, :, None].expand(b, kv, n, length, d).reshape(b, kv * n, length, d)


def attention_calls(sequences: int, heads: int, kv_heads: int, dim: int) -> dict[str, Any]:
    """One decode query over L keys: the share of output elements bitwise equal to plain's
    call (no mask, exactly L keys, GQA in the kernel, the default backend) for each call a
    captured step could make (keys padded to a capacity, a boolean mask), under each SDPA
    backend; and which backend plain's own call matches."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    group = heads // kv_heads
    out: dict[str, Any] = {}
    backends = [None, "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]

    def run(backend: str | None, *args: Any, **kw: Any) -> torch.Tensor | None:
        try:
            if backend is None:
                return sdpa(*args, **kw)
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                return sdpa(*args, **kw)
        except RuntimeError:
            return None

    for length in (129, 136, 143):
        shape = (sequences, kv_heads, length, dim)
        q = torch.randn(sequences, heads, 1, dim, generator=g, device=dev).bfloat16()
        k = torch.randn(shape, generator=g, device=dev).bfloat16()
        v = torch.randn(shape, generator=g, device=dev).bfloat16()
        plain = sdpa(q, k, v, enable_gqa=True)
        for backend in backends[1:]:
            mine = run(backend, q, k, v, enable_gqa=True)
            out[f"L{length} plain call, {backend}"] = (
                None if mine is None else float((mine == plain).float().mean())
            )
        for capacity in (length, 144, 160, 208, 448):
            kc = torch.zeros(sequences, kv_heads, capacity, dim, device=dev).bfloat16()
            vc = torch.zeros_like(kc)
            kc[:, :, :length], vc[:, :, :length] = k, v
            mask = (torch.arange(capacity, device=dev) < length).expand(sequences, 1, 1, capacity)
            padded = {
                "gqa+mask": ((q, kc, vc), {"enable_gqa": True}),
                "repeat_kv+mask": ((q, repeat_heads(kc, group), repeat_heads(vc, group)), {}),
                "grouped+mask": ((q.reshape(sequences, kv_heads, group, dim), kc, vc), {}),
            }
            for name, (tensors, kw) in padded.items():
                for backend in backends:
                    mine = run(backend, *tensors, attn_mask=mask, **kw)
                    if mine is not None:
                        mine = mine.reshape(plain.shape)
                    out[f"L{length} cap {capacity} {name}, {backend or 'default'}"] = (
                        None if mine is None else float((mine == plain).float().mean())
                    )
    return out


def prefill_first_calls(model: Any) -> dict[str, Any]:
    """What letting cuDNN take a prefill costs: the first and a repeated causal call's time
    (ms) at 16 new prompt lengths, one sequence, this model's heads, cuDNN vs flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    c = model.config
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    dim = c.hidden_size // heads
    out: dict[str, Any] = {}
    for backend, lengths in (
        ("CUDNN_ATTENTION", range(301, 317)),
        ("FLASH_ATTENTION", range(401, 417)),
    ):
        first, again = [], []
        for length in lengths:
            q = torch.randn(1, heads, length, dim, device="cuda").bfloat16()
            k = torch.randn(1, kv, length, dim, device="cuda").bfloat16()
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                for times in (first, again):
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    sdpa(q, k, k, is_causal=True, enable_gqa=True)
                    torch.cuda.synchronize()
                    times.append(1000 * (time.perf_counter() - began))
        out[backend] = {
            "first_call_ms_median": statistics.median(first),
            "first_call_ms_max": max(first),
            "repeat_ms_median": statistics.median(again),
        }
    return out


def counting(real: Any, calls: list[bool]) -> Any:
    """``variable_shape_kernels`` that notes each call's ``plain_call``."""

    def spy(device: Any, plain_call: bool = False, rows: int = 1) -> Any:
        calls.append(plain_call)
        return real(device, plain_call, rows)

    return spy


def refill_cost(model: Any, sequences: int, batch: int) -> dict[str, Any]:
    """What plain's prefill call on cuDNN costs a run like a real task's: ``sequences`` prompts
    of 64-512 tokens and budgets of 16-128 tokens (random, fixed seed), ``batch`` in flight,
    the fast engine's default step, timed with ``SLMTUI_PREFILL_CUDNN`` never, batched and plain
    (each after its own warm-up on other lengths, so only the run's new shapes are first
    calls)."""
    import random

    rng = random.Random(3)
    vocab = model.config.vocab_size
    reqs = [
        GenerateRequest(
            as_text([rng.randrange(100, vocab - 100) for _ in range(rng.randrange(64, 513))]),
            rng.randrange(16, 129),
        )
        for _ in range(sequences)
    ]
    warm = [GenerateRequest(as_text([7] * 40), 8), GenerateRequest(as_text([9] * 41), 8)]
    out: dict[str, Any] = {"sequences": sequences, "batch": batch}
    for setting in ("never", "batched", "plain"):
        os.environ["SLMTUI_PREFILL_CUDNN"] = setting
        engine = FastEngine(model, IdTokenizer(), batch_size=batch)
        engine.prepare(reqs, [])
        engine.warmup(warm, [])
        plain_calls: list[bool] = []
        real = engine_module.variable_shape_kernels
        engine_module.variable_shape_kernels = counting(real, plain_calls)
        try:
            seconds, done = timed(lambda e=engine: list(e.generate(reqs)))
        finally:
            engine_module.variable_shape_kernels = real
        tokens = sum(c.response.tokens_out for c in done)
        out.setdefault(setting, []).append(
            {
                "seconds": seconds,
                "tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "prefill_calls": len(plain_calls),
                "plain_prefill_calls": sum(plain_calls),
                "decode_step": engine.decode_step,
            }
        )
        log(f"   refill, prefill cuDNN {setting}: {out[setting][-1]}")
        del engine
        gc.collect()
    os.environ.pop("SLMTUI_PREFILL_CUDNN")
    return out


def plain_part(
    model: Any, ids: list[list[int]], args: Any, result: dict[str, Any], save: Any
) -> tuple[list[list[int]], torch.Tensor]:
    """The attention-call shares, plain's record, plain again, the static path and the fast
    engine's transformers step by module; returns plain's tokens and logits."""
    n, calls = len(ids), 1 + args.steps
    c = model.config
    result["attention_calls"] = attention_calls(
        n, c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    )
    for key, share in result["attention_calls"].items():
        log(f"   {key}: {share}")
    save()

    plain_rec = Recorder(model, calls)
    plain = plain_generate(model, ids, args.new, static=False)
    plain_rec.remove()
    tokens = plain.sequences[:, PROMPT:]
    forced = tokens.tolist()
    reference = torch.stack([s.float() for s in plain.logits], dim=1)  # [rows, steps, vocab]

    def report(label: str, rec: Recorder, logits: torch.Tensor, rows: Any = None) -> None:
        entry = {"modules": compare(plain_rec, rec, rows), "logits": same_logits(logits, reference)}
        result[label] = entry
        log(f"== {label}: logits {entry['logits']}")
        for c in entry["modules"]:
            log(
                f"   call {c['call']}: {c['modules_differing']} modules differ; first "
                f"{c['first_difference']}"
            )
        save()

    for label, static in (("plain_again", False), ("hf_static", True)):
        rec = Recorder(model, calls)
        try:
            out = plain_generate(model, ids, args.new, static=static)
        except Exception as exc:  # a probe: record and go on
            result[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        finally:
            rec.remove()
        same = (out.sequences[:, PROMPT:] == tokens).long().cumprod(1).bool()
        # call c feeds token c-1: compare only rows whose tokens so far are plain's
        rows = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=same.device), same], 1)
        report(label, rec, torch.stack([s.float() for s in out.logits], 1), rows)
        result[label]["identical_sequences"] = int(same[:, -1].sum())

    holder = [Recorder(model, calls)]
    holder[0].remove()
    logits, _ = fast_logits(model, ids, forced, "transformers", graphs=False, recorder=holder)
    report("fast_transformers_no_graphs", holder[-1], logits)
    del logits, _
    return forced, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="2 layers, 4 sequences")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="decode calls compared by module")
    parser.add_argument("--new", type=int, default=16, help="tokens compared on logits")
    parser.add_argument(
        "--refill-only", action="store_true", help="only the refill-cost part (CUDA)"
    )
    parser.add_argument(
        "--save-reference", type=Path, help="keep plain's tokens and logits here (torch.save)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="plain's tokens and logits from another process (--save-reference): only the fast "
        "paths and the first-call costs run here, e.g. under TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, "
        "which plain's own process did not have",
    )
    args = parser.parse_args()
    n = 4 if args.smoke else args.sequences
    model = build_model(QWEN25_05B, 2 if args.smoke else None)
    ids = prompts(n, PROMPT, model.config.vocab_size, seed=5)
    result: dict[str, Any] = {"sequences": n, "prompt": PROMPT, "new": args.new}
    result["avoid_recompile"] = os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE")

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))

    if args.refill_only:
        result["refill_cost"] = refill_cost(
            model, 8 if args.smoke else 256, 4 if args.smoke else 64
        )
        save()
        return
    if args.reference is not None:
        kept = torch.load(args.reference)
        if kept["ids"] != ids:
            raise SystemExit(f"{args.reference}: its prompts are not this run's")
        forced = kept["tokens"].tolist()
        reference = kept["logits"].to(model.device)
        result["reference"] = str(args.reference)
    else:
        forced, reference = plain_part(model, ids, args, result, save)
        if args.save_reference is not None:
            torch.save(
                {"ids": ids, "tokens": torch.tensor(forced), "logits": reference.cpu()},
                args.save_reference,
            )

    for setting in ("batched", "never"):
        os.environ["SLMTUI_PREFILL_CUDNN"] = setting
        for path in ("transformers", "native", "native_compiled"):
            label = f"fast_{path}_prefill_cudnn_{setting}"
            gc.collect()
            try:
                logits, engine = fast_logits(model, ids, forced, path, graphs=CUDA)
                result[label] = same_logits(logits, reference) | {
                    "decode_step": engine.decode_step,
                    "decode_attention": engine.decode_attention,
                    "decode_backends": engine.decode_backends,
                }
                del engine
            except Exception as exc:
                result[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"== {label}: {result[label]}")
            save()
    os.environ.pop("SLMTUI_PREFILL_CUDNN")
    if CUDA:
        result["prefill_first_call_ms"] = prefill_first_calls(model)
        log(f"== prefill first calls (ms): {result['prefill_first_call_ms']}")
    save()


if __name__ == "__main__":
    main()
