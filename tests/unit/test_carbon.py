"""CO2 from measured energy and a grid intensity, worked by hand; absent (not 0) on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_reports import finish

from slmtui.carbon import DEFAULT_GRID, GRID_INTENSITY, carbon_of, parse_grid
from slmtui.cli import main
from slmtui.errors import UserError
from slmtui.profile import parse_profile
from slmtui.reports.commands import build_per_inputs
from slmtui.store import Store

# 360 J at 500 gCO2e/kWh: 360 / 3.6e6 kWh = 1e-4 kWh -> 0.05 g for the run.
# 2,000 generated tokens -> 0.05 / 2 = 0.025 g per 1,000 tokens.
# accuracy 0.5 x 10 samples = 5 correct answers -> 0.05 / 5 = 0.01 g per correct answer.
METRICS = {
    "mode": "generate",
    "tokens_out": 2000,
    "tokens_in": 900,
    "accuracy": 0.5,
    "n_samples": 10,
}


def test_grams_per_run_per_1k_tokens_and_per_correct_answer():
    carbon = carbon_of(360.0, METRICS, parse_grid(500))
    assert carbon.run_g == pytest.approx(0.05)
    assert carbon.per_1k_tokens_g == pytest.approx(0.025)
    assert carbon.per_correct_g == pytest.approx(0.01)


def test_loglikelihood_counts_prompt_tokens():
    # 900 prompt tokens scored: 0.05 g / 0.9 = 0.0555... g per 1,000 tokens
    carbon = carbon_of(360.0, {**METRICS, "mode": "loglikelihood"}, parse_grid(500))
    assert carbon.per_1k_tokens_g == pytest.approx(0.05 / 0.9)


def test_no_energy_means_no_co2_not_zero():
    carbon = carbon_of(None, METRICS, parse_grid(500))
    assert (carbon.run_g, carbon.per_1k_tokens_g, carbon.per_correct_g) == (None, None, None)


def test_grid_is_a_number_or_a_region_code_with_a_default():
    assert parse_grid(None).g_per_kwh == GRID_INTENSITY[DEFAULT_GRID] == 481.0
    assert parse_grid("fr").g_per_kwh == 56.0 and "Ember 2023" in parse_grid("FR").label
    assert parse_grid("420.5").g_per_kwh == 420.5
    with pytest.raises(UserError, match="--carbon-intensity 'mars': not a number"):
        parse_grid("mars")
    with pytest.raises(UserError, match="must be a number of gCO2e/kWh >= 0"):
        parse_grid(-1)


PROFILE = """
[settings]
carbon_intensity = {}

[[models]]
source = "org/a"

[tasks.gsm8k]
"""


def test_profile_setting_takes_a_region_or_a_number_and_rejects_the_rest():
    assert parse_profile(PROFILE.format('"DE"'), label="p.toml").settings.grid.g_per_kwh == 381
    assert parse_profile(PROFILE.format("12"), label="p.toml").settings.grid.g_per_kwh == 12
    assert (
        parse_profile(
            PROFILE.replace("carbon_intensity = {}", ""), label="p.toml"
        ).settings.grid.g_per_kwh
        == 481
    )
    with pytest.raises(UserError, match=r"p.toml: \[settings\] carbon_intensity 'XX'"):
        parse_profile(PROFILE.format('"XX"'), label="p.toml")
    with pytest.raises(UserError, match="unknown key 'carbon'"):
        parse_profile(PROFILE.replace("carbon_intensity = {}", "carbon = 3"), label="p.toml")


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "results.sqlite") as s:
        yield s


def test_store_results_carry_co2_and_cpu_runs_carry_none(store: Store):
    gpu = {**METRICS, "energy_j": 360.0, "energy_per_token_j": 0.18}
    finish(store, "g1", "gpu-model", "gsm8k", metrics=gpu)
    finish(store, "c1", "cpu-model", "gsm8k", gpus=0)
    inputs = {i.model: i for i in build_per_inputs(store.results(), grid=parse_grid(500)).inputs}
    g, c = inputs["gpu-model"], inputs["cpu-model"]
    assert g.extra["co2_run_g"] == pytest.approx(0.05)
    assert g.extra["co2_per_correct_g"] == pytest.approx(0.01)
    # PER's co2 factor is per unit of work: 0.18 J per token -> 0.18 / 3.6e6 * 500 g = 2.5e-5 g
    assert g.co2_g == pytest.approx(2.5e-5)
    assert c.co2_g is None and c.extra["co2_run_g"] is None


def test_report_shows_co2_and_flag_errors_are_one_line(tmp_path: Path, store: Store, capsys):
    gpu = {**METRICS, "energy_j": 360.0, "energy_per_token_j": 0.18}
    finish(store, "g1", "gpu-model", "gsm8k", metrics=gpu)
    finish(store, "c1", "cpu-model", "gsm8k", gpus=0)
    code = main(
        ["report", "--db", str(store.path), "--format", "json", "--carbon-intensity", "500"]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["grid"]["g_per_kwh"] == 500
    rows = {r["model"]: r for r in document["rows"]}
    assert rows["gpu-model"]["co2_run_g"] == pytest.approx(0.05)
    assert rows["cpu-model"]["co2_run_g"] is None
    code = main(["report", "--db", str(store.path), "--carbon-intensity", "DE"])
    out = capsys.readouterr().out
    assert code == 0 and "CO2" in out and "DE, 381 gCO2e/kWh" in " ".join(out.split())
    code = main(["report", "--db", str(store.path), "--carbon-intensity", "lots"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "--carbon-intensity 'lots'" in err


def test_saved_profile_keeps_the_carbon_intensity(tmp_path: Path):
    from slmtui.profile import save_profile

    profile = parse_profile(PROFILE.format('"FR"'), label="p.toml", path=tmp_path / "p.toml")
    saved = save_profile(profile, tmp_path / "copy.toml")
    assert saved.settings.carbon_intensity == "FR" and saved.settings.grid.g_per_kwh == 56
