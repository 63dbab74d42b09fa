"""Messages from the engine's thread to the app: small dataclasses, posted by the bridge."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message

from slmtui.protocol import Event, RunProgress


@dataclass
class RunChanged(Message):
    """A run was queued, started, finished, failed or cancelled (one event, in order)."""

    event: Event


@dataclass
class ProgressSnapshot(Message):
    """The latest progress of every run that moved since the last snapshot, and how many
    samples each scored since then. At most about one a second; a newer one replaces an
    unhandled older one (its runs' progress is merged in, so nothing is lost)."""

    progress: dict[str, RunProgress] = field(default_factory=dict)
    """Latest progress event per run id."""
    samples: dict[str, int] = field(default_factory=dict)
    """Samples scored per run id since the previous snapshot."""

    def can_replace(self, message: Message) -> bool:
        if not isinstance(message, ProgressSnapshot):
            return False
        for run_id, older in message.progress.items():
            newer = self.progress.get(run_id)
            if newer is None or newer.t < older.t:
                self.progress[run_id] = older
        for run_id, count in message.samples.items():
            self.samples[run_id] = self.samples.get(run_id, 0) + count
        return True
