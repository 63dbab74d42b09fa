"""Plots of PER rows: per task, accuracy against throughput (and against energy per correct
answer where energy was measured) with the Pareto front marked; a bar chart of the overview.

One description of each chart (``Chart``), drawn three ways:

- ``chart_text``: rich Text for a terminal (a braille front line, lettered points, a legend);
  the console's plot view and nothing else use it. rich only, no plotting library.
- ``chart_svg``: an SVG document, written with the stdlib (no dependency).
- ``write_plots(..., png)``: PNG files through matplotlib when it is installed (optional: without
  it, SVG only and a one-line note).

The 2-D Pareto front here is the chart's: a point is on it when no other point is at least as
good on both axes and better on one (so it can differ from PER's four-factor front).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.text import Text

from slmtui.errors import UserError
from slmtui.per import SCORE_LABELS, PerRow, summarise_models

PLOT_SUFFIXES = (".svg", ".png")


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    front: bool = False


@dataclass(frozen=True)
class Chart:
    """A scatter (``points``) or a bar chart (``bars``), with what its axes mean."""

    title: str
    x_label: str
    y_label: str
    points: tuple[Point, ...] = ()
    bars: tuple[tuple[str, float], ...] = ()
    x_higher_is_better: bool = True
    x_log: bool = False
    """Throughput and energy can span orders of magnitude: drawn on log10 beyond 50x."""
    name: str = "chart"
    """File stem when written to a folder."""
    notes: tuple[str, ...] = field(default=())

    @property
    def is_bars(self) -> bool:
        return bool(self.bars)


# -- what to plot ---------------------------------------------------------------------------------


def front_2d(xs: Sequence[float], ys: Sequence[float], *, x_higher: bool) -> list[bool]:
    """Per point: whether no other point is at least as good on x and y and better on one."""
    sign = 1.0 if x_higher else -1.0
    out = []
    for i in range(len(xs)):
        xi, yi = sign * xs[i], ys[i]
        dominated = any(
            sign * xs[j] >= xi and ys[j] >= yi and (sign * xs[j] > xi or ys[j] > yi)
            for j in range(len(xs))
            if j != i
        )
        out.append(not dominated)
    return out


def _scatter(
    task: str, rows: Sequence[PerRow], xs: list[float], *, x_label: str, x_higher: bool, name: str
) -> Chart:
    ys = [r.input.accuracy for r in rows]
    front = front_2d(xs, ys, x_higher=x_higher)
    positive = [x for x in xs if x > 0]
    log = len(positive) == len(xs) and len(xs) > 1 and max(xs) / min(xs) > 50
    return Chart(
        title=f"{task}: accuracy against {x_label.split(' (')[0]}",
        x_label=x_label + (" (log scale)" if log else ""),
        y_label="accuracy",
        points=tuple(
            Point(r.model, x, y, f) for r, x, y, f in zip(rows, xs, ys, front, strict=True)
        ),
        x_higher_is_better=x_higher,
        x_log=log,
        name=name,
    )


def task_charts(task: str, rows: Sequence[PerRow]) -> list[Chart]:
    """Accuracy against throughput; against energy per correct answer when >= 2 rows have it."""
    units = {r.input.throughput_unit for r in rows}
    unit = units.pop() if len(units) == 1 else None
    stem = _file_stem(task)
    charts = [
        _scatter(
            task,
            rows,
            [r.input.throughput for r in rows],
            x_label=f"throughput per GPU ({unit})" if unit else "throughput per GPU",
            x_higher=True,
            name=f"{stem}-throughput",
        )
    ]
    measured = [r for r in rows if _energy_per_correct(r) is not None]
    if len(measured) >= 2:
        chart = _scatter(
            task,
            measured,
            [_energy_per_correct(r) or 0.0 for r in measured],
            x_label="energy per correct answer (J)",
            x_higher=False,
            name=f"{stem}-energy",
        )
        left_out = len(rows) - len(measured)
        if left_out:
            note = f"{left_out} model{'s' * (left_out != 1)} without measured energy left out"
            chart = replace(chart, notes=(note,))
        charts.append(chart)
    return charts


def _energy_per_correct(row: PerRow) -> float | None:
    value = row.input.extra.get("energy_per_correct_j")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def overview_chart(rows: Sequence[PerRow], by: str = "per") -> Chart:
    """Mean PER (or PER-rel) per model over its tasks, best first."""
    label = SCORE_LABELS[by]
    return Chart(
        title=f"Mean {label} per model across tasks",
        x_label=f"mean {label}",
        y_label="model",
        bars=tuple((s.model, s.mean(by)) for s in summarise_models(rows, by)),
        name="overview",
    )


def all_charts(rows: Sequence[PerRow], by: str = "per") -> list[Chart]:
    """The overview bar chart, then each task's scatters."""
    from slmtui.reports.export import group_by_task

    charts = [overview_chart(rows, by)]
    for task, task_rows in group_by_task(rows).items():
        charts += task_charts(task, task_rows)
    return charts


