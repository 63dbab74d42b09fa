"""Batch-1 weight-only matmul kernels on Qwen2.5-7B's projection shapes, one GPU: which kernel,
in which layout, reads the weight closest to the copy rate. Issue 17's int4 target (1.6× bf16's
tokens/s at batch 1) needs the int4 projections near the bandwidth floor; the engine's step
with tinygemm (torchao's tile-packed int4, inner_k_tiles 8, groups of 128) reached 1.30×.

Per projection shape and kernel: microseconds per call (CUDA graph of 50 calls replayed 4
times, after 20 warm calls, as ``bench/gemlite_probe.py``), the stored bytes, GB/s over those
bytes, and the ratio to bf16's cuBLAS call on the same shape; plus a device-to-device copy of
the bf16 weight as the floor. Kernels:

* ``bf16``: ``F.linear`` on the bf16 weight (cuBLAS);
* ``tinygemm g<G> k<T>``: ``aten._weight_int4pack_mm`` at group size G and inner_k_tiles T
  (torchao fixes T=8, G=128);
* ``int8pack``: ``aten._weight_int8pack_mm`` (int8, one bf16 scale per output row);
* ``gemlite<bits> <type>``: gemlite's layer with its matmul type forced (GEMV, GEMV_REVSPLITK,
  GEMV_SPLITK), int4 in groups of 128 and int8 per row, bf16 activations;
* with ``--fbgemm``: FBGEMM GenAI's CUTLASS mixed-input kernels (``fbgemm int4 rowwise``,
  ``fbgemm int4 shuffled``: int4 in groups of 128 with bf16 scales and zero points, the kernels
  torchao's "plain" and "preshuffled" int4 formats call through ``mslk``, which PyPI does not
  carry) and its 8-bit batch-1 GEMV (``fbgemm fp8 fast_gemv``: e4m3 weights, one scale);
* with ``--bnb``: bitsandbytes' 4-bit batch-1 inference GEMV (``bnb nf4 b<B>``: NF4 in blocks of
  B with a float32 absmax per block, ``matmul_4bit`` at one row).

    PYTHONPATH=/tmp/tao:$PWD/.whl/gemlite05 python bench/weight_kernels.py --out $OUT/k.json \
        [--fbgemm /tmp/fb/fbgemm_gpu/experimental/gen_ai/fbgemm_gpu_experimental_gen_ai.so]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemlite_probe import SHAPES, timed

UNFUSED = {"q": (3584, 3584), "k": (512, 3584), "up": (18944, 3584)}
"""The shapes gemlite runs (it quantises each projection on its own)."""
LM_HEAD = {"lm_head": (152064, 3584)}
"""The output projection (slmtui quantises it too where it is not tied to the embedding)."""


def tinygemm(w: torch.Tensor, group: int, tiles: int) -> tuple[Callable, int]:
    n, k = w.shape
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=w.device)
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, tiles)
    scales = torch.rand(k // group, n, 2, device=w.device, dtype=torch.bfloat16) * 0.01
    nbytes = packed.numel() * packed.element_size() + scales.numel() * 2

    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales)

    return call, nbytes


def int8pack(w: torch.Tensor) -> tuple[Callable, int]:
    q = torch.randint(-127, 128, w.shape, dtype=torch.int8, device=w.device)
    scales = torch.rand(w.shape[0], device=w.device, dtype=torch.bfloat16) * 0.01

    def call(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, q, scales)

    return call, q.numel() + scales.numel() * 2


def fbgemm_int4(w: torch.Tensor, layout: str) -> tuple[Callable, int]:
    n, k = w.shape
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=w.device)
    packed = torch.bitwise_or(torch.bitwise_and(q[:, ::2], 0xF), q[:, 1::2] << 4).contiguous()
    scale = torch.rand(k // 128, n, device=w.device, dtype=torch.bfloat16) * 0.01
    zero = torch.rand(k // 128, n, device=w.device, dtype=torch.bfloat16) * 0.01
    if layout == "shuffled":
        packed, scale = torch.ops.fbgemm.preshuffle_i4(packed, scale)
        op = torch.ops.fbgemm.bf16i4bf16_shuffled
    else:
        op = torch.ops.fbgemm.bf16i4bf16_rowwise
    nbytes = sum(t.numel() * t.element_size() for t in (packed, scale, zero))
    return (lambda x: op(x, packed, scale, zero)), nbytes


def fbgemm_fp8_gemv(w: torch.Tensor) -> tuple[Callable, int]:
    wq = (w / w.abs().max() * 448).to(torch.float8_e4m3fn)
    scale = (w.abs().max() / 448).float().reshape(1)
    return (lambda x: torch.ops.fbgemm.bf16fp8bf16_fast_gemv(x, wq, scale)), wq.numel() + 4


def bnb_4bit(w: torch.Tensor, blocksize: int, kind: str) -> tuple[Callable, int]:
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=kind)
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * 4
    return (lambda x: bnb.matmul_4bit(x, packed.t(), state)), nbytes


def gemlite_layer(w: torch.Tensor, bits: int, kind: str) -> tuple[Callable, int]:
    import gemlite
    from torchao.prototype.quantization.uintx.uintx_bit_packed_tensor import (
        UIntxBitPackedTensor,
    )

    k = w.shape[1]
    group = k if bits == 8 else 128
    int_data, scale, zero = UIntxBitPackedTensor._quantize_weight(w, bits, group)
    if bits == 8:
        layer = gemlite.helper.A16W8(device=w.device).from_weights(
            int_data, scales=scale, bias=None
        )
    else:
        layer = gemlite.helper.A16Wn(device=w.device, dtype=w.dtype).from_weights(
            int_data, scale, zero, bits, group, bias=None
        )
    nbytes = sum(t.numel() * t.element_size() for t in layer.get_tensor_args()[:3] if t is not None)
    return (lambda x: layer.forward_manual(x, kind)), nbytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--gemlite", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fbgemm", type=Path, help="FBGEMM GenAI's shared library")
    parser.add_argument(
        "--only-fbgemm",
        action="store_true",
        help="only the --fbgemm and --bnb kernels (and the head's tinygemm)",
    )
    parser.add_argument("--bnb", action="store_true", help="bitsandbytes' 4-bit GEMV")
    args = parser.parse_args()
    if args.fbgemm:
        torch.ops.load_library(str(args.fbgemm))
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cases": [],
    }
    shapes = {**SHAPES, **UNFUSED, **LM_HEAD}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(w)
        copy_us = timed(lambda dst=dst, w=w: dst.copy_(w))
        bf16_us = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        row = {
            "matrix": name,
            "shape": [n, k],
            "copy_gb_per_s": 2 * w.numel() * 2 / copy_us / 1e3,
            "bf16_us": bf16_us,
            "bf16_gb_per_s": w.numel() * 2 / bf16_us / 1e3,
            "kernels": {},
        }
        makers: dict[str, Callable[[], tuple[Callable, int]]] = {}
        if name in LM_HEAD:
            makers["tinygemm g128 k8"] = lambda w=w: tinygemm(w, 128, 8)
        if name in SHAPES:
            for group in (32, 64, 128, 256):
                for tiles in (2, 4, 8):
                    makers[f"tinygemm g{group} k{tiles}"] = lambda w=w, g=group, t=tiles: tinygemm(
                        w, g, t
                    )
            makers["int8pack"] = lambda w=w: int8pack(w)
        if args.fbgemm:
            for layout in ("rowwise", "shuffled"):
                makers[f"fbgemm int4 {layout}"] = lambda w=w, lay=layout: fbgemm_int4(w, lay)
            makers["fbgemm fp8 fast_gemv"] = lambda w=w: fbgemm_fp8_gemv(w)
        if args.bnb and name not in UNFUSED:
            for block in (64, 128):
                for kind in ("nf4", "fp4"):
                    makers[f"bnb {kind} b{block}"] = lambda w=w, b=block, t=kind: bnb_4bit(w, b, t)
        if args.only_fbgemm:
            makers = {
                key: make
                for key, make in makers.items()
                if key.startswith(("fbgemm", "bnb")) or name in LM_HEAD
            }
        if args.gemlite and (name in UNFUSED or name in ("o", "down")):
            for bits in (4, 8):
                for kind in ("GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK"):
                    makers[f"gemlite{bits} {kind}"] = lambda w=w, b=bits, t=kind: gemlite_layer(
                        w, b, t
                    )
        for label, make in makers.items():
            try:
                call, nbytes = make()
                us = timed(lambda call=call, x=x: call(x))
                row["kernels"][label] = {
                    "us": us,
                    "bytes": nbytes,
                    "gb_per_s": nbytes / us / 1e3,
                    "x_bf16": bf16_us / us,
                }
            except Exception as exc:
                row["kernels"][label] = {
                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                    "traceback": traceback.format_exc()[-1500:],
                }
            print(name, label, json.dumps(row["kernels"][label])[:200], flush=True)
            torch.cuda.empty_cache()
        result["cases"].append(row)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
