"""Every key binding of the console, read from the classes that define them (never stale)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.dom import DOMNode
from textual.screen import ModalScreen
from textual.widgets import Static

NAVIGATION = (
    ("up / down / pgup / pgdn", "move in a list or table"),
    ("left / right", "move between columns (Rank) or tabs"),
    ("tab / shift+tab", "next / previous area"),
    ("enter", "select a row (Pick), inspect a run (Runs, Rank)"),
    ("ctrl+p", "command palette: every action by name"),
    ("mouse", "click tabs, rows, and column headers (sorts)"),
)


def binding_rows(owner: type[DOMNode]) -> list[tuple[str, str]]:
    """(keys, description) for each Binding an owner class declares."""
    rows = []
    for binding in owner.BINDINGS:
        if not isinstance(binding, Binding):
            continue
        keys = " / ".join(_key_name(k) for k in binding.key.split(","))
        what = binding.description
        if binding.tooltip:
            what = f"{what}: {binding.tooltip}" if what else binding.tooltip
        rows.append((keys, what))
    return rows


def _key_name(key: str) -> str:
    return {"slash": "/", "question_mark": "?", "space": "space"}.get(key, key)


class HelpScreen(ModalScreen[None]):
    """A modal table of keys; escape, q or ? closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "close", "Close", id="help.close")
    ]

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen VerticalScroll {
        width: 90; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    """

    def __init__(self, sections: Sequence[tuple[str, type[DOMNode]]]) -> None:
        """``sections``: (title, class whose BINDINGS it lists)."""
        super().__init__()
        self.sections = list(sections)

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Text("slmtui keys (escape closes)", style="bold underline"))
            yield Static(self.render_help(), id="help-body")

    def render_help(self) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for title, owner in self.sections:
            table.add_row(Text(title, style="bold"), "")
            for keys, what in binding_rows(owner):
                table.add_row(f"  {keys}", what)
        table.add_row(Text("Moving around", style="bold"), "")
        for keys, what in NAVIGATION:
            table.add_row(f"  {keys}", what)
        return table

    def action_close(self) -> None:
        self.dismiss(None)
