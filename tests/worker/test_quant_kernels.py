"""Which kernel library a quantised run gets (``SLMTUI_QUANT_KERNELS``; gemlite or torchao),
the refusals, the fused groups' undoing before gemlite, and gemlite's tuning cache; on the CPU,
where gemlite cannot run (its kernels are measured by ``bench/quant.py`` on a GPU)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from test_fast_contract import SMALL
from transformers import LlamaConfig, LlamaForCausalLM

from slmtui.quantization import GEMLITE_SCHEMES, KERNEL_LIBRARIES, kernels_setting, scheme
from slmtui.worker import quantize as quantize_module
from slmtui.worker.fusion import fuse_projections, fused_group, groups_of, unfuse_projections
from slmtui.worker.quantize import QuantizeError, choose_kernels, save_kernel_tuning

pytest.importorskip("torchao")


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def test_the_setting_reads_the_environment_and_names_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLMTUI_QUANT_KERNELS", raising=False)
    assert kernels_setting() == "auto"
    monkeypatch.setenv("SLMTUI_QUANT_KERNELS", " Gemlite ")
    assert kernels_setting() == "gemlite"
    monkeypatch.setenv("SLMTUI_QUANT_KERNELS", "marlin")
    with pytest.raises(ValueError, match="'marlin': one of auto, torchao, gemlite"):
        kernels_setting()
    assert KERNEL_LIBRARIES == ("auto", "torchao", "gemlite")


def test_auto_takes_torchao_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLMTUI_QUANT_KERNELS", raising=False)
    assert choose_kernels(_tiny(), "int8") == "torchao"
    assert choose_kernels(_tiny(), "int4") == "torchao"


def test_asking_for_gemlite_where_it_cannot_run_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLMTUI_QUANT_KERNELS", "gemlite")
    with pytest.raises(QuantizeError, match="gemlite's kernels run on a GPU only") as caught:
        choose_kernels(_tiny(), "int8")
    assert "\n" not in str(caught.value)
    with pytest.raises(QuantizeError, match="gemlite's kernels run on a GPU only"):
        choose_kernels(_tiny(), "int4")  # int4 runs there when asked for (auto: tinygemm)


def test_auto_keeps_int4_on_torchao_even_where_gemlite_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gemlite's int4 measured slower than tinygemm (1.09x against 1.30x bf16 on the H200):
    auto does not look further than the setting, on any device."""
    monkeypatch.delenv("SLMTUI_QUANT_KERNELS", raising=False)
    model = _tiny()
    seen: list[str] = []
    monkeypatch.setattr(
        quantize_module, "gemlite_version", lambda: seen.append("asked") or "0.5.1.post1"
    )
    assert choose_kernels(model, "int4") == "torchao"
    assert seen == []


def test_the_scheme_names_the_library() -> None:
    assert "gemlite" in (scheme("int8", "gemlite") or "")
    assert "torchao int8" in (scheme("int8") or "")
    assert scheme("none", "gemlite") is None
    assert set(GEMLITE_SCHEMES) == {"int8", "int4"}


def test_a_cpu_run_records_torchao_as_its_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLMTUI_QUANT_KERNELS", raising=False)
    metrics = quantize_module.quantize_model(_tiny(), "int8")
    assert metrics["quantize_kernels"] == "torchao"


def test_unfusing_gives_every_member_its_own_memory() -> None:
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fuse_projections(model)
    owner, names, members = next(iter(groups_of(model)))
    group = fused_group(owner, names)
    assert group is not None
    assert members[1].weight.data_ptr() != group.weight.data_ptr()  # a view inside it
    assert unfuse_projections(model) == 4  # 2 layers x (qkv, gate/up)
    assert fused_group(owner, names) is None
    pointers = [m.weight.data_ptr() for m in members]
    assert len(set(pointers)) == len(pointers)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert unfuse_projections(model) == 0


def test_gemlite_tuning_is_saved_under_the_cache_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    written: list[str] = []
    fake = types.ModuleType("gemlite")
    fake.cache_config = lambda path: (written.append(path), Path(path).write_text("{}"))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemlite", fake)
    monkeypatch.setenv("SLMTUI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(quantize_module, "gemlite_version", lambda: "0.5.1.post1")
    save_kernel_tuning()
    assert written == [str(tmp_path / "gemlite" / "nvidia_h200-gemlite-0.5.1.post1.json")]
    assert Path(written[0]).exists()


def test_saving_the_tuning_never_fails_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("gemlite")

    def broken(path: str) -> None:
        raise OSError("read-only file system")

    fake.cache_config = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemlite", fake)
    save_kernel_tuning()  # no exception
    monkeypatch.delitem(sys.modules, "gemlite")
    save_kernel_tuning()  # gemlite never loaded: nothing to do