def _file_stem(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", task).strip("-") or "task"


# -- scales ---------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    return ticks


@dataclass(frozen=True)
class _Axis:
    lo: float
    hi: float
    log: bool

    @classmethod
    def of(cls, values: Sequence[float], *, log: bool, floor_zero: bool = False) -> _Axis:
        vs = [math.log10(v) for v in values] if log else list(values)
        lo, hi = min(vs), max(vs)
        if floor_zero and not log:
            lo = min(lo, 0.0)
        if hi == lo:
            pad = abs(hi) * 0.1 or 0.5
            lo, hi = lo - pad, hi + pad
        pad = (hi - lo) * 0.06
        return cls(lo - pad if not (floor_zero and lo == 0) else lo, hi + pad, log)

    def fraction(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return (v - self.lo) / (self.hi - self.lo)

    def ticks(self, count: int = 5) -> list[float]:
        if self.log:
            lo, hi = math.floor(self.lo), math.ceil(self.hi)
            return [10.0**k for k in range(lo, hi + 1) if self.lo <= k <= self.hi] or [
                10**self.lo,
                10**self.hi,
            ]
        return [t for t in nice_ticks(self.lo, self.hi, count) if self.lo <= t <= self.hi]


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10_000 or magnitude < 0.01:
        return f"{value:.1e}".replace("e+0", "e").replace("e-0", "e-")
    if magnitude >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


# -- terminal -------------------------------------------------------------------------------------

_BRAILLE_BASE = 0x2800
_DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
"""Braille dot bit for (row 0..3, column 0..1) within one character cell."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FRONT_STYLE = "bold green"
POINT_STYLE = "yellow"
PARTIAL_BLOCKS = " ▏▎▍▌▋▊▉█"


def chart_text(chart: Chart, width: int, height: int) -> Text:
    """The chart in ``width`` x ``height`` terminal cells (a legend included); lines longer
    than ``width`` end in an ellipsis, lines beyond ``height`` are dropped."""
    text = (
        _bars_text(chart, width, height) if chart.is_bars else _scatter_text(chart, width, height)
    )
    lines = text.split("\n")[:height]
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return Text("\n").join(lines)


def _scatter_text(chart: Chart, width: int, height: int) -> Text:
    points = chart.points
    out = Text()
    out.append(chart.title + "\n", style="bold")
    if not points:
        out.append("(nothing to plot)", style="dim")
        return out
    legend_rows = len(points) + 1 + len(chart.notes)
    plot_h = max(4, height - legend_rows - 4)
    y_count = max(4, plot_h // 2)
    y_labels = [format_tick(t) for t in _Axis.of([p.y for p in points], log=False).ticks(y_count)]
    gutter = max(len(s) for s in y_labels) + 1
    plot_w = max(10, width - gutter - 1)
    xa = _Axis.of([p.x for p in points], log=chart.x_log)
    ya = _Axis.of([p.y for p in points], log=False)

    dots = [[0] * plot_w for _ in range(plot_h)]

    def dot_xy(p: Point) -> tuple[int, int]:
        dx = round(xa.fraction(p.x) * (plot_w * 2 - 1))
        dy = round((1 - ya.fraction(p.y)) * (plot_h * 4 - 1))
        return dx, dy

    def set_dot(dx: int, dy: int) -> None:
        if 0 <= dx < plot_w * 2 and 0 <= dy < plot_h * 4:
            dots[dy // 4][dx // 2] |= _DOT[dy % 4][dx % 2]

    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    for a, b in itertools.pairwise(front):
        (x0, y0), (x1, y1) = dot_xy(a), dot_xy(b)
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(steps + 1):
            set_dot(round(x0 + (x1 - x0) * k / steps), round(y0 + (y1 - y0) * k / steps))

    marks: dict[tuple[int, int], tuple[str, str]] = {}
    for n, p in enumerate(points):
        dx, dy = dot_xy(p)
        cell = (dy // 4, min(dx // 2, plot_w - 1))
        letter = LETTERS[n % len(LETTERS)]
        if cell in marks:
            letter = "+"  # points sharing a cell
        marks[cell] = (letter, FRONT_STYLE if p.front else POINT_STYLE)

    tick_rows = {round((1 - ya.fraction(t)) * (plot_h - 1)): t for t in ya.ticks(y_count)}
    for r in range(plot_h):
        label = format_tick(tick_rows[r]) if r in tick_rows else ""
        out.append(label.rjust(gutter - 1) + " ┤" if label else " " * gutter + "│", style="dim")
        for c in range(plot_w):
            if (r, c) in marks:
                letter, style = marks[r, c]
                out.append(letter, style=style)
            elif dots[r][c]:
                out.append(chr(_BRAILLE_BASE + dots[r][c]), style="green")
            else:
                out.append(" ")
        out.append("\n")
    out.append(" " * gutter + "└" + "─" * plot_w + "\n", style="dim")
    axis = [" "] * plot_w
    for t in xa.ticks(max(3, plot_w // 10)):
        text = format_tick(t)
        at = round(xa.fraction(t) * (plot_w - 1)) - len(text) // 2
        at = max(0, min(plot_w - len(text), at))
        if all(ch == " " for ch in axis[max(0, at - 1) : at + len(text) + 1]):
            axis[at : at + len(text)] = list(text)
    out.append(" " * (gutter + 1) + "".join(axis) + "\n", style="dim")
    better = "→ better" if chart.x_higher_is_better else "← better"
    out.append(f"x: {chart.x_label}, {better} · y: accuracy, ↑ better\n", style="dim")
    for n, p in enumerate(points):
        out.append(f"{LETTERS[n % len(LETTERS)]} ", style=FRONT_STYLE if p.front else POINT_STYLE)
        out.append("◆ " if p.front else "  ", style="green")
        out.append(f"{p.label}  acc {p.y:.3f} · {format_tick(p.x)}\n")
    for note in chart.notes:
        out.append(note + "\n", style="dim")
    out.append("◆ on this chart's Pareto front (joined by the green line)", style="dim")
    return out


def _bars_text(chart: Chart, width: int, height: int) -> Text:
    out = Text()
    out.append(chart.title + "\n", style="bold")
    bars = chart.bars[: max(1, height - 2)]
    if not bars:
        out.append("(nothing to plot)", style="dim")
        return out
    name_w = min(32, max(len(name) for name, _ in bars))
    bar_w = max(5, width - name_w - 9)
    top = max((v for _, v in bars), default=1.0) or 1.0
    for n, (name, value) in enumerate(bars):
        eighths = round(max(value, 0.0) / top * bar_w * 8)
        bar = "█" * (eighths // 8) + (PARTIAL_BLOCKS[eighths % 8] if eighths % 8 else "")
        short = name if len(name) <= name_w else name[: name_w - 1] + "…"
        out.append(short.ljust(name_w) + " ", style="bold" if n == 0 else "")
        out.append(bar.ljust(bar_w), style=FRONT_STYLE if n == 0 else "cyan")
        out.append(f" {value:.3f}\n")
    if len(bars) < len(chart.bars):
        out.append(f"… {len(chart.bars) - len(bars)} more (taller terminal)\n", style="dim")
    return out


def escape(text: str) -> str:
    """Text for SVG content (what xml.sax.saxutils.escape does, without importing xml.sax)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- SVG ------------------------------------------------------------------------------------------

SVG_W, SVG_H = 720, 440
_MARGIN = {"left": 70, "right": 30, "top": 50, "bottom": 60}
_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
_FRONT_COLOUR = "#1a7f37"
_POINT_COLOUR = "#9a6700"


def chart_svg(chart: Chart) -> str:
    """The chart as a standalone SVG document."""
    body = _bars_svg(chart) if chart.is_bars else _scatter_svg(chart)
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{SVG_W}' height='{body[1]}' "
        f"viewBox='0 0 {SVG_W} {body[1]}'>\n"
        f"<rect width='100%' height='100%' fill='white'/>\n{body[0]}</svg>\n"
    )


def charts_svg(charts: Sequence[Chart]) -> str:
    """Several charts stacked in one SVG document."""
    parts, y = [], 0
    for chart in charts:
        inner, h = _bars_svg(chart) if chart.is_bars else _scatter_svg(chart)
        parts.append(f"<g transform='translate(0,{y})'>\n{inner}</g>\n")
        y += h
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{SVG_W}' height='{y}' "
        f"viewBox='0 0 {SVG_W} {y}'>\n<rect width='100%' height='100%' fill='white'/>\n"
        + "".join(parts)
        + "</svg>\n"
    )


