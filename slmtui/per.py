"""The Performance-Efficiency Ratio (PER): one number that ranks models by accuracy and cost. Pure.

Definition (the study's, DESIGN.md)::

    PER = (ACCn · THRn · LATn · MEMn) ^ (1/4)

Each factor is its metric min-max normalised to [0, 1] over the models compared on the same task:
higher-is-better metrics (accuracy, throughput) as ``(x - min) / (max - min)``, lower-is-better
metrics (latency, memory, energy) as ``1 - (x - min) / (max - min)``. Rows are grouped by task;
PER never compares across tasks.

Beyond the study (all off by default, so default numbers match the paper):

- ``energy=True``: energy is a fifth, lower-is-better factor; every row must then carry it.
- ``weights``: a weighted geometric mean ``(prod x_i ^ w_i) ^ (1 / sum w_i)`` with weights named
  by factor (``accuracy``, ``throughput``, ``latency``, ``memory``, ``energy``); missing names
  weigh 1, a weight of 0 drops the factor (from PER and from the Pareto test).
- ``log_scale=True``: the cost metrics (throughput, latency, memory, energy) are normalised on
  ``log10(x)``, for sets that span orders of magnitude (0.5B next to 72B). Accuracy stays linear.
  Cost values must then be > 0.

Edge cases, defined:

- A metric with ``max == min`` over the task's rows gives every row 1.0 on that factor: it holds
  no information to separate them, so it penalises no one. Hence a task with a single model gives
  that model PER 1.0.
- A factor of 0 makes PER 0. The worst model on any (weighted) factor therefore gets PER 0. That
  is the study's formula, kept as is: PER ranks within the set, it is not an absolute score.
- PER is relative to the set: add or remove a model and every PER in that task can change.

The Pareto flag is absolute, not normalised: a row is on the front when no other row of its task
is at least as good on every factor in play and strictly better on one (raw metrics compared).
Rank is 1 for the highest PER in a task; equal PER shares a rank ("1, 1, 3").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from slmtui.errors import UserError, allowed_list, did_you_mean

FACTORS: tuple[str, ...] = ("accuracy", "throughput", "latency", "memory", "energy")
"""Factor names, as weights and exports name them."""

_HIGHER_IS_BETTER = {
    "accuracy": True,
    "throughput": True,
    "latency": False,
    "memory": False,
    "energy": False,
}
_FIELD = {
    "accuracy": "accuracy",
    "throughput": "throughput",
    "latency": "latency_ms",
    "memory": "memory_mb",
    "energy": "energy_j",
}
_LOG_FACTORS = frozenset({"throughput", "latency", "memory", "energy"})


@dataclass(frozen=True)
class PerInput:
    """One model's measurements on one task.

    Any consistent units work (normalisation is scale-free), but every row of a task must use
    the same ones.
    """

    model: str
    task: str
    accuracy: float
    """The task's primary metric (0..1, or any consistent scale)."""
    throughput: float
    """THR per GPU: tokens/s (generate) or samples/s (loglikelihood)."""
    latency_ms: float
    """LAT: ms per generated token or per sample."""
    memory_mb: float
    """MEM: peak memory of the run in MB."""
    energy_j: float | None = None
    """Energy per unit of work in J (per token or per sample, like THR); only used with energy."""
    key: str | None = None
    """The caller's identity for the row (a run id, a CSV line); carried through untouched."""
    throughput_unit: str | None = None
    """"tokens/s" or "samples/s" when known; for display only."""


@dataclass(frozen=True)
class PerRow:
    """A PerInput with its normalised factors, PER, Pareto flag and rank within its task."""

    input: PerInput
    acc_n: float
    thr_n: float
    lat_n: float
    mem_n: float
    energy_n: float | None
    """``None`` unless PER was computed with energy."""
    per: float
    pareto: bool
    rank: int

    @property
    def model(self) -> str:
        return self.input.model

    @property
    def task(self) -> str:
        return self.input.task

    def factors(self) -> dict[str, float | None]:
        """Normalised factors by name (``energy`` is ``None`` when not in play)."""
        return {
            "accuracy": self.acc_n,
            "throughput": self.thr_n,
            "latency": self.lat_n,
            "memory": self.mem_n,
            "energy": self.energy_n,
        }


def compute_per(
    rows: Iterable[PerInput],
    *,
    energy: bool = False,
    weights: Mapping[str, float] | None = None,
    log_scale: bool = False,
) -> list[PerRow]:
    """PER for every row, computed within each task (see the module docstring).

    Returns rows grouped by task (in order of first appearance), best rank first, ties in input
    order. Raises UserError for a missing energy value, a negative or non-finite metric, a
    non-positive cost under ``log_scale``, or bad weights.
    """
    rows = list(rows)
    factor_weights = _factor_weights(weights, energy=energy)
    active = [f for f, w in factor_weights.items() if w > 0]
    for row in rows:
        _check_row(row, factor_weights, log_scale=log_scale)

    by_task: dict[str, list[PerInput]] = {}
    for row in rows:
        by_task.setdefault(row.task, []).append(row)

    out: list[PerRow] = []
    for task_rows in by_task.values():
        out.extend(_task_per(task_rows, factor_weights, active, energy=energy, log_scale=log_scale))
    return out


