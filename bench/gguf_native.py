"""A GGUF file at its own quantisation (slmtui's llamacpp engine: llama.cpp) against the fast
engine on the same file dequantised to float32 (what a GGUF run does by default), on the CPU,
greedy, one request at a time, at one or more thread counts: SmolLM2-135M-Instruct Q4_1 unless
``--gguf`` names another file.

Per thread count and engine: decode tokens/s (4 prompts x 48 new tokens, no stop), prefill
tokens/s (one ~500-token prompt, time to its first token), load seconds, and how far the greedy
texts of the two engines agree.

    OMP_NUM_THREADS=1 python bench/gguf_native.py > bench/results/gguf_native_cpu.json
    python bench/gguf_native.py --threads 1,4,16 > bench/results/gguf_native_h200_cpu.json

Needs llama-cpp-python (``scripts/setup --llamacpp``). On a machine without the internet (a GPU
box), install the wheel pip built here and its one pure-Python dependency, carried along:
``pip install --no-index llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl
diskcache-5.6.3-py3-none-any.whl``: a CPU build for x86-64 with AVX2 (GGML_NATIVE=OFF), tagged
py3-none, so it loads on any Python 3; it needs glibc >= 2.34, libstdc++ (GLIBCXX_3.4.29) and
libgomp.so.1 on the box.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmtui.spec import ModelRef, RunSpec
from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines import start_engine
from slmtui.worker.engines.llamacpp import LlamaCppEngine
from slmtui.worker.hardware import cpu_model
from slmtui.worker.loading import load_model

PROMPTS = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "The capital of France is",
    "Write a short poem about the sea:\n",
    "def fibonacci(n):\n",
)
NEW_TOKENS = 48
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 50) + "\nSummary:"


def measure(engine: Any) -> dict[str, Any]:
    """Decode and prefill rates of a started engine, and its greedy texts."""
    requests = [GenerateRequest(p, max_new_tokens=NEW_TOKENS, stop=()) for p in PROMPTS]
    engine.warmup(requests[:1], [])
    reset = getattr(getattr(engine, "runtime", None), "forget", None)
    if reset is not None:
        reset()  # llama.cpp: no prompt prefix left in the cache from the warm-up
    began = time.perf_counter()
    done = {c.index: c for c in engine.generate(requests)}
    seconds = time.perf_counter() - began
    tokens = sum(c.tokens_out for c in done.values())
    if reset is not None:
        reset()
    (long,) = engine.generate([GenerateRequest(LONG_PROMPT, max_new_tokens=1, stop=())])
    return {
        "decode_tokens": tokens,
        "decode_tokens_per_s": tokens / seconds,
        "prefill_tokens": long.tokens_in,
        "prefill_tokens_per_s": long.tokens_in / long.ttft_s if long.ttft_s else None,
        "texts": [done[i].response.text for i in range(len(PROMPTS))],
    }


def agreement(a: list[str], b: list[str]) -> dict[str, Any]:
    pairs = list(zip(a, b, strict=True))
    return {
        "same_text": sum(x == y for x, y in pairs),
        "common_prefix_chars": [
            next(
                (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                min(len(x), len(y)),
            )
            for x, y in pairs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        default=os.environ.get("OMP_NUM_THREADS", "1"),
        help="thread counts, comma-separated (default: OMP_NUM_THREADS or 1)",
    )
    parser.add_argument("--gguf", help="a .gguf file (default: smollm2-135m-instruct)")
    args = parser.parse_args()
    counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if args.gguf:
        ref = ModelRef(Path(args.gguf).stem, str(Path(args.gguf).resolve()), "gguf")
    else:
        ref = ModelRef("SmolLM2-135M-Instruct", "smollm2-135m-instruct", "pypi")
    started = time.perf_counter()
    dequantised = load_model(ref, dtype="float32")
    assert dequantised is not None
    result: dict[str, Any] = {
        "model": ref.source,
        "cpu": cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "new_tokens": NEW_TOKENS,
        "load_average_before": os.getloadavg(),
        "fast_load_s": time.perf_counter() - started,
        "fast_weights": dequantised.metrics["weights"],
        "runs": [],
    }
    for threads in counts:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the llamacpp engine's n_threads
        torch.set_num_threads(threads)
        began = time.perf_counter()
        loaded = LlamaCppEngine.load(RunSpec(model=ref, task="gsm8k", engine="llamacpp"))
        llama_load_s = time.perf_counter() - began
        llama = measure(start_engine("llamacpp", loaded, batch_size=1).engine)
        loaded.model.close()
        fast = measure(start_engine("fast", dequantised, batch_size=1).engine)
        result["llamacpp_weights"] = loaded.metrics["weights"]
        result["llamacpp_notes"] = loaded.notes
        result["runs"].append(
            {
                "threads": threads,
                "llamacpp_load_s": llama_load_s,
                **{f"llamacpp_{k}": v for k, v in llama.items() if k != "texts"},
                **{f"fast_{k}": v for k, v in fast.items() if k != "texts"},
                **agreement(llama["texts"], fast["texts"]),
                "texts": list(zip(llama["texts"], fast["texts"], strict=True)),
            }
        )
        print(json.dumps(result["runs"][-1] | {"texts": "..."}), file=sys.stderr, flush=True)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
