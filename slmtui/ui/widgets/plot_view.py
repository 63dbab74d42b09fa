"""A chart drawn in terminal cells (``slmtui.reports.plots.chart_text``), redrawn on resize.

The plotting module is imported on first draw: most sessions never open a plot, and the
console's cold start is measured (``scripts/cold_start.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widget import Widget

if TYPE_CHECKING:
    from slmtui.reports.plots import Chart


class PlotView(Widget):
    """Shows one ``Chart``; ``show`` swaps it. Sized by its container (the Rank tab's body)."""

    DEFAULT_CSS = """
    PlotView { height: 1fr; padding: 0 1; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.chart: Chart | None = None

    def show(self, chart: Chart | None) -> None:
        self.chart = chart
        self.refresh()

    def render(self) -> Text:
        if self.chart is None:
            return Text("Nothing to plot yet.", style="dim")
        from slmtui.reports.plots import chart_text

        size = self.content_size
        return chart_text(self.chart, max(size.width, 20), max(size.height, 8))
