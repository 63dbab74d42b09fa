"""The quantize setting in the console: the Selection's rule, the Pick table's key (z), and
Rank's accuracy change against full precision."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from textual.widgets import DataTable
from ui_fixtures import PROFILE_TOML, T0, ScriptedScheduler, make_app, metrics, spec

from slmtui import profile as profile_module
from slmtui import quantization
from slmtui.errors import UserError
from slmtui.profile import parse_profile
from slmtui.protocol import RunFinished, RunStarted
from slmtui.store import Store
from slmtui.ui.selection import Selection
from slmtui.ui.widgets.rank_view import RankView


@pytest.fixture(autouse=True)
def torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "torchao_version", lambda: "0.18.0")


def selection(gpus_available: int = 1) -> Selection:
    profile = parse_profile(PROFILE_TOML, label="fixture.toml")
    return Selection.from_profile(profile, gpus_available=gpus_available)


def test_cycling_goes_none_int8_int4_and_reaches_the_runs() -> None:
    chosen = selection()
    chosen.cycle_gpus(0)  # alpha: CPU -> 1 GPU (int4 needs one)
    assert [chosen.cycle_quantize(0) for _ in range(3)] == ["int8", "int4", "none"]
    chosen.cycle_quantize(0)
    specs = chosen.specs()
    assert {(s.model_label, s.quantize) for s in specs} == {
        ("alpha-135m · int8", "int8"),
        ("beta-270m", "none"),
    }
    saved = chosen.to_profile()
    assert [m.quantize for m in saved.models] == ["int8", None]  # beta keeps [settings]'


def test_cycling_skips_a_variant_another_row_already_is() -> None:
    chosen = selection()
    twin = replace(chosen.models[0], entry=chosen.models[0].entry, quantize="int8")
    chosen.models.append(twin)  # alpha listed twice: none and int8
    assert chosen.cycle_quantize(0) == "int4"  # int8 is the other row
    assert [m.label for m in chosen.models[::2]] == ["alpha-135m · int4", "alpha-135m · int8"]


def test_a_setting_the_box_cannot_run_is_a_one_line_error_in_the_plan() -> None:
    chosen = selection(gpus_available=0)
    chosen.cycle_quantize(0)
    chosen.cycle_quantize(0)  # int4 on the CPU
    with pytest.raises(UserError, match=r'#1 quantize "int4": .* no int4 weight-only kernel'):
        chosen.specs()


def test_a_model_added_twice_is_refused_only_as_the_same_variant() -> None:
    chosen = selection()
    chosen.cycle_quantize(0)  # alpha is int8 now: a full-precision alpha may join
    chosen.add_model("org/alpha-135m", name="alpha-135m")
    with pytest.raises(UserError, match="already in the list"):
        chosen.add_model("org/alpha-135m", name="alpha-135m")


@pytest.mark.anyio
async def test_z_in_the_models_table_cycles_the_setting(store: Store, tmp_path: Path) -> None:
    scheduler = ScriptedScheduler(store)
    app = make_app(store, scheduler, tmp_path=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.1)
        await pilot.pause()
        await pilot.press("z")
        table = app.query_one("#models", DataTable)
        dtypes = [str(getattr(c, "plain", c)) for c in table.get_column("dtype")]
        assert dtypes == ["auto · int8", "auto"]
        await pilot.press("R")
        await pilot.pause(0.2)
    assert {(s.model.name, s.quantize) for s in scheduler.submitted} == {
        ("alpha-135m", "int8"),
        ("beta-270m", "none"),
    }


@pytest.mark.anyio
async def test_rank_shows_the_accuracy_change_against_full_precision(
    store: Store, tmp_path: Path
) -> None:
    full = spec("alpha-135m")
    rows = [
        (full, metrics(0.60, 100, 10, 1000)),
        (replace(full, quantize="int4"), metrics(0.55, 180, 6, 400)),
        (spec("beta-270m"), metrics(0.70, 80, 12, 1500)),
    ]
    for n, (run_spec, m) in enumerate(rows):
        run_id = f"run-{n}"
        store.record(RunStarted(run_id, spec=run_spec.to_dict(), pid=1, t=T0 + n))
        store.record(RunFinished(run_id, metrics=m, t=T0 + n + 10))
    app = make_app(store, tmp_path=tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause(0.1)
        await pilot.pause()
        await pilot.press("3", "v")  # overview -> gsm8k
        rank = app.query_one(RankView)
        assert rank.view == "gsm8k"
        table = app.query_one("#rank-table", DataTable)
        models = [str(getattr(c, "plain", c)) for c in table.get_column("model")]
        change = [str(getattr(c, "plain", c)).strip() for c in table.get_column("acc_change")]
        assert dict(zip(models, change, strict=True)) == {
            "alpha-135m": "–",
            "alpha-135m · int4": "-0.050",
            "beta-270m": "–",
        }


def test_inspect_names_the_scheme_and_the_weight_bytes() -> None:
    from slmtui.ui.screens.inspect import _quantize_line

    metrics = {"quantize_scheme": "torchao int8 weight-only, per output channel"}
    line = _quantize_line("int8", {**metrics, "weight_bytes": 3 * 2**30})
    assert line == "int8: torchao int8 weight-only, per output channel; 3,072 MiB of weights"
    assert _quantize_line("int4", {}) == "int4: not recorded"


@pytest.fixture
def llama_cpp_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The llamacpp engine's library counts as installed (the label needs no llama.cpp)."""
    monkeypatch.setattr(profile_module, "library_installed", lambda name: name == "llama_cpp")


@pytest.mark.usefixtures("llama_cpp_installed")
def test_a_model_label_follows_the_settings_engine_when_its_entry_names_none(
    tmp_path: Path,
) -> None:
    """Pick's rows read what the runs will be called: under ``[settings] engine = "llamacpp"``
    a GGUF model without its own engine is the llama.cpp variant."""
    gguf = tmp_path / "smol.gguf"
    gguf.write_bytes(b"GGUF")
    profile = parse_profile(
        f'[settings]\nengine = "llamacpp"\ngpus = [0]\n\n'
        f'[[models]]\nname = "smol"\nsource = "{gguf}"\n\n'
        f'[[models]]\nname = "smol-deq"\nsource = "{gguf}"\nengine = "fast"\n\n'
        "[tasks.gsm8k]\n",
        label="engines.toml",
    )
    chosen = Selection.from_profile(profile, gpus_available=0)
    assert [m.label for m in chosen.models] == ["smol · llama.cpp", "smol-deq"]
    runs = {s.model_label for s in chosen.to_profile().runs()}
    assert runs == {m.label for m in chosen.models}


@pytest.mark.anyio
@pytest.mark.usefixtures("llama_cpp_installed")
async def test_the_models_table_names_the_llama_cpp_variant(store: Store, tmp_path: Path) -> None:
    """Two rows of one GGUF file, dequantised and as stored, must not read the same."""
    gguf = tmp_path / "smol.gguf"
    gguf.write_bytes(b"GGUF")
    toml = (
        f'[settings]\ngpus = [0]\n\n[[models]]\nname = "smol"\nsource = "{gguf}"\n\n'
        f'[[models]]\nname = "smol"\nsource = "{gguf}"\nengine = "llamacpp"\n\n'
        "[tasks.gsm8k]\n"
    )
    app = make_app(store, tmp_path=tmp_path, profile_toml=toml)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        table = app.query_one("#models", DataTable)
        names = [str(getattr(c, "plain", c)) for c in table.get_column("name")]
    assert names == ["smol", "smol · llama.cpp"]
