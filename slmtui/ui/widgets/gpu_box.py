"""The GPUs this box lends to runs, with name and free memory (or: runs use the CPU)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static

from slmtui.scheduler import Gpu


class GpuBox(Static):
    """One line per detected GPU; a CPU box says so."""

    DEFAULT_CSS = """
    GpuBox { height: auto; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, gpus: Sequence[Gpu], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.gpus = list(gpus)

    def on_mount(self) -> None:
        self.update(self.describe())

    def describe(self) -> Text:
        if not self.gpus:
            return Text("No GPU found (NVML): runs use the CPU; GPU count CPU only.")
        text = Text()
        for n, gpu in enumerate(self.gpus):
            if n:
                text.append("\n")
            text.append(f"GPU {gpu.index} ", style="bold")
            text.append(f"{gpu.name} · {gpu.free_mb:,.0f} of {gpu.total_mb:,.0f} MiB free")
        return text
