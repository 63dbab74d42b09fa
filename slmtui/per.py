"""The Performance-Efficiency Ratio (PER): one number that ranks models by accuracy and cost. Pure.

Definition (the study's, DESIGN.md)::

    PER = (ACCn · THRn · LATn · MEMn) ^ (1/4)

Each factor is its metric min-max normalised to [0, 1] over the models compared on the same task:
higher-is-better metrics (accuracy, throughput) as ``(x - min) / (max - min)``, lower-is-better
metrics (latency, memory, energy) as ``1 - (x - min) / (max - min)``. Rows are grouped by task;
PER never compares across tasks.

Beyond the study (all off by default, so default numbers match the paper):

- ``energy=True``: energy is a fifth, lower-is-better factor; every row must then carry it.
- ``co2=True``: grams CO2e per unit of work (``co2_g``) is a further lower-is-better factor. With
  one grid intensity for every row it is energy times a constant, so it normalises exactly as
  energy does; it differs only when rows were measured on grids of different intensity.
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

PER-rel, the companion for small sets (two or three models), is computed beside PER on every
row. Each factor is a ratio to the best row of the task: ``x / max`` for accuracy and
throughput, ``min / x`` for latency, memory, energy and CO2. The same weighted geometric mean
combines them. So a row best on every factor gets 1.0, a row is 0 only when it scores exactly 0
on accuracy (or throughput) while another row scores more, or when another row's cost is exactly
0 (a cost of 0 is the best, and nothing divides by it), and adding a dominated row changes
no other row's PER-rel (the best values stay the same). ``log_scale`` does not apply to it:
ratios are already free of scale. ``rank_by="per_rel"`` orders and ranks rows by it; both
ranks are always filled (``rank`` and ``rank_rel``).

The study's PER is 0 for a row worst on any factor: with two models, each usually worst on
something, both get 0. That is why PER-rel exists; ``lead`` says which factor decides.

The Pareto flag is absolute, not normalised: a row is on the front when no other row of its task
is at least as good on every factor in play and strictly better on one (raw metrics compared).
Rank is 1 for the highest PER in a task; equal PER shares a rank ("1, 1, 3").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slmtui.errors import UserError, allowed_list, did_you_mean

FACTORS: tuple[str, ...] = ("accuracy", "throughput", "latency", "memory", "energy", "co2")
"""Factor names, as weights and exports name them."""
BASE_FACTORS: tuple[str, ...] = FACTORS[:4]
"""The study's four factors."""
RANK_BY: tuple[str, ...] = ("per", "per_rel")
"""Scores that can order and rank rows: the study's PER, or PER-rel (ratios to the best)."""
SCORE_LABELS = {"per": "PER", "per_rel": "PER-rel"}
SMALL_SET = 4
"""Fewer models than this on every task is a small set: ``automatic_rank_by`` picks PER-rel."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "throughput": True,
    "latency": False,
    "memory": False,
    "energy": False,
    "co2": False,
}
"""Which end of each factor is best: the one direction every view and export reads."""
_FIELD = {
    "accuracy": "accuracy",
    "throughput": "throughput",
    "latency": "latency_ms",
    "memory": "memory_mb",
    "energy": "energy_j",
    "co2": "co2_g",
}
_LOG_FACTORS = frozenset({"throughput", "latency", "memory", "energy", "co2"})


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
    co2_g: float | None = None
    """Grams CO2e per unit of work (like ``energy_j``); only used with co2."""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Figures carried for display and export, untouched by PER (``co2_run_g``, ...)."""


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
    co2_n: float | None = None
    """``None`` unless PER was computed with co2."""
    ratios: Mapping[str, float] = field(default_factory=dict, hash=False)
    """PER-rel's factors by name: each metric as a ratio to the task's best (1.0 = best)."""
    per_rel: float = 0.0
    """PER-rel: the weighted geometric mean of ``ratios``."""
    rank_rel: int = 1
    """Rank by PER-rel within the task."""
    weights: Mapping[str, float] = field(default_factory=dict, hash=False)
    """The weight of each factor in play (0 drops it)."""

    def score(self, by: str = "per") -> float:
        """PER (``by="per"``) or PER-rel (``by="per_rel"``)."""
        return self.per_rel if by == "per_rel" else self.per

    def rank_by(self, by: str = "per") -> int:
        return self.rank_rel if by == "per_rel" else self.rank

    @property
    def limiting(self) -> str | None:
        """The factor furthest from the task's best (lowest ratio); ``None`` when best on all."""
        weighted = [(r, f) for f, r in self.ratios.items() if self.weights.get(f, 0) > 0]
        if not weighted:
            return None
        ratio, factor = min(weighted, key=lambda rf: (rf[0], FACTORS.index(rf[1])))
        return factor if ratio < 1.0 else None

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
            "co2": self.co2_n,
        }


