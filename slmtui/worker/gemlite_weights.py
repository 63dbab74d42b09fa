"""Weights for gemlite's kernels, in torchao's UIntx tensor (``slmtui.quantization`` says when).

torchao 0.18's ``UIntxBitPackedTensor`` is the seam: a torchao tensor subclass whose
``F.linear`` calls gemlite's ``forward_functional`` custom op (a Triton GEMV at one or two rows,
split-K GEMM up to 64, GEMM beyond), so transformers' forward, the native decode step, CUDA
graphs and ``torch.compile`` take it as they take torchao's own int8 and int4. Its ``from_hp``
unpacks three tensors from gemlite's layer, which gemlite 0.6 returns four of (a NVFP4 scale),
so ``gemlite_weight`` does the same steps itself for either gemlite: torchao's quantisation
(int8: symmetric, one scale per output row; int4: asymmetric with HQQ-fitted zero points per
group), gemlite's packing, torchao's tensor.

gemlite imports only on a GPU (it reads the device at import); nothing here runs on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch


def gemlite_weight(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``weight`` [out, in] (bfloat16 or float16, on the GPU) as a UIntx tensor of ``bits``
    (8: one scale per output row, ``group_size`` None; 4: groups of ``group_size`` inputs)."""
    import gemlite
    from torchao.prototype.quantization.uintx.uintx_bit_packed_tensor import (
        UIntxBitPackedTensor,
    )

    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    int_data, scale, zero = UIntxBitPackedTensor._quantize_weight(weight, bits, group)
    if bits == 8 and group == in_features:
        layer: Any = gemlite.helper.A16W8(device=int_data.device).from_weights(
            int_data, scales=scale, bias=None
        )
    else:
        # dtype: gemlite takes the kernels' dtype from the scales, which HQQ fits in float16
        layer = gemlite.helper.A16Wn(device=int_data.device, dtype=weight.dtype).from_weights(
            int_data, scale, zero, bits, group, bias=None
        )
    qdata, scale, zero = layer.get_tensor_args()[:3]
    if zero is None:
        zero = torch.tensor([[]], device=qdata.device, dtype=torch.int32)
    kwargs = {
        "in_features": in_features,
        "out_features": out_features,
        "packing_bitwidth": None,
        "data_contiguous": layer.data_contiguous,
        "elements_per_sample": layer.elements_per_sample,
        "W_group_mode": layer.W_group_mode,
        "meta_args": layer.get_meta_args(),
    }
    return UIntxBitPackedTensor(qdata, scale, zero, kwargs, bits, group, weight.dtype)


def quantize_linear(linear: torch.nn.Linear, bits: int, group_size: int | None) -> None:
    """``linear``'s weight replaced by its gemlite tensor (the bias stays as it is)."""
    packed = gemlite_weight(linear.weight.detach(), bits, group_size)
    linear.weight = torch.nn.Parameter(packed, requires_grad=False)