def _text(
    x: float, y: float, text: str, *, size: int = 12, anchor: str = "start", **attrs: str
) -> str:
    extra = " ".join(f"{k.replace('_', '-')}='{v}'" for k, v in attrs.items())
    return (
        f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' {_FONT} "
        f"{extra}>{escape(text)}</text>\n"
    )


def _scatter_svg(chart: Chart) -> tuple[str, int]:
    m = _MARGIN
    w, h = SVG_W - m["left"] - m["right"], SVG_H - m["top"] - m["bottom"]
    s = [_text(SVG_W / 2, 28, chart.title, size=16, anchor="middle", font_weight="bold")]
    points = chart.points
    if not points:
        return "".join(s), SVG_H
    xa = _Axis.of([p.x for p in points], log=chart.x_log)
    ya = _Axis.of([p.y for p in points], log=False)

    def px(p: Point) -> tuple[float, float]:
        return m["left"] + xa.fraction(p.x) * w, m["top"] + (1 - ya.fraction(p.y)) * h

    s.append(
        f"<rect x='{m['left']}' y='{m['top']}' width='{w}' height='{h}' fill='none' "
        "stroke='#888'/>\n"
    )
    for t in xa.ticks(6):
        x = m["left"] + xa.fraction(t) * w
        s.append(
            f"<line x1='{x:.1f}' y1='{m['top']}' x2='{x:.1f}' y2='{m['top'] + h}' stroke='#eee'/>\n"
        )
        s.append(_text(x, m["top"] + h + 18, format_tick(t), size=11, anchor="middle"))
    for t in ya.ticks(6):
        y = m["top"] + (1 - ya.fraction(t)) * h
        s.append(
            f"<line x1='{m['left']}' y1='{y:.1f}' x2='{m['left'] + w}' y2='{y:.1f}' "
            "stroke='#eee'/>\n"
        )
        s.append(_text(m["left"] - 8, y + 4, format_tick(t), size=11, anchor="end"))
    better = "→ better" if chart.x_higher_is_better else "← better"
    s.append(_text(m["left"] + w / 2, SVG_H - 18, f"{chart.x_label} ({better})", anchor="middle"))
    s.append(
        _text(
            18,
            m["top"] + h / 2,
            "accuracy (↑ better)",
            anchor="middle",
            transform=f"rotate(-90 18 {m['top'] + h / 2:.1f})",
        )
    )
    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    if len(front) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(px, front))
        s.append(
            f"<polyline points='{path}' fill='none' stroke='{_FRONT_COLOUR}' "
            "stroke-width='2' stroke-dasharray='6 4'/>\n"
        )
    for p in points:
        x, y = px(p)
        colour = _FRONT_COLOUR if p.front else _POINT_COLOUR
        s.append(
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r='6' fill='{colour}'>"
            f"<title>{escape(p.label)}: accuracy {p.y:.3f}, {format_tick(p.x)}</title>"
            "</circle>\n"
        )
        anchor = "end" if x > m["left"] + w * 0.7 else "start"
        s.append(
            _text(
                x + (-9 if anchor == "end" else 9),
                y - 8,
                ("◆ " if p.front else "") + p.label,
                size=11,
                anchor=anchor,
            )
        )
    legend = "◆ green: on this chart's Pareto front (dashed line)"
    s.append(_text(m["left"], SVG_H - 2, "; ".join([legend, *chart.notes]), size=10, fill="#555"))
    return "".join(s), SVG_H


