"""Profiles: loading, validation messages, runs, saving, and the shipped profiles."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from slmtui.errors import UserError
from slmtui.profile import (
    ModelEntry,
    Profile,
    Settings,
    TaskEntry,
    embedded_default,
    load_profile,
    save_profile,
)
from slmtui.spec import ModelRef

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("offline", "quick", "paper")

MINIMAL = """
[[models]]
source = "Qwen/Qwen2.5-0.5B-Instruct"

[tasks.gsm8k]
"""


def _fake_resolve(source: str) -> ModelRef:
    if source == "no-such-model":
        raise UserError("unknown model 'no-such-model'")
    if source.endswith(".gguf"):
        kind = "gguf"
    elif source.startswith("/"):
        kind = "local"
    elif "/" in source:
        kind = "hub"
    else:
        kind = "pypi"
    return ModelRef(name=source.rsplit("/", 1)[-1], source=source, kind=kind)


@pytest.fixture
def fake_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    """``slmtui.catalog.resolve_model`` without the catalog: resolution is not under test here."""
    module = types.ModuleType("slmtui.catalog")
    module.resolve_model = _fake_resolve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "slmtui.catalog", module)


def write(tmp_path: Path, text: str, name: str = "offline.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}: ")


# -- loading ------------------------------------------------------------------------------------


def test_minimal_profile_takes_defaults(tmp_path: Path):
    profile = load_profile(write(tmp_path, MINIMAL, "mine.toml"))
    assert profile.name == "mine"
    assert profile.settings == Settings()
    assert profile.models == (
        ModelEntry(name="Qwen2.5-0.5B-Instruct", source="Qwen/Qwen2.5-0.5B-Instruct"),
    )
    assert profile.tasks == (TaskEntry(name="gsm8k"),)


def test_full_profile_reads_every_key(tmp_path: Path):
    text = """
