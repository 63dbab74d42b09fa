"""Grams CO2e from measured energy and a grid's carbon intensity. Pure, stdlib only.

``grams = energy_j / 3.6e6 J/kWh * intensity gCO2e/kWh``. The energy is what NVML measured over a
run's measured window (warm-up and model load are not in it), so the CO2 figures are for that
window too. On CPU no energy is measured: every figure is then ``None`` (absent, never 0).

The intensity is a number in gCO2e/kWh or a region code from ``GRID_INTENSITY``: the lifecycle
carbon intensity of electricity generation in 2023, from Ember's Yearly Electricity Data (Ember
and Energy Institute, as published by Our World in Data, "Carbon intensity of electricity
generation"; the world figure is Ember's Global Electricity Review 2024). The default is the world
average, so numbers from different boxes compare unless a region is set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slmtui.errors import UserError, allowed_list, did_you_mean

J_PER_KWH = 3.6e6

GRID_SOURCE = (
    "Ember, Yearly Electricity Data (2023 values; Ember and Energy Institute via Our World in "
    "Data, 'Carbon intensity of electricity generation')"
)
GRID_YEAR = 2023
GRID_INTENSITY: dict[str, float] = {
    "world": 481.0,
    "AT": 111.0,
    "AU": 549.0,
    "BE": 138.0,
    "BR": 98.0,
    "CA": 170.0,
    "CN": 582.0,
    "DE": 381.0,
    "DK": 152.0,
    "FI": 79.0,
    "FR": 56.0,
    "IN": 713.0,
    "NO": 30.0,
}
"""gCO2e per kWh generated in 2023 by region code (ISO 3166 alpha-2, or "world")."""
DEFAULT_GRID = "world"


@dataclass(frozen=True)
class Grid:
    """A grid's carbon intensity and where the number comes from."""

    g_per_kwh: float
    """gCO2e per kWh."""
    label: str
    """"world, 481 gCO2e/kWh (Ember 2023)" or "400 gCO2e/kWh (given)"."""

    def grams(self, energy_j: float | None) -> float | None:
        """gCO2e for ``energy_j`` joules; ``None`` when the energy is unknown."""
        if energy_j is None or not math.isfinite(energy_j):
            return None
        return energy_j / J_PER_KWH * self.g_per_kwh


def parse_grid(value: Any, where: str = "--carbon-intensity") -> Grid:
    """A region code (case-insensitive) or a number >= 0 in gCO2e/kWh; UserError otherwise."""
    if value is None:
        value = DEFAULT_GRID
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        code = value.strip()
        by_upper = {k.upper(): k for k in GRID_INTENSITY}
        if code.upper() in by_upper:
            region = by_upper[code.upper()]
            g = GRID_INTENSITY[region]
            return Grid(g, f"{region}, {g:g} gCO2e/kWh (Ember {GRID_YEAR})")
        try:
            number = float(code)
        except ValueError:
            hint = did_you_mean(code, GRID_INTENSITY) or did_you_mean(code.upper(), by_upper)
            raise UserError(
                f"{where} '{value}': not a number of gCO2e/kWh nor a region code{hint}; "
                f"allowed: a number >= 0 or {allowed_list(GRID_INTENSITY)}"
            ) from None
    if number is None or not math.isfinite(number) or number < 0:
        raise UserError(
            f"{where} {value!r}: must be a number of gCO2e/kWh >= 0 or a region code "
            f"({allowed_list(GRID_INTENSITY)})"
        )
    return Grid(number, f"{number:g} gCO2e/kWh (given)")


@dataclass(frozen=True)
class Carbon:
    """CO2e of one run; every figure is ``None`` when energy was not measured (CPU)."""

    run_g: float | None
    """gCO2e over the run's measured window."""
    per_1k_tokens_g: float | None
    """gCO2e per 1,000 generated tokens (generate) or prompt tokens scored (loglikelihood)."""
    per_correct_g: float | None
    """gCO2e per correct answer (accuracy x samples)."""


def carbon_of(energy_j: float | None, metrics: Mapping[str, Any], grid: Grid) -> Carbon:
    """The CO2 figures of a run from its stored energy (J, measured window) and metrics."""
    if energy_j is None:
        return Carbon(None, None, None)

    def number(key: str) -> float | None:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None

    def per(count: float | None) -> float | None:
        return grid.grams(energy_j / count) if count and count > 0 else None

    generate = metrics.get("mode", "generate") == "generate"
    tokens = number("tokens_out") if generate else number("tokens_in")
    accuracy, samples = number("accuracy"), number("n_samples")
    correct = accuracy * samples if accuracy is not None and samples is not None else None
    per_correct = number("energy_per_correct_j")
    return Carbon(
        run_g=grid.grams(energy_j),
        per_1k_tokens_g=None if (g := per(tokens)) is None else 1000 * g,
        per_correct_g=grid.grams(per_correct) if per_correct is not None else per(correct),
    )