def _factor_weights(weights: Mapping[str, float] | None, *, energy: bool) -> dict[str, float]:
    in_play = FACTORS if energy else FACTORS[:-1]
    result = dict.fromkeys(in_play, 1.0)
    for name, weight in (weights or {}).items():
        if name not in FACTORS:
            raise UserError(
                f"PER weight for unknown factor '{name}'{did_you_mean(name, FACTORS)}; "
                f"allowed: {allowed_list(FACTORS)}"
            )
        if name not in result:
            raise UserError(
                "PER weight for 'energy' given but energy is not a factor; turn energy on to use it"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise UserError(f"PER weight for '{name}' must be a number >= 0, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"PER weight for '{name}' must be a number >= 0, got {weight!r}")
        result[name] = float(weight)
    if sum(result.values()) <= 0:
        raise UserError("PER weights are all 0; at least one factor needs a weight > 0")
    return result


def _check_row(row: PerInput, factor_weights: Mapping[str, float], *, log_scale: bool) -> None:
    for factor in factor_weights:
        field = _FIELD[factor]
        value = getattr(row, field)
        where = f"model '{row.model}' on task '{row.task}'"
        if value is None:
            if factor == "energy":
                raise UserError(
                    f"{where} has no energy_j; PER with energy needs it for every model "
                    "(energy is not measured on CPU)"
                )
            raise UserError(f"{where} has no {field}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: {field} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: {field} must be a finite number >= 0, got {value!r}")
        if log_scale and factor in _LOG_FACTORS and value <= 0:
            raise UserError(f"{where}: {field} must be > 0 for log-scale PER, got {value!r}")


def _normalise(values: Sequence[float], *, higher_is_better: bool, log: bool) -> list[float]:
    xs = [math.log10(v) for v in values] if log else list(values)
    lo, hi = min(xs), max(xs)
    if hi == lo:
        return [1.0] * len(xs)
    span = hi - lo
    scaled = [(x - lo) / span for x in xs]
    return scaled if higher_is_better else [1.0 - s for s in scaled]


def _geometric_mean(factors: Mapping[str, float], weights: Mapping[str, float]) -> float:
    total = sum(weights[f] for f in factors)
    if any(factors[f] == 0.0 and weights[f] > 0 for f in factors):
        return 0.0
    return math.prod(factors[f] ** (weights[f] / total) for f in factors if weights[f] > 0)


def _dominates(a: PerInput, b: PerInput, active: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every active factor and better on one."""
    strictly = False
    for factor in active:
        x, y = getattr(a, _FIELD[factor]), getattr(b, _FIELD[factor])
        if not _HIGHER_IS_BETTER[factor]:
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            strictly = True
    return strictly


def _task_per(
    rows: list[PerInput],
    factor_weights: Mapping[str, float],
    active: Sequence[str],
    *,
    energy: bool,
    log_scale: bool,
) -> list[PerRow]:
    normalised = {
        factor: _normalise(
            [getattr(r, _FIELD[factor]) for r in rows],
            higher_is_better=_HIGHER_IS_BETTER[factor],
            log=log_scale and factor in _LOG_FACTORS,
        )
        for factor in factor_weights
    }
    pers = [
        _geometric_mean({f: normalised[f][i] for f in factor_weights}, factor_weights)
        for i in range(len(rows))
    ]
    order = sorted(range(len(rows)), key=lambda i: -pers[i])
    ranks: dict[int, int] = {}
    for position, i in enumerate(order):
        previous = order[position - 1] if position else None
        same = previous is not None and pers[previous] == pers[i]
        ranks[i] = ranks[previous] if same and previous is not None else position + 1
    return [
        PerRow(
            input=rows[i],
            acc_n=normalised["accuracy"][i],
            thr_n=normalised["throughput"][i],
            lat_n=normalised["latency"][i],
            mem_n=normalised["memory"][i],
            energy_n=normalised["energy"][i] if energy else None,
            per=pers[i],
            pareto=not any(
                _dominates(other, rows[i], active) for j, other in enumerate(rows) if j != i
            ),
            rank=ranks[i],
        )
        for i in order
    ]


@dataclass(frozen=True)
class ModelSummary:
    """One model across the tasks of a PER computation (the overview table's row)."""

    model: str
    mean_per: float
    """Mean PER over the tasks this model has a row in."""
    per_by_task: dict[str, float]
    pareto_tasks: int
    """Tasks where the model is on the Pareto front."""

    @property
    def tasks(self) -> int:
        return len(self.per_by_task)


def summarise_models(rows: Iterable[PerRow]) -> list[ModelSummary]:
    """Mean PER per model over its tasks, best first (ties by name).

    Each task's PER is relative to that task's set, so a mean over different task sets compares
    models only roughly; ``tasks`` says how many tasks each mean covers.
    """
    per_by_model: dict[str, dict[str, float]] = {}
    pareto: dict[str, int] = {}
    for row in rows:
        per_by_model.setdefault(row.model, {})[row.task] = row.per
        pareto[row.model] = pareto.get(row.model, 0) + int(row.pareto)
    summaries = [
        ModelSummary(
            model=model,
            mean_per=sum(pers.values()) / len(pers),
            per_by_task=pers,
            pareto_tasks=pareto[model],
        )
        for model, pers in per_by_model.items()
    ]
    return sorted(summaries, key=lambda s: (-s.mean_per, s.model))