def _bars_svg(chart: Chart) -> tuple[str, int]:
    bar_h, gap = 22, 8
    top, left = 50, 230
    height = top + len(chart.bars) * (bar_h + gap) + 40
    w = SVG_W - left - 80
    s = [_text(SVG_W / 2, 28, chart.title, size=16, anchor="middle", font_weight="bold")]
    peak = max((v for _, v in chart.bars), default=1.0) or 1.0
    for n, (name, value) in enumerate(chart.bars):
        y = top + n * (bar_h + gap)
        length = max(value, 0.0) / peak * w
        colour = _FRONT_COLOUR if n == 0 else "#0969da"
        short = name if len(name) <= 34 else name[:33] + "…"
        s.append(_text(left - 8, y + bar_h * 0.7, short, anchor="end"))
        s.append(
            f"<rect x='{left}' y='{y}' width='{length:.1f}' height='{bar_h}' "
            f"fill='{colour}'><title>{escape(name)}: {value:.3f}</title></rect>\n"
        )
        s.append(_text(left + length + 6, y + bar_h * 0.7, f"{value:.3f}", size=11))
    s.append(_text(left, height - 12, chart.x_label, size=11, fill="#555"))
    return "".join(s), height


# -- files ----------------------------------------------------------------------------------------


def png_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_targets(target: str) -> tuple[Path, bool]:
    """Check ``--plot``: (path, is_folder). A folder may not exist yet (it is made); a file
    needs an existing folder and a .svg or .png name; .png needs matplotlib."""
    path = Path(target).expanduser()
    if path.suffix.lower() in PLOT_SUFFIXES:
        if not path.parent.is_dir():
            raise UserError(f"--plot {target}: folder {path.parent} does not exist")
        if path.suffix.lower() == ".png" and not png_available():
            raise UserError(
                f"--plot {target}: PNG needs matplotlib (pip install matplotlib); "
                "give a .svg file or a folder"
            )
        return path, False
    if path.suffix:
        raise UserError(
            f"--plot {target}: a folder or a file ending in .svg or .png, not '{path.suffix}'"
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"--plot {target}: exists and is not a folder")
    return path, True


