"""Energy of a measured window, and energy per unit of work. Pure functions, no NVML.

Energy comes from NVML's total-energy counter (mJ since the driver loaded), read on each of the
run's GPUs at the start and end of a window, right after a CUDA synchronise. A delta that is zero
or negative (counter reset, or a window shorter than the counter's update period) is flagged and
stored as no number. Only where a device lacks the counter is energy integrated from sampled power
(labelled ``power_integral``): NVML's power reading updates about every 100 ms and lags, which
under-counts by about 10% on bursty work (DESIGN.md, GPU note 2).

GPU energy is per device, not per process: on a shared GPU it includes the other tenants' work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

EnergySource = Literal["nvml_counter", "power_integral"]


def counter_delta_j(
    start_mj: Sequence[int], end_mj: Sequence[int]
) -> tuple[float | None, list[float], str | None]:
    """Energy between two reads of the per-GPU counters: (total J, per-GPU J, flag).

    A GPU whose counter did not advance makes the total None and the flag says which and by how
    much; per-GPU deltas are still returned (in J) so the report shows what was read.
    """
    if len(start_mj) != len(end_mj):
        raise ValueError(f"{len(start_mj)} start reads but {len(end_mj)} end reads")
    per_gpu_j = [(end - start) / 1000 for start, end in zip(start_mj, end_mj, strict=True)]
    bad = [(i, delta) for i, delta in enumerate(per_gpu_j) if delta <= 0]
    if bad:
        where = ", ".join(f"GPU {i}: {delta:+.3f} J" for i, delta in bad)
        flag = (
            f"energy counter did not advance ({where}): counter reset or window shorter "
            "than its update period"
        )
        return None, per_gpu_j, flag
    return sum(per_gpu_j), per_gpu_j, None


class TimeIntegral:
    """Running trapezoid integral of a sampled quantity over time (e.g. W -> J).

    Points must come in time order; a ``None`` value is skipped (the next good point joins the
    previous good one). ``at`` gives the integral up to the last point, so a window's integral is
    the difference of two readings taken at its ends.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.first_t_s: float | None = None
        self._last: tuple[float, float] | None = None

    def add(self, t_s: float, value: float | None) -> None:
        if value is None:
            return
        if self.first_t_s is None:
            self.first_t_s = t_s
        if self._last is not None:
            t0, v0 = self._last
            if t_s > t0:
                self.total += (t_s - t0) * (v0 + value) / 2
        self._last = (t_s, value)

    @property
    def last_t_s(self) -> float | None:
        return None if self._last is None else self._last[0]

    @property
    def span_s(self) -> float:
        """Time covered by the integral so far (0 with fewer than two points)."""
        if self.first_t_s is None or self._last is None:
            return 0.0
        return self._last[0] - self.first_t_s


def energy_metrics(
    energy_j: float | None,
    tokens_out: int | None,
    n_samples: int | None,
    n_correct: float | None = None,
) -> dict[str, Any]:
    """Energy per generated token, per sample and per correct answer, in J.

    Each ratio is None when the energy is unknown (CPU, flagged window) or its count is not
    positive (a log-likelihood run generates no tokens; a run with no correct answer).
    """

    def per(count: float | None) -> float | None:
        if energy_j is None or count is None or count <= 0:
            return None
        return energy_j / count

    return {
        "energy_j": energy_j,
        "energy_per_token_j": per(tokens_out),
        "energy_per_sample_j": per(n_samples),
        "energy_per_correct_j": per(n_correct),
    }
