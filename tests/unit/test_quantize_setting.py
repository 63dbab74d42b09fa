"""The quantize setting: profile parsing, refusals, run keys, labels, resume. No torch here."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from slmtui import quantization
from slmtui.errors import UserError
from slmtui.plan import plan_runs
from slmtui.profile import ModelEntry, load_profile, parse_profile, save_profile
from slmtui.protocol import RunFinished, RunStarted
from slmtui.spec import ModelRef, RunSpec, TaskOptions, model_label
from slmtui.store import Store

PINNED_KEY = "99e254f3a8e26802"
"""``PINNED_SPEC``'s run key before the setting existed (main at 9f4ec6e): must not change."""
PINNED_SPEC = RunSpec(
    model=ModelRef("m", "org/m", "hub"),
    task="gsm8k",
    options=TaskOptions(limit=5),
    gpus=1,
    dtype="bfloat16",
)


def profile_text(settings: str = "", *models: str) -> str:
    tables = "".join(f'\n[[models]]\nsource = "org/m"\n{m}\n' for m in models or ("",))
    return f"[settings]\ngpus = [1]\n{settings}\n{tables}\n[tasks.gsm8k]\n"


@pytest.fixture(autouse=True)
def torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao 0.18 'installed' (its presence is read from metadata; nothing is imported)."""
    monkeypatch.setattr(quantization, "torchao_version", lambda: "0.18.0")


@pytest.fixture(autouse=True)
def fake_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("slmtui.catalog")
    module.resolve_model = lambda s: ModelRef(s.rsplit("/", 1)[-1], s, "hub")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "slmtui.catalog", module)


def parse(text: str) -> list[RunSpec]:
    return parse_profile(text, label="p.toml").runs()


def refusal(text: str) -> str:
    with pytest.raises(UserError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- parsing --------------------------------------------------------------------------------------


def test_quantize_defaults_to_none_and_settings_apply_to_every_model() -> None:
    assert [s.quantize for s in parse(profile_text())] == ["none"]
    assert [s.quantize for s in parse(profile_text('quantize = "int8"'))] == ["int8"]


def test_a_model_overrides_the_settings_quantize() -> None:
    specs = parse(profile_text('quantize = "int8"', 'quantize = "none"'))
    assert [s.quantize for s in specs] == ["none"]


def test_a_model_listed_twice_with_different_settings_gives_two_variants() -> None:
    specs = parse(profile_text("", "", 'quantize = "int4"', 'quantize = "int8"'))
    assert [s.label for s in specs] == [
        "m · gsm8k · 1 GPU",
        "m · int4 · gsm8k · 1 GPU",
        "m · int8 · gsm8k · 1 GPU",
    ]
    assert len({s.run_key for s in specs}) == 3


def test_the_same_model_and_setting_twice_is_refused() -> None:
    message = refusal(profile_text("", 'quantize = "int4"', 'quantize = "int4"'))
    assert message == "p.toml: [[models]] #2 name 'm' is already used by [[models]] #1"


@pytest.mark.parametrize(
    ("settings", "model", "where"),
    [('quantize = "int3"', "", "[settings]"), ("", 'quantize = "int3"', "[[models]] #1")],
)
def test_an_unknown_value_names_the_key_the_place_and_what_is_allowed(
    settings: str, model: str, where: str
) -> None:
    assert refusal(profile_text(settings, model)) == (
        f"p.toml: {where} quantize must be 'none', 'int8' or 'int4', got \"int3\" "
        "(did you mean 'int8'?)"
    )


def test_a_non_string_value_is_refused() -> None:
    assert "quantize must be 'none', 'int8' or 'int4', got 4" in refusal(
        profile_text("quantize = 4")
    )


# -- refusals: what the library and the device can do ------------------------------------------


def test_int8_on_the_cpu_is_accepted() -> None:
    specs = parse(profile_text("", 'quantize = "int8"\ngpus = [0]'))
    assert [(s.quantize, s.gpus) for s in specs] == [("int8", 0)]


def test_int4_on_the_cpu_is_refused_in_one_line() -> None:
    assert refusal(profile_text("", 'quantize = "int4"\ngpus = [0, 1]')) == (
        'p.toml: [[models]] #1 quantize "int4": torchao 0.18.0 has no int4 weight-only kernel '
        'for the CPU (gpus = 0); use quantize = "int8" on the CPU, or gpus = [1]'
    )


def test_a_refusal_from_settings_says_so() -> None:
    message = refusal('[settings]\nquantize = "int4"\n[[models]]\nsource = "org/m"\n[tasks.gsm8k]')
    assert message.startswith('p.toml: [[models]] #1 quantize "int4" (from [settings]): ')
    assert "no int4 weight-only kernel for the CPU" in message


def test_int4_with_a_dtype_other_than_bfloat16_is_refused() -> None:
    message = refusal(profile_text("", 'quantize = "int4"\ndtype = "float16"'))
    assert message.endswith(
        'the int4 kernel (tinygemm) takes bfloat16 weights, not dtype "float16"; '
        'use dtype = "bfloat16" or "auto"'
    )


def test_several_gpus_are_refused() -> None:
    message = refusal(profile_text("", 'quantize = "int8"\ngpus = [1, 2]'))
    assert "runs on the CPU or one GPU, not gpus = [2]" in message


def test_without_torchao_a_quantised_model_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "torchao_version", lambda: None)
    assert refusal(profile_text("", 'quantize = "int8"')) == (
        'p.toml: [[models]] #1 quantize "int8": needs torchao, which is not installed; '
        "pip install 'slmtui[quant]' (torchao >= 0.18)"
    )
    assert parse(profile_text())  # full precision needs nothing


def test_an_old_torchao_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "torchao_version", lambda: "0.13.0")
    assert "needs torchao >= 0.18, found 0.13.0" in refusal(profile_text('quantize = "int8"'))


def test_load_profile_refuses_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text(profile_text("", 'quantize = "int4"\ngpus = [0]'), encoding="utf-8")
    with pytest.raises(UserError, match=r"q\.toml: \[\[models\]\] #1 quantize \"int4\": "):
        load_profile(path)


def test_an_edit_after_loading_is_checked_when_runs_are_built() -> None:
    """The console edits a loaded profile (GPUs, dtype, quantize): ``runs`` checks again."""
    profile = parse_profile(profile_text(), label="p.toml")
    edited = replace(profile, models=(replace(profile.models[0], quantize="int4", gpus=(0,)),))
    with pytest.raises(UserError, match=r"^profile '\w+': \[\[models\]\] #1 quantize \"int4\": "):
        edited.runs()


# -- keys, labels, storage ----------------------------------------------------------------------


def test_a_full_precision_run_keeps_the_key_it_had_before_the_setting() -> None:
    assert PINNED_SPEC.run_key == PINNED_KEY
    assert replace(PINNED_SPEC, quantize="none").run_key == PINNED_KEY


def test_each_quantisation_is_its_own_run_key() -> None:
    keys = {replace(PINNED_SPEC, quantize=q).run_key for q in ("none", "int8", "int4")}
    assert len(keys) == 3


def test_a_stored_spec_from_before_the_setting_reads_as_full_precision() -> None:
    old = PINNED_SPEC.to_dict()
    del old["quantize"]
    spec = RunSpec.from_dict(old)
    assert spec.quantize == "none" and spec.run_key == PINNED_KEY
    assert RunSpec.from_json(replace(spec, quantize="int4").to_json()).quantize == "int4"


def test_labels_name_the_variant() -> None:
    assert model_label("Qwen2.5-7B-Instruct", "int4") == "Qwen2.5-7B-Instruct · int4"
    assert model_label("Qwen2.5-7B-Instruct", "none") == "Qwen2.5-7B-Instruct"
    spec = replace(PINNED_SPEC, quantize="int8")
    assert spec.model_label == "m · int8"
    assert spec.label == "m · int8 · gsm8k · 1 GPU"
    assert PINNED_SPEC.label == "m · gsm8k · 1 GPU"


def test_resume_keeps_the_variants_apart(tmp_path: Path) -> None:
    full, int4 = PINNED_SPEC, replace(PINNED_SPEC, quantize="int4")
    with Store(tmp_path / "r.sqlite") as store:
        store.begin_run("r1", full)
        store.record(RunStarted("r1", spec=full.to_dict(), pid=1))
        store.record(RunFinished("r1", metrics={"accuracy": 1.0}))
        plan = plan_runs([full, int4], store)
    assert plan.skipped == [full] and plan.to_run == [int4]


def test_saving_keeps_the_setting(tmp_path: Path) -> None:
    profile = parse_profile(profile_text('quantize = "int8"', "", 'quantize = "none"'), label="p")
    saved = save_profile(profile, tmp_path / "saved.toml")
    assert saved.settings.quantize == "int8"
    assert [m.quantize for m in saved.models] == [None, "none"]
    assert [s.quantize for s in saved.runs()] == ["int8", "none"]
    text = (tmp_path / "saved.toml").read_text(encoding="utf-8")
    assert 'quantize = "int8"' in text
    full_precision = save_profile(
        replace(profile, settings=replace(profile.settings, quantize="none"), models=(
            ModelEntry(name="m", source="org/m"),)),
        tmp_path / "plain.toml",
    )  # fmt: skip
    assert "quantize" not in (tmp_path / "plain.toml").read_text(encoding="utf-8")
    assert full_precision.settings.quantize == "none"


def test_checking_a_quantised_profile_imports_neither_torch_nor_torchao() -> None:
    """The console loads profiles: the check reads torchao's version from its metadata only."""
    import subprocess

    code = (
        "import sys\n"
        "from slmtui.profile import parse_profile\n"
        'text = \'[[models]]\\nsource = "org/m"\\nquantize = "int8"\\n[tasks.gsm8k]\\n\'\n'
        "try:\n"
        "    parse_profile(text, label='p')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, file=sys.stderr)\n"
        "print(sorted(m for m in ('torch', 'torchao', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_the_shipped_quant_profile_lists_three_variants_of_two_models() -> None:
    profile = load_profile(Path(__file__).resolve().parents[2] / "profiles" / "quant.toml")
    specs = profile.runs()
    assert len(specs) == 6 * 5
    assert sorted({s.model_label for s in specs}) == [
        "Gemma-3-270M",
        "Gemma-3-270M · int4",
        "Gemma-3-270M · int8",
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct · int4",
        "SmolLM2-135M-Instruct · int8",
    ]
    assert len({s.run_key for s in specs}) == len(specs)


def test_the_cli_refuses_a_quantised_profile_in_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    from slmtui.cli import main

    sys.modules.pop("slmtui.catalog")  # the real one (the CLI uses more of it); restored after
    importlib.import_module("slmtui.catalog")
    path = tmp_path / "q.toml"
    path.write_text(profile_text("", 'quantize = "int4"\ngpus = [0]'), encoding="utf-8")
    db = tmp_path / "results.sqlite"
    assert main(["--db", str(db), "run", str(path), "--headless"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'q.toml: [[models]] #1 quantize "int4": torchao 0.18.0 has no int4' in err
    assert not db.exists()  # nothing written
