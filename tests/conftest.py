"""Settings for the whole suite."""

from __future__ import annotations

import signal

# The hang-up tests (tests/ui/test_detach.py, tests/unit/test_service.py) send SIGHUP as a closed
# terminal does. Under nohup, or a runner that ignores SIGHUP, every child would inherit the ignore
# and never hang up (both failed so in a local `nohup .ci/run`): give children a terminal's default.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