def compute_per(
    rows: Iterable[PerInput],
    *,
    energy: bool = False,
    weights: Mapping[str, float] | None = None,
    log_scale: bool = False,
    co2: bool = False,
    rank_by: str = "per",
) -> list[PerRow]:
    """PER and PER-rel for every row, computed within each task (see the module docstring).

    Returns rows grouped by task (in order of first appearance), best first by ``rank_by``
    ("per" or "per_rel"), ties in input order. Raises UserError for a missing energy or CO2
    value, a negative or non-finite metric, a non-positive cost under ``log_scale``, bad
    weights or an unknown ``rank_by``.
    """
    rows = list(rows)
    if rank_by not in RANK_BY:
        raise UserError(
            f"rank by '{rank_by}'{did_you_mean(rank_by, RANK_BY)}; allowed: {allowed_list(RANK_BY)}"
        )
    factor_weights = _factor_weights(weights, energy=energy, co2=co2)
    active = [f for f, w in factor_weights.items() if w > 0]
    for row in rows:
        _check_row(row, factor_weights, log_scale=log_scale)

    by_task: dict[str, list[PerInput]] = {}
    for row in rows:
        by_task.setdefault(row.task, []).append(row)

    out: list[PerRow] = []
    for task_rows in by_task.values():
        out.extend(
            _task_per(task_rows, factor_weights, active, log_scale=log_scale, rank_by=rank_by)
        )
    return out


