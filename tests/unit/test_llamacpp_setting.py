"""engine = "llamacpp" in a profile: what it accepts, its refusals (one line: input, place, what
is allowed), its label and run key. No torch and no llama_cpp imported here."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmtui import profile
from slmtui.errors import UserError
from slmtui.profile import parse_profile
from slmtui.spec import ENGINES, ModelRef, RunSpec, model_label

GGUF_MODEL = '[[models]]\nname = "SmolLM2"\nsource = "smollm2-135m-instruct"\n'


def text(settings: str = "", *models: str) -> str:
    return f"[settings]\n{settings}\n{''.join(models) or GGUF_MODEL}\n[tasks.gsm8k]\n"


@pytest.fixture(autouse=True)
def llama_cpp_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profile, "library_installed", lambda name: name == "llama_cpp")


def refusal(source: str) -> str:
    with pytest.raises(UserError) as info:
        parse_profile(source, label="p.toml").runs()
    message = str(info.value)
    assert "\n" not in message and message.startswith("p.toml: ")
    return message


def test_llamacpp_is_an_engine_and_a_variant_of_its_own() -> None:
    assert "llamacpp" in ENGINES
    both = GGUF_MODEL + GGUF_MODEL + 'engine = "llamacpp"\n'
    specs = parse_profile(text("", both), label="p.toml").runs()
    assert [s.engine for s in specs] == ["fast", "llamacpp"]
    assert [s.model_label for s in specs] == ["SmolLM2", "SmolLM2 · llama.cpp"]
    assert specs[0].run_key != specs[1].run_key
    assert specs[1].label == "SmolLM2 · llama.cpp · gsm8k · CPU"
    assert model_label("x", "none", "fast") == "x" and model_label("x", "int8") == "x · int8"


def test_a_gguf_file_may_run_on_llamacpp(tmp_path: Path) -> None:
    gguf = tmp_path / "m.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    model = f'[[models]]\nsource = "{gguf}"\nengine = "llamacpp"\n'
    (spec,) = parse_profile(text("", model), label="p.toml").runs()
    assert spec.model.kind == "gguf" and spec.model_label == "m.Q4_K_M · llama.cpp"


def test_a_model_that_is_not_a_gguf_file_is_refused() -> None:
    model = '[[models]]\nsource = "Qwen/Qwen2.5-0.5B"\nengine = "llamacpp"\n'
    assert refusal(text("", model)) == (
        'p.toml: [[models]] #1 engine "llamacpp" runs GGUF files only (an offline model or a '
        '.gguf file), not source "Qwen/Qwen2.5-0.5B"; use engine "fast" for it'
    )


def test_without_llama_cpp_installed_the_profile_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(profile, "library_installed", lambda name: False)
    message = refusal(text('engine = "llamacpp"'))
    assert message.startswith(
        'p.toml: [[models]] #1 engine "llamacpp" (from [settings]) needs llama_cpp, which is '
        "not installed; pip install 'slmtui[llamacpp]'"
    )
    # the other engines need nothing more
    assert parse_profile(text('engine = "plain"'), label="p.toml").runs()


def test_quantize_dtype_and_gpus_are_refused_with_llamacpp() -> None:
    model = GGUF_MODEL + 'engine = "llamacpp"\n'
    assert refusal(text('quantize = "int8"', model)).endswith(
        'engine "llamacpp" runs the GGUF file at its own quantisation: quantize must be '
        '"none", got "int8"'
    )
    assert refusal(text('dtype = "bfloat16"', model)).endswith(
        'engine "llamacpp" computes with the GGUF file\'s own types: dtype must be "auto", '
        'got "bfloat16"'
    )
    assert refusal(text("gpus = [0, 2]", model)).endswith(
        'engine "llamacpp" runs on the CPU or one GPU, not gpus = [2]'
    )


def test_the_console_path_checks_it_too() -> None:
    """The console edits models after loading: ``Profile.runs`` checks again."""
    from dataclasses import replace

    loaded = parse_profile(text(), label="p.toml")
    entry = replace(loaded.models[0], engine="llamacpp", quantize="int4")
    edited = replace(loaded, models=(entry,))
    with pytest.raises(UserError, match='engine "llamacpp" runs the GGUF file at its own'):
        edited.runs()


def test_a_stored_spec_round_trips_with_the_engine() -> None:
    spec = RunSpec(model=ModelRef("m", "smollm2-135m-instruct", "pypi"), task="gsm8k")
    llama = RunSpec.from_json(RunSpec(**{**spec.__dict__, "engine": "llamacpp"}).to_json())
    assert llama.engine == "llamacpp" and llama.model_label == "m · llama.cpp"
    assert spec.run_key != llama.run_key


def test_the_shipped_gguf_profile_runs_each_file_both_ways() -> None:
    from slmtui.profile import load_profile

    shipped = load_profile(Path(__file__).resolve().parents[2] / "profiles" / "gguf.toml")
    specs = shipped.runs()
    assert len(specs) == 4 * 5 and {s.gpus for s in specs} == {0}
    assert sorted({s.model_label for s in specs}) == [
        "Gemma-3-270M",
        "Gemma-3-270M · llama.cpp",
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct · llama.cpp",
    ]