name = "full"
description = "all keys"
[settings]
dtype = "bfloat16"
batch_size = 4
engine = "plain"
gpus = [1, 2]
parallel = "dp"
timeout_s = 60
limit = 7
seed = 3
data_dir = "data"
[[models]]
name = "tiny"
source = "./models/tiny"
gpus = 4
dtype = "float32"
batch_size = 2
engine = "fast"
parallel = "tp"
timeout_s = 9.5
[tasks.arc_easy]
limit = 5
num_fewshot = 3
mode = "loglikelihood"
max_new_tokens = 4
data_file = "arc.jsonl"
seed = 1
"""
    profile = load_profile(write(tmp_path, text))
    assert profile.name == "full" and profile.description == "all keys"
    assert profile.settings == Settings(
        dtype="bfloat16",
        batch_size=4,
        engine="plain",
        gpus=(1, 2),
        parallel="dp",
        timeout_s=60.0,
        limit=7,
        seed=3,
        data_dir="data",
    )
    assert profile.models[0] == ModelEntry(
        name="tiny",
        source="./models/tiny",
        gpus=(4,),
        dtype="float32",
        batch_size=2,
        engine="fast",
        parallel="tp",
        timeout_s=9.5,
    )
    assert profile.tasks[0] == TaskEntry(
        name="arc_easy",
        limit=5,
        num_fewshot=3,
        mode="loglikelihood",
        max_new_tokens=4,
        data_file="arc.jsonl",
        seed=1,
    )


# -- validation messages ------------------------------------------------------------------------


def test_unknown_settings_key_suggests_the_right_one(tmp_path: Path):
    message = error_of(tmp_path, "[settings]\nbatchsize = 8\n" + MINIMAL)
    assert message == "[settings] unknown key 'batchsize' (did you mean 'batch_size'?)"


def test_unknown_key_without_a_close_match_lists_allowed(tmp_path: Path):
    message = error_of(tmp_path, "[settings]\nfoo = 1\n" + MINIMAL)
    assert message.startswith("[settings] unknown key 'foo'; allowed: 'dtype', 'batch_size'")


def test_unknown_top_level_key(tmp_path: Path):
    message = error_of(tmp_path, "[setings]\n" + MINIMAL)
    assert message == "unknown top-level key 'setings' (did you mean 'settings'?)"


def test_wrong_type_quotes_the_value(tmp_path: Path):
    text = MINIMAL + 'limit = "five"\n'
    assert error_of(tmp_path, text) == '[tasks.gsm8k] limit must be an integer >= 1, got "five"'


def test_booleans_are_not_integers(tmp_path: Path):
    text = "[settings]\nbatch_size = true\n" + MINIMAL
    assert error_of(tmp_path, text) == (
        '[settings] batch_size must be an integer >= 1 or "auto", got true'
    )


def test_unknown_task_suggests_a_known_one(tmp_path: Path):
    text = '[[models]]\nsource = "x/y"\n[tasks.gsm9k]\n'
    assert error_of(tmp_path, text) == "[tasks.gsm9k] unknown task 'gsm9k' (did you mean 'gsm8k'?)"


def test_mode_the_task_does_not_support(tmp_path: Path):
    text = '[[models]]\nsource = "x/y"\n[tasks.hellaswag]\nmode = "generate"\n'
    assert error_of(tmp_path, text) == (
        "[tasks.hellaswag] mode must be 'loglikelihood', got \"generate\""
    )


def test_bad_dtype_engine_and_parallel(tmp_path: Path):
    assert error_of(tmp_path, '[settings]\ndtype = "bfloat"\n' + MINIMAL) == (
        "[settings] dtype must be 'auto', 'bfloat16', 'float16' or 'float32', "
        "got \"bfloat\" (did you mean 'bfloat16'?)"
    )
    assert error_of(tmp_path, '[settings]\nengine = "vllm"\n' + MINIMAL) == (
        "[settings] engine must be 'fast', 'plain' or 'llamacpp', got \"vllm\""
    )
    text = MINIMAL.replace("[tasks.gsm8k]", 'parallel = "pp"\n[tasks.gsm8k]')
    assert error_of(tmp_path, text) == ("[[models]] #1 parallel must be 'tp' or 'dp', got \"pp\"")


def test_gpu_counts_must_be_powers_of_two_up_to_eight(tmp_path: Path):
    expected = "gpus must be a list of distinct GPU counts from 0, 1, 2, 4, 8 (0 = CPU), got"
    assert error_of(tmp_path, "[settings]\ngpus = [3]\n" + MINIMAL) == f"[settings] {expected} [3]"
    assert error_of(tmp_path, "[settings]\ngpus = []\n" + MINIMAL) == f"[settings] {expected} []"
    assert error_of(tmp_path, "[settings]\ngpus = [1, 1]\n" + MINIMAL) == (
        f"[settings] {expected} [1, 1]"
    )


def test_model_needs_a_source_and_a_unique_name(tmp_path: Path):
    text = '[[models]]\nname = "a"\n[tasks.imdb]\n'
    assert error_of(tmp_path, text) == (
        "[[models]] #1 needs source (a catalog name, hub id, local directory or .gguf file)"
    )
    text = '[[models]]\nsource = "x/a"\n[[models]]\nsource = "y/a"\n[tasks.imdb]\n'
    assert error_of(tmp_path, text) == "[[models]] #2 name 'a' is already used by [[models]] #1"


def test_unknown_model_key(tmp_path: Path):
    text = '[[models]]\nsource = "x/a"\ngpu = [1]\n[tasks.imdb]\n'
    assert error_of(tmp_path, text) == "[[models]] #1 unknown key 'gpu' (did you mean 'gpus'?)"


def test_empty_profile_asks_for_models_then_tasks(tmp_path: Path):
    assert error_of(tmp_path, "") == "no models; add a [[models]] table with a source"
    assert error_of(tmp_path, '[[models]]\nsource = "x/a"\n').startswith(
        "no tasks; add a [tasks.<name>] table, <name> one of 'gsm8k', 'squad_v2'"
    )


def test_toml_syntax_error_names_the_line(tmp_path: Path):
    message = error_of(tmp_path, "[settings]\nlimit = \n")
    assert message.startswith("TOML syntax error: ")
    assert "line 2" in message


def test_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match=r"profile '.*nope\.toml' not found"):
        load_profile(tmp_path / "nope.toml")


def test_task_must_be_a_table(tmp_path: Path):
    text = '[[models]]\nsource = "x/a"\n[tasks]\nimdb = 5\n'
    assert error_of(tmp_path, text) == "[tasks.imdb] must be a table, got 5"


# -- runs -------------------------------------------------------------------------------------


def test_runs_are_models_x_tasks_x_gpu_counts(tmp_path: Path, fake_catalog: None):
    text = """
