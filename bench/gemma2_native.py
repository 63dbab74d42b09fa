"""Gemma 2 on the fast engine: does each decode path run (native compiled included, with its
soft-capped attention), how fast, and does greedy text match plain's.

Random weights from gemma-2-2b's config (no hub), bf16, one GPU: batch 1, 128-token prompt, 128
new tokens per path (best of 2), then 8 prompts x 32 greedy tokens against plain.

    python bench/gemma2_native.py --out $OUT/gemma2_native.json
    python bench/gemma2_native.py --smoke        # 2 layers, narrow, on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import CUDA, IdTokenizer, as_text, log, prompts, random_model, run_environment, timed

from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.plain import PlainEngine

GEMMA2_2B: dict[str, Any] = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 8192,
}
"""google/gemma-2-2b's config.json, the fields that set shapes and soft-caps."""
SMOKE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
}
PATHS = {"transformers": ("transformers", False), "native": ("native", False)}
PATHS["native_compiled"] = ("native", True)


def build(smoke: bool) -> Any:
    from transformers import Gemma2Config

    fields = GEMMA2_2B | (SMOKE if smoke else {})
    return random_model(Gemma2Config(**fields, bos_token_id=None, eos_token_id=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    model = build(args.smoke)
    new = 16 if args.smoke else 128
    vocab = model.config.vocab_size
    result: dict[str, Any] = run_environment(args.smoke) | {"model": "gemma-2-2b config, random"}
    result["paths"] = {}
    one = [GenerateRequest(as_text(prompts(1, 128, vocab, seed=1)[0]), new)]
    ids = prompts(8, 64, vocab, seed=5)
    many = [GenerateRequest(as_text(p), 32) for p in ids]
    plain = {
        c.index: c.response.text
        for c in PlainEngine(model, IdTokenizer(), batch_size=8).generate(many)
    }
    for name, (step, compiled) in PATHS.items():
        try:
            engine = FastEngine(
                model,
                IdTokenizer(),
                batch_size=8,
                decode_step=step,
                compile_step=compiled,
                compile_backend="inductor" if CUDA else "aot_eager",
            )
            engine.prepare(one + many, [])
            began, _ = timed(lambda e=engine: e.warmup(one + many, []))
            best = 0.0
            for _ in range(2):
                seconds, done = timed(lambda e=engine: list(e.generate(one)))
                best = max(best, done[0].tokens_out / seconds)
            outs = {c.index: c.response.text for c in engine.generate(many)}
            result["paths"][name] = {
                "decode_step": engine.decode_step,
                "tokens_per_s_batch1": best,
                "warmup_s": began,
                "identical_to_plain": sum(outs[i] == plain[i] for i in range(len(many))),
                "sequences": len(many),
                "notes": engine.notes,
            }
        except Exception as exc:  # a probe: one path's failure is its own entry
            result["paths"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        log(f"{name}: {result['paths'][name]}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