def _factor_weights(
    weights: Mapping[str, float] | None, *, energy: bool, co2: bool = False
) -> dict[str, float]:
    in_play = [*BASE_FACTORS, *(["energy"] if energy else []), *(["co2"] if co2 else [])]
    result = dict.fromkeys(in_play, 1.0)
    for name, weight in (weights or {}).items():
        if name not in FACTORS:
            raise UserError(
                f"PER weight for unknown factor '{name}'{did_you_mean(name, FACTORS)}; "
                f"allowed: {allowed_list(FACTORS)}"
            )
        if name not in result:
            raise UserError(
                f"PER weight for '{name}' given but {name} is not a factor; "
                f"turn {name} on to use it"
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
            if factor == "co2":
                raise UserError(
                    f"{where} has no CO2 figure; PER with co2 needs measured energy for every "
                    "model (energy is not measured on CPU)"
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
        if not HIGHER_IS_BETTER[factor]:
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            strictly = True
    return strictly


def _ratios(values: Sequence[float], *, higher_is_better: bool) -> list[float]:
    """Each value as a ratio to the best: ``x / max`` (higher is better) or ``min / x``."""
    if higher_is_better:
        best = max(values)
        return [1.0 if best == 0 else x / best for x in values]
    best = min(values)
    return [1.0 if x == best else best / x for x in values]


def _ranks(scores: Sequence[float]) -> tuple[list[int], dict[int, int]]:
    """Order (best first, ties in input order) and rank per index ("1, 1, 3")."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks: dict[int, int] = {}
    for position, i in enumerate(order):
        previous = order[position - 1] if position else None
        same = previous is not None and scores[previous] == scores[i]
        ranks[i] = ranks[previous] if same and previous is not None else position + 1
    return order, ranks


def _task_per(
    rows: list[PerInput],
    factor_weights: Mapping[str, float],
    active: Sequence[str],
    *,
    log_scale: bool,
    rank_by: str,
) -> list[PerRow]:
    values = {f: [getattr(r, _FIELD[f]) for r in rows] for f in factor_weights}
    normalised = {
        f: _normalise(
            values[f], higher_is_better=HIGHER_IS_BETTER[f], log=log_scale and f in _LOG_FACTORS
        )
        for f in factor_weights
    }
    ratios = {f: _ratios(values[f], higher_is_better=HIGHER_IS_BETTER[f]) for f in factor_weights}
    pers = [
        _geometric_mean({f: normalised[f][i] for f in factor_weights}, factor_weights)
        for i in range(len(rows))
    ]
    rels = [
        _geometric_mean({f: ratios[f][i] for f in factor_weights}, factor_weights)
        for i in range(len(rows))
    ]
    order, ranks = _ranks(pers)
    order_rel, ranks_rel = _ranks(rels)
    return [
        PerRow(
            input=rows[i],
            acc_n=normalised["accuracy"][i],
            thr_n=normalised["throughput"][i],
            lat_n=normalised["latency"][i],
            mem_n=normalised["memory"][i],
            energy_n=normalised["energy"][i] if "energy" in normalised else None,
            co2_n=normalised["co2"][i] if "co2" in normalised else None,
            per=pers[i],
            pareto=not any(
                _dominates(other, rows[i], active) for j, other in enumerate(rows) if j != i
            ),
            rank=ranks[i],
            ratios={f: ratios[f][i] for f in factor_weights},
            per_rel=rels[i],
            rank_rel=ranks_rel[i],
            weights=dict(factor_weights),
        )
        for i in (order_rel if rank_by == "per_rel" else order)
    ]


@dataclass(frozen=True)
class Lead:
    """Why the first row of a task is ahead of the second: the factor that decides."""

    leader: PerRow
    runner_up: PerRow
    factor: str | None
    """The factor that adds most to the leader's PER-rel over the runner-up's (``None``: tie)."""
    factor_ratio: float
    """Leader's metric over the runner-up's on that factor, oriented so > 1 favours the leader
    (for a cost, the runner-up's value over the leader's)."""
    score_ratio: float
    """Leader's PER-rel over the runner-up's (inf when the runner-up's is 0)."""

    def sentence(self) -> str:
        """ "By PER-rel, alpha leads beta: throughput decides (2.00× better; ...)"."""
        a, b = self.leader.model, self.runner_up.model
        if self.factor is None:
            return f"{a} and {b} tie on every factor"
        times = "∞" if math.isinf(self.score_ratio) else f"{self.score_ratio:.2f}×"
        factor = "∞" if math.isinf(self.factor_ratio) else f"{self.factor_ratio:.2f}×"
        return (
            f"By PER-rel, {a} leads {b}: {self.factor} decides ({factor} better; "
            f"PER-rel {times} {b}'s)"
        )


def automatic_rank_by(inputs: Iterable[PerInput]) -> str:
    """The score a view ranks by when the user has not chosen: "per_rel" for a small set (fewer
    than ``SMALL_SET`` models on every task, where the study's PER gives 0 to any model worst on
    one factor and so usually ranks nothing), else the study's "per"."""
    counts: dict[str, set[str]] = {}
    for given in inputs:
        counts.setdefault(given.task, set()).add(given.model)
    if counts and max(len(models) for models in counts.values()) < SMALL_SET:
        return "per_rel"
    return "per"


def automatic_rank_reason(by: str) -> str:
    """Why ``automatic_rank_by`` chose ``by``, as the views say it after the score's name."""
    if by == "per_rel":
        return f"automatic: fewer than {SMALL_SET} models per task"
    return f"automatic: {SMALL_SET} or more models on a task"


def lead(task_rows: Sequence[PerRow]) -> Lead | None:
    """Which factor decides between the two best rows of one task by PER-rel (None: < 2 rows).

    PER-rel is a product of ratios, so ``log(PER-rel_a / PER-rel_b)`` is the weighted sum of the
    factors' log ratios; the factor with the largest share in the leader's favour decides. (The
    study's PER cannot say this: with two models both are often 0.)
    """
    ranked = sorted(task_rows, key=lambda r: (r.rank_rel, task_rows.index(r)))
    if len(ranked) < 2:
        return None
    a, b = ranked[0], ranked[1]
    total = sum(w for w in a.weights.values() if w > 0) or 1.0
    shares: list[tuple[float, str]] = []
    for f, w in a.weights.items():
        ra, rb = a.ratios.get(f, 1.0), b.ratios.get(f, 1.0)
        if w <= 0 or ra <= 0 or rb <= 0:
            share = math.inf if rb == 0 < ra else (-math.inf if ra == 0 < rb else 0.0)
        else:
            share = w / total * math.log(ra / rb)
        shares.append((share, f))
    share, factor = max(shares, key=lambda sf: (sf[0], -FACTORS.index(sf[1])))
    ra, rb = a.ratios.get(factor, 1.0), b.ratios.get(factor, 1.0)
    return Lead(
        leader=a,
        runner_up=b,
        factor=None if all(s == 0 for s, _ in shares) else factor,
        factor_ratio=math.inf if rb == 0 else ra / rb,
        score_ratio=math.inf if b.per_rel == 0 else a.per_rel / b.per_rel,
    )


@dataclass(frozen=True)
class ModelSummary:
    """One model across the tasks of a PER computation (the overview table's row)."""

    model: str
    mean_per: float
    """Mean PER over the tasks this model has a row in."""
    per_by_task: dict[str, float]
    pareto_tasks: int
    """Tasks where the model is on the Pareto front."""
    mean_per_rel: float = 0.0
    """Mean PER-rel over the same tasks."""
    per_rel_by_task: dict[str, float] = field(default_factory=dict)

    def mean(self, by: str = "per") -> float:
        return self.mean_per_rel if by == "per_rel" else self.mean_per

    def by_task(self, by: str = "per") -> dict[str, float]:
        return self.per_rel_by_task if by == "per_rel" else self.per_by_task

    @property
    def tasks(self) -> int:
        return len(self.per_by_task)


def summarise_models(rows: Iterable[PerRow], by: str = "per") -> list[ModelSummary]:
    """Mean PER and PER-rel per model over its tasks, best first by ``by`` (ties by name).

    Each task's PER is relative to that task's set, so a mean over different task sets compares
    models only roughly; ``tasks`` says how many tasks each mean covers.
    """
    per_by_model: dict[str, dict[str, float]] = {}
    rel_by_model: dict[str, dict[str, float]] = {}
    pareto: dict[str, int] = {}
    for row in rows:
        per_by_model.setdefault(row.model, {})[row.task] = row.per
        rel_by_model.setdefault(row.model, {})[row.task] = row.per_rel
        pareto[row.model] = pareto.get(row.model, 0) + int(row.pareto)
    summaries = [
        ModelSummary(
            model=model,
            mean_per=sum(pers.values()) / len(pers),
            per_by_task=pers,
            pareto_tasks=pareto[model],
            mean_per_rel=sum(rel_by_model[model].values()) / len(pers),
            per_rel_by_task=rel_by_model[model],
        )
        for model, pers in per_by_model.items()
    ]
    return sorted(summaries, key=lambda s: (-s.mean(by), s.model))
