"""A bounded time series: samples merge into buckets of growing width so memory stays fixed.

Rates (utilisation, power) average within a bucket; memories keep the bucket's maximum, so a peak
is never smoothed away. Holding at most ``2 * max_points`` buckets, a run of any length costs the
same memory and :meth:`Series.export` returns at most ``max_points`` points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MEAN_FIELDS = ("util_pct", "power_w")
"""Averaged within a bucket (weighted by the samples that had a value)."""
MAX_FIELDS = ("process_mem_mb", "device_used_mb", "rss_mb")
"""Maximum within a bucket."""


@dataclass
class _Bucket:
    t_s: float
    """Time of the bucket's first sample, s since the sampler started."""
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def add(self, values: dict[str, float | None]) -> None:
        self.n += 1
        for name in MEAN_FIELDS:
            value = values.get(name)
            if value is not None:
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1
        for name in MAX_FIELDS:
            value = values.get(name)
            if value is not None:
                self.maxima[name] = max(self.maxima.get(name, value), value)

    def merge(self, other: _Bucket) -> None:
        self.n += other.n
        for name, total in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]
        for name, value in other.maxima.items():
            self.maxima[name] = max(self.maxima.get(name, value), value)

    def value(self, name: str) -> float | None:
        if name in MEAN_FIELDS:
            count = self.counts.get(name, 0)
            return self.sums[name] / count if count else None
        return self.maxima.get(name)


class Series:
    """Samples of the run's telemetry, downsampled to at most ``max_points``."""

    def __init__(self, max_points: int = 300) -> None:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.max_points = max_points
        self._buckets: list[_Bucket] = []
        self._width = 1
        """Samples per bucket before a new bucket opens."""

    def add(self, t_s: float, values: dict[str, float | None]) -> None:
        if not self._buckets or self._buckets[-1].n >= self._width:
            self._buckets.append(_Bucket(t_s=t_s))
            if len(self._buckets) > 2 * self.max_points:
                self._buckets = _halve(self._buckets)
                self._width *= 2
        self._buckets[-1].add(values)

    def __len__(self) -> int:
        return sum(b.n for b in self._buckets)

    def export(self) -> dict[str, list[float | None]]:
        """Columns ``t_s`` plus one per field, each at most ``max_points`` long."""
        buckets = list(self._buckets)
        while len(buckets) > self.max_points:
            buckets = _halve(buckets)
        out: dict[str, list[float | None]] = {"t_s": [round(b.t_s, 3) for b in buckets]}
        for name in MEAN_FIELDS + MAX_FIELDS:
            out[name] = [_round(b.value(name)) for b in buckets]
        return out


def _halve(buckets: list[_Bucket]) -> list[_Bucket]:
    merged: list[_Bucket] = []
    for i in range(0, len(buckets), 2):
        first = _Bucket(t_s=buckets[i].t_s)
        first.merge(buckets[i])
        if i + 1 < len(buckets):
            first.merge(buckets[i + 1])
        merged.append(first)
    return merged


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
