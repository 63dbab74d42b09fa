"""Snapshots of the console's main screens at 80×24 and 160×50, on fixed data (screens.py)."""

from __future__ import annotations

from typing import Any

import pytest
from screens import SCREENS, finish, fresh_app

SIZES = {"80x24": (80, 24), "160x50": (160, 50)}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen(snap_compare: Any, screen: str, size: str) -> None:
    app, _ = fresh_app(f"snap-{screen}-{size}")

    async def show(pilot: Any) -> None:
        await SCREENS[screen](pilot)
        await finish(pilot)

    try:
        assert snap_compare(app, run_before=show, terminal_size=SIZES[size])
    finally:
        app.store.close()  # type: ignore[attr-defined]