[settings]
gpus = [1, 2]
limit = 20
batch_size = 4
data_dir = "data"
[[models]]
name = "small"
source = "Qwen/Qwen2.5-0.5B-Instruct"
[[models]]
name = "local"
source = "ckpt/model.gguf"
gpus = [0]
dtype = "float32"
[tasks.gsm8k]
limit = 3
num_fewshot = 2
[tasks.imdb]
data_file = "imdb.jsonl"
"""
    (tmp_path / "data").mkdir()
    (tmp_path / "imdb.jsonl").write_text("")
    specs = load_profile(write(tmp_path, text)).runs()
    assert [(s.model.name, s.task, s.gpus) for s in specs] == [
        ("small", "gsm8k", 1),
        ("small", "gsm8k", 2),
        ("small", "imdb", 1),
        ("small", "imdb", 2),
        ("local", "gsm8k", 0),
        ("local", "imdb", 0),
    ]
    first = specs[0]
    assert first.model == ModelRef("small", "Qwen/Qwen2.5-0.5B-Instruct", "hub")
    assert first.options.limit == 3 and first.options.num_fewshot == 2
    assert first.batch_size == 4 and first.dtype == "auto"
    assert first.data_dir == str(tmp_path / "data")
    assert specs[2].options.limit == 20
    assert specs[2].options.data_file == str(tmp_path / "imdb.jsonl")
    local = specs[4]
    assert local.model == ModelRef("local", str(tmp_path / "ckpt" / "model.gguf"), "gguf")
    assert local.dtype == "float32"


def test_command_line_limit_and_data_dir_override(tmp_path: Path, fake_catalog: None):
    text = "[settings]\nlimit = 50\n" + MINIMAL + "limit = 9\n"
    (tmp_path / "d").mkdir()
    (spec,) = load_profile(write(tmp_path, text)).runs(limit=2, data_dir=tmp_path / "d")
    assert spec.options.limit == 2
    assert spec.data_dir == str(tmp_path / "d")


def test_runs_drop_gpu_counts_the_machine_lacks(tmp_path: Path, fake_catalog: None):
    text = "[settings]\ngpus = [0, 1, 8]\n" + MINIMAL
    profile = load_profile(write(tmp_path, text))
    assert [s.gpus for s in profile.runs(gpus_available=1)] == [0, 1]
    assert [s.gpus for s in profile.runs()] == [0, 1, 8]


def test_unknown_model_source_names_the_profile_entry(tmp_path: Path, fake_catalog: None):
    text = '[[models]]\nsource = "no-such-model"\n[tasks.imdb]\n'
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_profile(path).runs()
    assert str(info.value) == f"{path}: [[models]] #1 source: unknown model 'no-such-model'"


def test_missing_data_folder_or_file_is_named_before_running(tmp_path: Path, fake_catalog: None):
    path = write(tmp_path, '[settings]\ndata_dir = "nope"\n' + MINIMAL)
    with pytest.raises(UserError) as info:
        load_profile(path).runs()
    assert str(info.value) == (
        f"{path}: [settings] data_dir 'nope' is not a directory ({tmp_path / 'nope'}); "
        "expected <data_dir>/<task>/*.jsonl"
    )
    path = write(tmp_path, MINIMAL + 'data_file = "g.jsonl"\n')
    with pytest.raises(UserError) as info:
        load_profile(path).runs()
    assert str(info.value) == (
        f"{path}: [tasks.gsm8k] data_file 'g.jsonl' is not a file ({tmp_path / 'g.jsonl'})"
    )
    with pytest.raises(UserError, match=r"--data-dir .*: not a directory"):
        load_profile(write(tmp_path, MINIMAL)).runs(data_dir=tmp_path / "nope")


# -- saving -----------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path: Path):
    profile = Profile(
        name="saved",
        description="round trip",
        settings=Settings(dtype="float16", gpus=(1, 4), limit=3, timeout_s=12.5, seed=2),
        models=(
            ModelEntry(name="a", source="Qwen/Qwen2.5-0.5B-Instruct", batch_size=16),
            ModelEntry(name="b", source="smollm2-135m-instruct", gpus=(0,), engine="plain"),
        ),
        tasks=(
            TaskEntry(name="hellaswag"),
            TaskEntry(name="gsm8k", num_fewshot=0, max_new_tokens=64, seed=5),
        ),
    )
    path = tmp_path / "sub" / "saved.toml"
    returned = save_profile(profile, path)
    assert load_profile(path) == profile == returned
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["saved.toml"]


def test_save_elsewhere_keeps_relative_paths_pointing_at_the_same_files(
    tmp_path: Path, fake_catalog: None
):
    text = (
        '[settings]\ndata_dir = "data"\n[[models]]\nsource = "./m/x.gguf"\n'
        '[tasks.imdb]\ndata_file = "imdb.jsonl"\n'
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "imdb.jsonl").write_text("")
    original = load_profile(write(tmp_path, text))
    moved = save_profile(original, tmp_path / "elsewhere" / "deep" / "p.toml")
    assert moved.settings.data_dir == "../../data"
    assert moved.runs() == original.runs()


def test_shipped_profiles_round_trip(tmp_path: Path):
    for name in SHIPPED:
        profile = load_profile(REPO / "profiles" / f"{name}.toml")
        assert save_profile(profile, tmp_path / f"{name}.toml") == profile


# -- shipped profiles -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load(name: str, fake_catalog: None):
    profile = load_profile(REPO / "profiles" / f"{name}.toml")
    assert profile.name == name
    assert {t.name for t in profile.tasks} == {"gsm8k", "squad_v2", "hellaswag", "arc_easy", "imdb"}
    assert len(profile.runs()) == 5 * len(profile.models)


def test_embedded_default_is_the_offline_profile():
    shipped = (REPO / "profiles" / "offline.toml").read_bytes()
    embedded = (REPO / "slmtui" / "default_profile.toml").read_bytes()
    assert shipped == embedded, (
        "slmtui/default_profile.toml must be a copy of profiles/offline.toml"
    )
    default = embedded_default()
    assert default == load_profile(REPO / "profiles" / "offline.toml")
    assert [m.source for m in default.models] == ["smollm2-135m-instruct", "gemma-3-270m"]
    assert default.settings.gpus == (0,)


def test_paper_profile_places_models_by_size():
    profile = load_profile(REPO / "profiles" / "paper.toml")
    gpus = {m.source: m.gpus or profile.settings.gpus for m in profile.models}
    assert len(gpus) == 16
    assert gpus["Qwen/Qwen2.5-0.5B-Instruct"] == gpus["meta-llama/Llama-3.1-8B-Instruct"] == (1,)
    assert gpus["Qwen/Qwen2.5-14B-Instruct"] == gpus["lmsys/vicuna-13b-v1.5"] == (2,)
    assert gpus["Qwen/Qwen2.5-32B-Instruct"] == (4,)
    assert gpus["Qwen/Qwen2.5-72B-Instruct"] == gpus["meta-llama/Llama-2-70b-chat-hf"] == (8,)


def test_batch_size_may_be_auto_and_anything_else_is_one_line(tmp_path):
    from slmtui.errors import UserError
    from slmtui.profile import load_profile

    path = tmp_path / "p.toml"
    path.write_text(
        '[settings]\nbatch_size = "auto"\n[[models]]\nsource = "smollm2-135m-instruct"\n'
        'batch_size = 16\n[[models]]\nsource = "gemma-3-270m"\n[tasks.gsm8k]\n',
        encoding="utf-8",
    )
    sizes = sorted((s.model.source, str(s.batch_size)) for s in load_profile(path).runs())
    assert sizes == [("gemma-3-270m", "auto"), ("smollm2-135m-instruct", "16")]
    path.write_text(
        '[settings]\nbatch_size = "big"\n[[models]]\nsource = "smollm2-135m-instruct"\n'
        "[tasks.gsm8k]\n",
        encoding="utf-8",
    )
    with pytest.raises(
        UserError, match=r'\[settings\].*batch_size must be an integer >= 1 or "auto"'
    ):
        load_profile(path)
