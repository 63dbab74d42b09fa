"""int4 weights for PyTorch's tinygemm kernel (``aten._weight_int4pack_mm``) padded to the
kernel's own tile, not to torchao's 1,024 columns.

torchao 0.18's tile-packed tensor pads every weight's input width to a multiple of 1,024 before
packing, and every activation with it: Qwen2.5-7B's 3,584-wide projections are stored and read
4,096 wide (14% more int4 bytes a product, the largest share of a batch-1 step), SmolLM2's 576
wide ones 1,024 wide (1.8x). The kernel needs only a multiple of 16 x inner_k_tiles (128 with
torchao's 8 tiles) — measured on the H200, ``bench/weight_kernels.py``, it runs the 3,584-wide
shapes unpadded. The packed layout is [n/8][k/128][32][4]: each 128-column tile is packed on its
own, and the per-group scales are [k/group][n][2], so the first ``ceil(k/128)`` tiles and their
groups of torchao's own padded tensor are exactly the narrower packing (no re-quantisation, the
same numbers: the dropped columns were zeros).

``TightInt4Tensor`` is torchao's tensor with that narrower packing and its own product (pad the
activations to the packed width, if at all, then the same kernel); everything else (slicing
rows for fused projections, detach, device moves, flattening for ``torch.compile``) is torchao's.
Imported only where torchao is installed and a GPU runs int4 (``worker.quantize``);
``SLMTUI_INT4_PACKING=torchao`` keeps torchao's own padded tensor (for comparison).
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
    Int4TilePackedTo4dTensor,
)

aten = torch.ops.aten

TILE_COLUMNS = 128
"""Input columns per packed tile: 16 x inner_k_tiles, which torchao fixes at 8."""


def packed_width(in_features: int) -> int:
    """The input width a weight of ``in_features`` columns is packed (and read) at."""
    return -(-in_features // TILE_COLUMNS) * TILE_COLUMNS


class TightInt4Tensor(Int4TilePackedTo4dTensor):
    """torchao's tinygemm int4 tensor, packed ``packed_width`` wide instead of 1,024-aligned."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int) -> TightInt4Tensor:
        """``weight`` [out, in] (bfloat16, on a GPU) quantised as torchao's int4 tile-packed
        format with groups of ``group_size`` (which must divide 128), then narrowed."""
        if TILE_COLUMNS % group_size:
            raise ValueError(f"int4 group {group_size} does not divide {TILE_COLUMNS}")
        wide = Int4TilePackedTo4dTensor.from_hp(weight, [1, group_size])
        return cls.narrowed(wide, weight.shape[1])

    @classmethod
    def narrowed(cls, wide: Int4TilePackedTo4dTensor, in_features: int) -> TightInt4Tensor:
        width = packed_width(in_features)
        group_size = wide.block_size[-1]
        qdata = wide.qdata[:, : width // TILE_COLUMNS].contiguous()
        scale_and_zero = wide.scale_and_zero[: width // group_size].contiguous()
        return cls(qdata, scale_and_zero, wide.block_size, wide.shape, act_pre_scale=None)


def _input_width(weight: Int4TilePackedTo4dTensor) -> int:
    return weight.qdata.shape[1] * TILE_COLUMNS


@TightInt4Tensor.implements(aten.linear.default)
@TightInt4Tensor.implements_torch_function(torch.nn.functional.linear)
def _linear(func: Any, types: Any, args: Any, kwargs: Any) -> torch.Tensor:
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
    out_features = weight.shape[0]
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    width = _input_width(weight)
    if rows.shape[-1] != width:
        rows = torch.nn.functional.pad(rows, (0, width - rows.shape[-1]))
    if rows.numel() == 0:
        y = rows.new_zeros(rows.shape[0], out_features)
    else:
        y = aten._weight_int4pack_mm(
            rows, weight.qdata, weight.block_size[-1], weight.scale_and_zero
        )
    if y.shape[-1] != out_features:
        y = y[:, :out_features]
    y = y.reshape(*x.shape[:-1], out_features)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


_parent_slice = Int4TilePackedTo4dTensor._ATEN_OP_TABLE[Int4TilePackedTo4dTensor][aten.slice.Tensor]


@TightInt4Tensor.implements(aten.slice.Tensor)
def _slice(func: Any, types: Any, args: Any, kwargs: Any) -> TightInt4Tensor:
    """torchao's slice of rows (a view of the packed rows and their scales), kept narrow;
    columns are not sliced (torchao's column arithmetic assumes its own padding)."""
    dim = args[1] if len(args) > 1 else 0
    if dim != 0:
        raise NotImplementedError("TightInt4Tensor slices rows (dim 0) only")
    part = _parent_slice(func, types, args, kwargs)
    return TightInt4Tensor(
        part.qdata, part.scale_and_zero, part.block_size, part.shape, act_pre_scale=None
    )
