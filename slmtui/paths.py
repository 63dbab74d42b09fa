"""Where slmtui keeps its files (XDG base directories, overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Where results live.

    $SLMTUI_DATA_DIR, else $XDG_DATA_HOME/slmtui, else ~/.local/share/slmtui.
    """
    if env := os.environ.get("SLMTUI_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "slmtui"


def cache_dir() -> Path:
    """Converted checkpoints and fetched models: $SLMTUI_CACHE_DIR, else $XDG_CACHE_HOME/slmtui."""
    if env := os.environ.get("SLMTUI_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slmtui"


def default_db_path() -> Path:
    """The results store used when no --db is given."""
    return data_dir() / "results.sqlite"


def logs_dir() -> Path:
    """Worker stderr logs, one file per run; internal tracebacks go here, not to the screen."""
    return data_dir() / "logs"


def runtime_dir() -> Path:
    """Where the scheduler service keeps its socket and lock: owner-only (0700), never shared.

    $SLMTUI_RUNTIME_DIR, else $XDG_RUNTIME_DIR/slmtui, else /tmp/slmtui-<uid>. The caller
    creates it (``slmtui.scheduler.address.private_dir`` checks owner and mode).
    """
    if env := os.environ.get("SLMTUI_RUNTIME_DIR"):
        return Path(env)
    if base := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(base) / "slmtui"
    return Path("/tmp") / f"slmtui-{os.getuid()}"
