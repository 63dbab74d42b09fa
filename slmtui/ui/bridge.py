"""From the scheduler's thread to the app's event loop.

The scheduler calls the bridge with every event (the store has already committed it). Run
lifecycle events (queued, started, finished, failed) are posted at once, one message each, in
order. Progress and samples are high rate (8 runs can send hundreds a second): the bridge keeps
the latest progress per run and a sample count, and posts them as ONE ``ProgressSnapshot`` at
most every ``interval_s``, so the UI redraws about once a second however busy the runs are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from textual.message import Message

from slmtui.protocol import Event, RunProgress, SampleScored
from slmtui.ui.messages import ProgressSnapshot, RunChanged

Post = Callable[[Message], object]


class Bridge:
    """A scheduler listener that posts Textual messages through ``post`` (thread-safe)."""

    def __init__(self, post: Post, *, interval_s: float = 1.0) -> None:
        """``post``: usually ``app.post_message``, which is safe to call from any thread."""
        self.post = post
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._progress: dict[str, RunProgress] = {}
        self._samples: dict[str, int] = {}
        self._last_post = 0.0
        self._timer: threading.Timer | None = None
        self._closed = False

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunProgress | SampleScored):
            self._hold(event)
            return
        self.flush()  # progress that came before the change is shown before it
        self.post(RunChanged(event))

    def _hold(self, event: RunProgress | SampleScored) -> None:
        with self._lock:
            if isinstance(event, RunProgress):
                held = self._progress.get(event.run_id)
                if held is None or held.t <= event.t:
                    self._progress[event.run_id] = event
            else:
                self._samples[event.run_id] = self._samples.get(event.run_id, 0) + 1
            wait_s = self._last_post + self.interval_s - time.monotonic()
            if wait_s > 0:
                if self._timer is None and not self._closed:
                    self._timer = threading.Timer(wait_s, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.flush()

    def flush(self) -> None:
        """Post what is held now (the timer, lifecycle events and close call this)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._progress and not self._samples:
                return
            message = ProgressSnapshot(self._progress, self._samples)
            self._progress, self._samples = {}, {}
            self._last_post = time.monotonic()
        self.post(message)

    def close(self) -> None:
        """Stop the timer; what is held is posted."""
        self.flush()
        with self._lock:
            self._closed = True
