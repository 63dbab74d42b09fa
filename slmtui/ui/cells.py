"""How numbers look in the console: units in the text, sparklines as characters. Textual-free."""

from __future__ import annotations

from collections.abc import Sequence

BARS = "▁▂▃▄▅▆▇█"


def num(value: object, digits: int = 1, unit: str = "") -> str:
    """'12.3 ms' for a number, '–' for anything else (a missing metric)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}" if unit else text


def duration(seconds: float | None) -> str:
    """'42s', '3m05s', '1h02m'; '–' when unknown."""
    if seconds is None:
        return "–"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def spark(values: Sequence[float], width: int = 12) -> str:
    """The last ``width`` values as bar characters scaled between their min and max."""
    points = list(values)[-width:]
    if not points:
        return ""
    lo, hi = min(points), max(points)
    if hi == lo:
        return BARS[3] * len(points)
    scale = (len(BARS) - 1) / (hi - lo)
    return "".join(BARS[int((v - lo) * scale)] for v in points)


def gpus_text(gpus: Sequence[int]) -> str:
    """'CPU', '1', '0,1' for a tuple of GPU counts."""
    return ",".join("CPU" if c == 0 else str(c) for c in gpus)


def where(gpus: int) -> str:
    return "CPU" if gpus == 0 else f"{gpus} GPU" + ("s" if gpus > 1 else "")
