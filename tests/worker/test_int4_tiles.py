"""int4 packed in tinygemm's 128-column tiles (``worker.int4_tiles``) against torchao's own
1,024-padded tensor: the same products (the dropped columns were zeros), fewer bytes, row slices
that stay narrow. The kernel is CUDA-only (bfloat16, compute capability 8.0+): those tests run on
a GPU and skip here; the width arithmetic and the setting run everywhere.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from slmtui.worker.fusion import share_rows
from slmtui.worker.int4_tiles import TILE_COLUMNS, TightInt4Tensor, packed_width
from slmtui.worker.quantize import int4_packing, tensor_bytes

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
needs_gpu = pytest.mark.skipif(not GPU, reason="tinygemm int4 needs a GPU of capability 8.0+")


@pytest.mark.parametrize(("width", "packed"), [(576, 640), (3584, 3584), (18944, 18944), (1, 128)])
def test_a_width_is_packed_to_the_next_128_columns(width: int, packed: int):
    assert packed_width(width) == packed
    assert packed % TILE_COLUMNS == 0


def test_the_packing_setting_defaults_to_tight_and_names_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv("SLMTUI_INT4_PACKING", raising=False)
    assert int4_packing() == "tight"
    monkeypatch.setenv("SLMTUI_INT4_PACKING", "torchao")
    assert int4_packing() == "torchao"
    monkeypatch.setenv("SLMTUI_INT4_PACKING", "loose")
    with pytest.raises(ValueError, match=r"^SLMTUI_INT4_PACKING='loose': one of tight, torchao$"):
        int4_packing()


def _weight(out_features: int, in_features: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(out_features, in_features, device="cuda", generator=generator)
    return (w * 0.02).bfloat16()


@needs_gpu
@pytest.mark.parametrize(
    ("shape", "group"), [((256, 576), 64), ((512, 1152), 128), ((64, 384), 32)]
)
def test_tight_products_equal_torchaos_padded_ones(shape: tuple[int, int], group: int):
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
        Int4TilePackedTo4dTensor,
    )

    w = _weight(*shape)
    wide = Int4TilePackedTo4dTensor.from_hp(w, [1, group])
    tight = TightInt4Tensor.from_weight(w, group)
    for rows in (1, 3, 64):
        x = torch.randn(rows, shape[1], device="cuda").bfloat16()
        got = torch.nn.functional.linear(x, tight).float()
        want = torch.nn.functional.linear(x, wide).float()
        assert got.shape == (rows, shape[0])
        # the same int4 numbers; the kernel may split the shorter sum differently
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    assert tensor_bytes(tight) < tensor_bytes(wide)
    assert tight.qdata.shape[1] * TILE_COLUMNS == packed_width(shape[1])


@needs_gpu
def test_a_row_slice_stays_narrow_and_computes_its_rows():
    tight = TightInt4Tensor.from_weight(_weight(384, 640), 128)
    assert isinstance(tight[128:256], TightInt4Tensor)
    part = share_rows(tight, 128, 256)  # what a fused group's member gets
    assert isinstance(part, TightInt4Tensor) and part.shape == (128, 640)
    x = torch.randn(2, 640, device="cuda").bfloat16()
    whole = torch.nn.functional.linear(x, tight)
    assert torch.equal(torch.nn.functional.linear(x, part), whole[:, 128:256])


@needs_gpu
def test_columns_are_not_sliced():
    """torchao's column arithmetic assumes its own padding: refused, not miscomputed."""
    tight = TightInt4Tensor.from_weight(_weight(64, 640), 128)
    with pytest.raises(NotImplementedError, match="rows"):
        tight[:, :128]