def write_plots(rows: Sequence[PerRow], target: str, by: str = "per") -> list[Path]:
    """Write the charts (``all_charts``) to ``target``: in a folder, one SVG each (and a PNG
    each when matplotlib is installed); as one file, every chart stacked. Returns the paths."""
    from slmtui.reports.commands import write_atomically

    path, folder = plot_targets(target)
    charts = all_charts(rows, by)
    written: list[Path] = []
    if not folder:
        if path.suffix.lower() == ".svg":
            write_atomically(path, charts_svg(charts), flag="--plot")
        else:
            _write_png(charts, path)
        return [path]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--plot {target}: cannot make the folder ({exc.strerror})") from None
    png = png_available()
    for chart in charts:
        svg = path / f"{chart.name}.svg"
        write_atomically(svg, chart_svg(chart), flag="--plot")
        written.append(svg)
        if png:
            written.append(_write_png([chart], path / f"{chart.name}.png"))
    if not png:
        import sys

        print(
            "slmtui: note: PNG plots need matplotlib (pip install matplotlib); wrote SVG only",
            file=sys.stderr,
        )
    return written


def _write_png(charts: Sequence[Chart], path: Path) -> Path:
    """PNG through matplotlib (Agg, no display), written to a temporary name then renamed."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(charts), 1, figsize=(8, 5 * len(charts)), squeeze=False)
    for ax, chart in zip(axes[:, 0], charts, strict=True):
        ax.set_title(chart.title)
        if chart.is_bars:
            names = [n for n, _ in chart.bars][::-1]
            values = [v for _, v in chart.bars][::-1]
            colours = ["#0969da"] * (len(values) - 1) + [_FRONT_COLOUR]
            ax.barh(names, values, color=colours)
            ax.set_xlabel(chart.x_label)
            continue
        for p in chart.points:
            ax.scatter([p.x], [p.y], color=_FRONT_COLOUR if p.front else _POINT_COLOUR, s=40)
            ax.annotate(
                ("◆ " if p.front else "") + p.label,
                (p.x, p.y),
                fontsize=8,
                xytext=(5, 5),
                textcoords="offset points",
            )
        front = sorted((p for p in chart.points if p.front), key=lambda p: p.x)
        if len(front) > 1:
            ax.plot([p.x for p in front], [p.y for p in front], "--", color=_FRONT_COLOUR)
        if chart.x_log:
            ax.set_xscale("log")
        better = "→ better" if chart.x_higher_is_better else "← better"
        ax.set_xlabel(f"{chart.x_label} ({better})")
        ax.set_ylabel("accuracy (↑ better)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"--plot {path}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)
    return path
