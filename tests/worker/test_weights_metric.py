"""What a run says it computed with (``weights``): the dtype, and for a GGUF file its own
quantisation read from the header (the file is dequantised at load)."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from slmtui.spec import ModelRef
from slmtui.worker.loading import describe_weights, gguf_file_type


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, file_type: int | None) -> Path:
    """A GGUF v3 header with no tensors: an architecture, a token array, the file type."""
    kv = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 2)
        + _string("<s>")
        + _string("</s>"),
        _string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<ff", 0, 0),
    ]
    if file_type is not None:
        kv.append(_string("general.file_type") + struct.pack("<II", 4, file_type))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))
    return path


def test_the_gguf_file_type_comes_from_the_header(tmp_path: Path) -> None:
    assert gguf_file_type(write_gguf(tmp_path / "a.gguf", 3)) == "Q4_1"
    assert gguf_file_type(write_gguf(tmp_path / "b.gguf", 15)) == "Q4_K_M"
    assert gguf_file_type(write_gguf(tmp_path / "c.gguf", None)) is None
    (tmp_path / "d.gguf").write_bytes(b"not a gguf file")
    assert gguf_file_type(tmp_path / "d.gguf") is None


def test_weights_say_dequantised_for_gguf_and_name_the_scheme(tmp_path: Path) -> None:
    gguf = ModelRef("m", str(write_gguf(tmp_path / "m.Q4_1.gguf", 3)), "gguf")
    assert describe_weights(gguf, torch.bfloat16, None) == "gguf Q4_1 dequantised to bfloat16"
    hub = ModelRef("m", "org/m", "hub")
    assert describe_weights(hub, torch.float32, None) == "float32"
    scheme = "torchao int8 weight-only, per output channel"
    assert describe_weights(hub, torch.bfloat16, scheme) == f"bfloat16, {scheme}"
    missing = ModelRef("m", str(tmp_path / "gone.gguf"), "gguf")
    assert describe_weights(missing, torch.float32, None) == (
        "gguf (type unknown) dequantised to float32"
    )
