"""Weight-only quantisation: the schemes, and what a setting needs, checked without torch.

A run's ``quantize`` setting ("none", "int8", "int4") is applied by the worker when it loads the
model (``slmtui.worker.quantize``, torchao). This module is what the profile loader and the
console may import: it names each scheme and refuses, in one line, a setting the installed
library or the requested device cannot run, before anything starts. It never imports torch or
torchao (``importlib.metadata`` reads the installed version).

What torchao 0.18 runs (measured on the CPU here; the GPU kernels are torch's own aten ops):

=======  ====================================================  =========================
setting  torchao config                                        devices
=======  ====================================================  =========================
int8     ``Int8WeightOnlyConfig()``: int8 weights, one scale    CPU and GPU, any dtype
         per output channel; the matmul dequantises in bf16/fp32
int4     ``Int4WeightOnlyConfig(group_size=128,                 GPU only, bfloat16 (tinygemm:
         int4_packing_format="tile_packed_to_4d")``: int4       ``aten._weight_int4pack_mm``);
         weights, a scale and zero point per 128 inputs         torchao 0.18 has no CPU int4
=======  ====================================================  =========================

On one GPU with bf16/fp16 weights and the ``gemlite`` package installed (``scripts/setup`` adds it
on a box with an NVIDIA GPU; ``pip install 'slmtui[gemlite]'``), int8 runs through torchao's
``UIntx`` tensor instead: the same torchao tensor-subclass seam, with gemlite's Triton kernels
(symmetric, one scale per output channel), measured 1.27-1.35x bf16 where torchao's int8 ran
0.86x (Qwen2.5-7B, batch 1, H200; docs/benchmarks.md). int4 keeps tinygemm (1.28-1.30x there):
gemlite's int4, built for bfloat16, ran 1.09x, so it runs only when asked for.
``SLMTUI_QUANT_KERNELS`` (auto, torchao, gemlite) overrides the choice; the run's
``quantize_scheme`` and ``quantize_kernels`` name what ran.

torchao's default int4 format ("plain") needs the separate ``mslk`` kernel package; the
tile-packed format needs nothing beyond torch and a GPU of compute capability 8.0 or newer;
slmtui packs it in the kernel's 128-column tiles, not torchao's 1,024 (``worker.int4_tiles``;
stored bytes count what padding is left). A tied
output embedding (the input embedding's matrix) is left in full precision: quantising it would
add a second copy, not save one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from importlib import metadata

from slmtui.errors import UserError

TORCHAO_MIN_VERSION: tuple[int, int] = (0, 18)
"""The oldest torchao tested (0.18 wants torch >= 2.11 for its compiled extras)."""
INT4_GROUP_SIZE = 128
"""Input features sharing one int4 scale and zero point."""
SCHEMES: dict[str, str] = {
    "int8": "torchao int8 weight-only, per output channel",
    "int4": f"torchao int4 weight-only, group {INT4_GROUP_SIZE}, tinygemm tile-packed",
}
"""What each setting runs with torchao's own kernels (``quantize_scheme``)."""
GEMLITE_SCHEMES: dict[str, str] = {
    "int8": "int8 weight-only, per output channel, gemlite kernels (torchao UIntx)",
    "int4": f"int4 weight-only, group {INT4_GROUP_SIZE}, HQQ zero points, gemlite kernels "
    "(torchao UIntx)",
}
"""What each setting runs with gemlite's kernels."""
KERNEL_LIBRARIES = ("auto", "torchao", "gemlite")
"""``SLMTUI_QUANT_KERNELS``: auto takes gemlite where it can run (one GPU, 16-bit weights,
installed), else torchao's kernels."""
INSTALL_HINT = "pip install 'slmtui[quant]' (torchao >= 0.18)"


def torchao_version() -> str | None:
    """The installed torchao's version, or None (not imported: reading it costs nothing)."""
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_quantize(quantize: str, gpus: Iterable[int], dtype: str) -> None:
    """UserError (the reason, one line, no place) when ``quantize`` cannot run at these GPU
    counts (0 = the CPU) and this dtype with the installed torchao."""
    if quantize == "none":
        return
    version = torchao_version()
    if version is None:
        raise UserError(f"needs torchao, which is not installed; {INSTALL_HINT}")
    if _version_tuple(version) < TORCHAO_MIN_VERSION:
        wanted = ".".join(map(str, TORCHAO_MIN_VERSION))
        raise UserError(f"needs torchao >= {wanted}, found {version}; {INSTALL_HINT}")
    counts = sorted(set(gpus))
    several = [c for c in counts if c > 1]
    if several:
        raise UserError(
            f"runs on the CPU or one GPU, not gpus = {several} (quantised weights are not "
            "split across GPUs); use gpus = [1]"
        )
    if quantize == "int4":
        if 0 in counts:
            raise UserError(
                f"torchao {version} has no int4 weight-only kernel for the CPU (gpus = 0); "
                'use quantize = "int8" on the CPU, or gpus = [1]'
            )
        if dtype not in ("auto", "bfloat16"):
            raise UserError(
                f'the int4 kernel (tinygemm) takes bfloat16 weights, not dtype "{dtype}"; '
                'use dtype = "bfloat16" or "auto"'
            )


def scheme(quantize: str, kernels: str = "torchao") -> str | None:
    """The recorded description of ``quantize`` with ``kernels`` ("none": None)."""
    return (GEMLITE_SCHEMES if kernels == "gemlite" else SCHEMES).get(quantize)


def kernels_setting(value: str | None = None) -> str:
    """``value``, else ``SLMTUI_QUANT_KERNELS``, else auto; ValueError naming the allowed."""
    chosen = (value or os.environ.get("SLMTUI_QUANT_KERNELS") or "auto").strip().lower()
    if chosen not in KERNEL_LIBRARIES:
        raise ValueError(f"SLMTUI_QUANT_KERNELS {chosen!r}: one of {', '.join(KERNEL_LIBRARIES)}")
    return chosen


def gemlite_version() -> str | None:
    """The installed gemlite's version, or None (read from metadata: importing gemlite needs a
    GPU)."""
    try:
        return metadata.version("gemlite")
    except metadata.PackageNotFoundError:
        return None
