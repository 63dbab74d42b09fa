"""Filling a DataTable with widths fitted up front.

DataTable measures auto-width columns on idle, after it may already have painted (and cached)
lines at the old widths, so a rebuilt table can show clipped cells until the cursor moves.
Giving every column its width when it is added avoids that, and caps long cells (paths).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.cells import cell_len
from rich.console import RenderableType
from rich.text import Text
from textual.widgets import DataTable

Row = tuple[str, Sequence[RenderableType]]
"""(row key, cells)."""


def cell_width(cell: RenderableType) -> int:
    """Width of one cell: the longest line of its text (other renderables count 1)."""
    if isinstance(cell, Text):
        return max((line.cell_len for line in cell.split()), default=0)
    if isinstance(cell, str):
        return max((cell_len(line) for line in cell.splitlines()), default=0)
    return 1


def fill_table(
    table: DataTable,
    columns: Sequence[tuple[str, str | Text]],
    rows: Sequence[Row],
    *,
    max_widths: Mapping[str, int] | None = None,
) -> None:
    """Replace ``table``'s columns and rows; each column as wide as its widest cell or label,
    at most ``max_widths[key]`` (longer cells end in an ellipsis)."""
    caps = max_widths or {}
    table.clear(columns=True)
    for n, (key, label) in enumerate(columns):
        width = max([cell_width(label), *(cell_width(cells[n]) for _, cells in rows)])
        if key in caps:
            width = min(width, caps[key])
        table.add_column(label, key=key, width=max(width, 1))
    for key, cells in rows:
        table.add_row(*(_clip(c) for c in cells), key=key)


def _clip(cell: RenderableType) -> RenderableType:
    if isinstance(cell, str):
        return Text(cell, no_wrap=True, overflow="ellipsis")
    if isinstance(cell, Text):
        cell.no_wrap = True
        cell.overflow = "ellipsis"
    return cell
