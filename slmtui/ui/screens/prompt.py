"""Small modal questions: one line of text, or a choice between buttons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

_CSS = """
PromptScreen, ChoiceScreen { align: center middle; }
PromptScreen > Vertical, ChoiceScreen > Vertical {
    width: 72; max-width: 100%; height: auto; padding: 1 2;
    border: thick $primary; background: $surface;
}
PromptScreen .title, ChoiceScreen .title { text-style: bold; }
PromptScreen .hint, ChoiceScreen .hint { color: $text-muted; margin: 0 0 1 0; }
ChoiceScreen Horizontal { height: auto; }
ChoiceScreen Button { margin: 0 1 0 0; }
"""


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line; dismisses with the text (enter) or ``None`` (escape)."""

    DEFAULT_CSS = _CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="prompt.cancel")
    ]

    def __init__(self, title: str, hint: str, *, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.hint = hint
        self.value = value
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(self.hint, classes="hint")
            yield Input(value=self.value, placeholder=self.placeholder, id="answer")
            yield Static("enter: OK · escape: cancel", classes="hint")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChoiceScreen(ModalScreen[str | None]):
    """Ask to pick one of a few answers; dismisses with its id, or ``None`` (escape)."""

    DEFAULT_CSS = _CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="choice.cancel")
    ]

    def __init__(self, title: str, hint: str, choices: Sequence[tuple[str, str]]) -> None:
        """``choices``: (id, button label), the first is the default (focused)."""
        super().__init__()
        self.title_text = title
        self.hint = hint
        self.choices = list(choices)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(self.hint, classes="hint")
            with Horizontal():
                for n, (choice_id, label) in enumerate(self.choices):
                    yield Button(label, id=choice_id, variant="primary" if n == 0 else "default")

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
