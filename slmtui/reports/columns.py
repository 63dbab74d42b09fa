"""The column registry: every per-row figure that Rank, the headless tables and the exports show.

A :class:`Col` says once what a column is: its key (the CSV column and JSON key), its headers,
its unit, which end is best (from ``per.HIGHER_IS_BETTER`` for the factors PER multiplies), how
to read it from a :class:`~slmtui.per.PerRow` and how to print it. The view lists below say
which columns each view shows, in order. A figure a run already reports in its metrics becomes a
column with one ``Col(..., metric=name)`` row here and its key in the views that should show it:
``reports.commands.build_per_inputs`` copies every ``metric`` column from the stored metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from slmtui.per import HIGHER_IS_BETTER, PerRow


def _extra(key: str) -> Callable[[PerRow], Any]:
    return lambda row: row.input.extra.get(key)


def _significant(value: Any) -> str:
    """3 significant digits (energy in J, gCO2e); "-" when absent (nothing measured, e.g. on
    the CPU)."""
    return "-" if value is None else f"{value:.3g}"


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda value: "-" if value is None else f"{value:,.{digits}f}"


@dataclass(frozen=True)
class Col:
    """One column, for every view."""

    key: str
    """The CSV column / JSON key, and the key views sort and mark by."""
    label: str
    """The console's header ("{unit}" and "{lat}" become the task's THR and LAT units)."""
    unit: str
    """What the number means and its unit (the JSON export's ``units``)."""
    read: Callable[[PerRow], Any]
    better: bool | None = None
    """True: higher is best; False: lower is best; None: not a figure of merit (not marked)."""
    digits: int = 3
    """Decimals in the console."""
    short: str | None = None
    """The headless table's header (two lines allowed); None: ``label``."""
    text: Callable[[Any], str] | None = None
    """How the headless and Markdown tables print a value; None: ``digits`` decimals."""
    metric: str | None = None
    """The ``RunMetrics`` field this column shows (copied into ``PerInput.extra`` under ``key``
    by ``build_per_inputs``)."""
    md: str | None = None
    """The Markdown header; None: ``short`` with its second line in parentheses."""

    def header(self, unit: str | None, *, style: str = "console") -> str:
        """The header in a view's style: "console", "table" (headless, two lines) or "md"."""
        if style == "md" and self.md is not None:
            template = self.md
        elif style in ("table", "md"):
            template = self.short or self.label
        else:
            template = self.label
        text = template.format(unit=unit or "", lat=latency_unit(unit)).strip()
        if style == "md" and self.md is None and "\n" in text:
            first, second = text.split("\n", 1)
            text = f"{first} ({second})" if second else first
        return text

    def format(self, value: Any) -> str:
        if self.text is not None:
            return self.text(value)
        return "-" if value is None else f"{value:.{self.digits}f}"


def latency_unit(throughput_unit: str | None) -> str:
    """LAT's unit that goes with a THR unit: ms/token for tokens/s, ms/sample for samples/s."""
    if throughput_unit and throughput_unit.endswith("/s"):
        return "ms/" + throughput_unit.removesuffix("/s").removesuffix("s")
    return "ms"


_RATIO = "factor as a ratio to the task's best, 0..1"
_NORM = "factor min-max normalised over the task's models, 0..1"

REGISTRY: tuple[Col, ...] = (
    Col("model", "Model", "the model's label (GPU count and differing settings appended)",
        lambda r: r.input.model),
    Col("task", "Task", "the task (and its mode when a task ran in both)", lambda r: r.input.task),
    Col("accuracy", "Accuracy", "the task's primary metric, 0..1", lambda r: r.input.accuracy,
        HIGHER_IS_BETTER["accuracy"], short="Acc", text=_fixed(3), md="Accuracy"),
    Col("acc_change", "ΔAcc vs full",
        "accuracy minus the same run's at full precision (quantised variants only)",
        _extra("acc_change"), text=lambda v: "-" if v is None else f"{v:+.3f}"),
    Col("throughput", "THR/GPU {unit}",
        "per GPU, in throughput_unit (tokens/s generate, samples/s loglikelihood)",
        lambda r: r.input.throughput, HIGHER_IS_BETTER["throughput"], digits=1,
        short="THR\n{unit}", text=_fixed(1)),
    Col("throughput_unit", "THR unit", "tokens/s or samples/s", lambda r: r.input.throughput_unit),
    Col("latency_ms", "LAT {lat}",
        "ms per generated token (generate) or per sample (loglikelihood)",
        lambda r: r.input.latency_ms, HIGHER_IS_BETTER["latency"], digits=2,
        short="LAT\n{lat}", text=_fixed(2)),
    Col("memory_mb", "MEM MB", "MB, peak of the run", lambda r: r.input.memory_mb,
        HIGHER_IS_BETTER["memory"], digits=0, short="MEM\nMB", text=_fixed(0)),
    Col("energy_j", "Energy J",
        "J per unit of work (per generated token or per sample); total when unknown",
        lambda r: r.input.energy_j, HIGHER_IS_BETTER["energy"], short="Energy\nJ",
        text=_significant),
    Col("per", "PER", "the study's PER, 0..1 (min-max over the task's models)", lambda r: r.per,
        True),
    Col("rank", "#", "rank by the study's PER within the task (1 = best)", lambda r: r.rank),
    Col("pareto", "Pareto", "on the task's Pareto front (no row better on every factor)",
        lambda r: r.pareto),
    Col("acc_n", "ACCn", _NORM, lambda r: r.acc_n, text=_fixed(2)),
    Col("thr_n", "THRn", _NORM, lambda r: r.thr_n, text=_fixed(2)),
    Col("lat_n", "LATn", _NORM, lambda r: r.lat_n, text=_fixed(2)),
    Col("mem_n", "MEMn", _NORM, lambda r: r.mem_n, text=_fixed(2)),
    Col("energy_n", "En", _NORM, lambda r: r.energy_n,
        text=_fixed(2)),
    Col("per_rel", "PER-rel", "PER-rel, 0..1 (ratios to the task's best)", lambda r: r.per_rel,
        True),
    Col("rank_rel", "#", "rank by PER-rel within the task (1 = best)", lambda r: r.rank_rel),
    Col("limiting", "Limited by", "the factor with the lowest ratio to the best (PER-rel's limit)",
        lambda r: r.limiting, short="Limited\nby", text=lambda v: v or "-", md="Limited by"),
    Col("acc_r", "ACCr", _RATIO, lambda r: r.ratios.get("accuracy")),
    Col("thr_r", "THRr", _RATIO, lambda r: r.ratios.get("throughput")),
    Col("lat_r", "LATr", _RATIO, lambda r: r.ratios.get("latency")),
    Col("mem_r", "MEMr", _RATIO, lambda r: r.ratios.get("memory")),
    Col("energy_r", "Er", _RATIO, lambda r: r.ratios.get("energy")),
    Col("co2_r", "CO2r", _RATIO, lambda r: r.ratios.get("co2")),
    Col("co2_g", "CO2 g", "gCO2e per unit of work, as energy_j", lambda r: r.input.co2_g,
        HIGHER_IS_BETTER["co2"]),
    Col("co2_n", "CO2n", _NORM, lambda r: r.co2_n),
    Col("co2_run_g", "CO2 g/run", "gCO2e over the run's measured window", _extra("co2_run_g"),
        HIGHER_IS_BETTER["co2"], short="CO2\ng/run", text=_significant),
    Col("co2_per_1k_tokens_g", "CO2 g/1k tok",
        "gCO2e per 1,000 generated tokens (prompt tokens for loglikelihood)",
        _extra("co2_per_1k_tokens_g"), HIGHER_IS_BETTER["co2"], text=_significant),
    Col("co2_per_correct_g", "CO2 g/correct", "gCO2e per correct answer",
        _extra("co2_per_correct_g"), HIGHER_IS_BETTER["co2"], short="CO2 g\n/correct",
        text=_significant, md="CO2 (g/correct)"),
    Col("run_id", "Run", "the stored run behind the row", _extra("run_id")),
    Col("ttft_p50_ms", "TTFT p50 ms", "time to first token per sequence, median, ms (generate)",
        _extra("ttft_p50_ms"), False, digits=1, metric="ttft_p50_ms"),
    Col("ttft_p95_ms", "TTFT p95 ms", "time to first token per sequence, 95th percentile, ms",
        _extra("ttft_p95_ms"), False, digits=1, metric="ttft_p95_ms"),
    Col("itl_p50_ms", "ITL p50 ms",
        "inter-token latency per sequence (its decode time / its tokens after the first), "
        "median, ms", _extra("itl_p50_ms"), False, digits=2, metric="itl_p50_ms"),
    Col("itl_p95_ms", "ITL p95 ms", "inter-token latency per sequence, 95th percentile, ms",
        _extra("itl_p95_ms"), False, digits=2, metric="itl_p95_ms"),
    Col("engine", "Engine",
        "the engine that ran (fast, or plain when fast refused the model: engine_fallback)",
        _extra("engine"), metric="engine"),
    Col("engine_fallback", "Engine note", "why plain ran instead of the engine asked for",
        _extra("engine_fallback"), metric="engine_fallback"),
    Col("decode_step", "Decode step",
        "the fast engine's decode step: native or transformers (the model's forward), "
        "compiled or not; empty for plain", _extra("decode_step"), metric="decode_step"),
)  # fmt: skip
"""Every column, in the exports' order."""

BY_KEY: dict[str, Col] = {c.key: c for c in REGISTRY}
CARBON_KEYS = ("co2_run_g", "co2_per_1k_tokens_g", "co2_per_correct_g")
"""Columns shown only where some row has measured energy (absent on the CPU)."""
METRIC_COLUMNS: tuple[Col, ...] = tuple(c for c in REGISTRY if c.metric)
"""Columns read straight from the stored metrics (``build_per_inputs`` copies them)."""

# -- which columns each view shows, in order -----------------------------------------------------

RANK_TASK_VIEW: tuple[str, ...] = (
    "rank", "model", "per", "per_rel", "limiting", "accuracy", "acc_change", "throughput",
    "latency_ms",
    "memory_mb", *CARBON_KEYS, "acc_n", "thr_n", "lat_n", "mem_n", "pareto",
)  # fmt: skip
"""The console's table for one task ("rank" is by the score the view ranks by)."""
TABLE_VIEW: tuple[str, ...] = (
    "accuracy", "acc_change", "throughput", "latency_ms", "memory_mb", "energy_j", "co2_run_g",
)  # fmt: skip
"""The headless table's figures for one task, after rank, Pareto mark and model."""
TABLE_FACTORS_VIEW: tuple[str, ...] = ("co2_per_correct_g",)
"""... and, where the terminal is wide enough, these after them."""
MARKDOWN_VIEW: tuple[str, ...] = (
    "accuracy", "acc_change", "throughput", "latency_ms", "memory_mb", "energy_j", "co2_run_g",
    "co2_per_correct_g", "per", "per_rel", "limiting",
)  # fmt: skip
"""The Markdown export's columns for one task, after rank and model and before Pareto."""


def cell(col: Col, row: PerRow, unit: str | None) -> str:
    """``row``'s value of ``col`` as the headless and Markdown tables print it; ``unit`` is the
    task's common THR unit (None when mixed: then each throughput cell names its own)."""
    text = col.format(col.read(row))
    if col.key == "throughput" and unit is None and row.input.throughput_unit:
        text += f" {row.input.throughput_unit}"
    return text


def export_keys() -> tuple[str, ...]:
    """The CSV header and the keys of every JSON row, in order."""
    return tuple(c.key for c in REGISTRY)


def record(row: PerRow) -> dict[str, Any]:
    """One row as a flat dict with every registry key (``None`` where unknown)."""
    return {c.key: c.read(row) for c in REGISTRY}


def units() -> dict[str, str]:
    """What each exported number means, in which unit."""
    return {c.key: c.unit for c in REGISTRY}


def shown(keys: Sequence[str], rows: Sequence[PerRow]) -> list[Col]:
    """The columns of ``keys`` that hold something for ``rows``: CO2 only where energy was
    measured, energy only where PER used it, the accuracy change only beside a quantised run."""
    carbon = any(r.input.extra.get("co2_run_g") is not None for r in rows)
    energy = any(r.energy_n is not None for r in rows)
    out = []
    for key in keys:
        if key in CARBON_KEYS and not carbon:
            continue
        if key in ("energy_j", "energy_n") and not energy:
            continue
        if key == "acc_change" and all(r.input.extra.get(key) is None for r in rows):
            continue
        out.append(BY_KEY[key])
    return out
