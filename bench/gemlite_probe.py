"""gemlite's weight-only kernels on Qwen2.5-7B's matrix shapes, one GPU: each matmul's time
at 1, 2 and 80 rows against bf16's, the bandwidth it reaches, and its error against the
dequantised weight; a kernel that fails to build is reported with its traceback's tail.

    PYTHONPATH=/tmp/tao python bench/gemlite_probe.py [--bits 8,4] [--out $OUT/probe.json]

(torchao and gemlite installed under /tmp/tao from carried wheels: bench/quant.py's docstring.)
Times are CUDA events over a CUDA graph of 50 calls replayed 4 times, after 20 warm calls
(gemlite autotunes at the first call of a shape); bytes are the weight's stored bytes (int data,
scales, zero points). The 2026-12-02 results (bench/results/gemlite_probe_0*_h200.json) were
timed eagerly, before this: they measured Python dispatch and are kept for their compile errors."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmtui.quantization import gemlite_version
from slmtui.worker.quantize import tensor_bytes

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
"""Qwen2.5-7B's fused projections, (out, in)."""


def timed(fn, calls: int = 50, replays: int = 4) -> float:
    """Microseconds per call, replayed in a CUDA graph: eager timing measures the Python
    dispatch of a tensor subclass (150-350 us a call on the H200), not the kernel."""
    for _ in range(20):  # gemlite autotunes at the first calls of a shape, outside the graph
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays) * 1e3


def main() -> None:
    from slmtui.worker.gemlite_weights import gemlite_weight

    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--rows", default="1,2,80")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict = {
        "gemlite": gemlite_version(),
        "device": torch.cuda.get_device_name(),
        "cases": [],
    }
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for bits in map(int, args.bits.split(",")):
            case = {"matrix": name, "shape": [n, k], "bits": bits}
            try:
                q = gemlite_weight(w, bits, None if bits == 8 else 128)
                case["bytes"] = tensor_bytes(q)
                for rows in map(int, args.rows.split(",")):
                    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                    got = torch.nn.functional.linear(x, q).float()
                    ref = torch.nn.functional.linear(x, q.dequantize()).float()
                    us = timed(lambda x=x, q=q: torch.nn.functional.linear(x, q))
                    us_bf16 = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w))
                    case[f"rows_{rows}"] = {
                        "us": us,
                        "us_bf16": us_bf16,
                        "x_bf16": us_bf16 / us,
                        "gb_per_s": case["bytes"] / us / 1e3,
                        "rel_error": float((got - ref).abs().max() / ref.abs().max()),
                    }
            except Exception as exc:
                case["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                case["traceback"] = traceback.format_exc()[-3000:]
            print(json.dumps(case)[:600], flush=True)
            result["cases"].append(case)
            if args.out:
                args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
