"""Fixtures for the console tests (the helpers live in ui_fixtures.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ui_fixtures import fill_store

from slmtui.store import Store


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "results.sqlite") as s:
        yield s


@pytest.fixture
def filled_store(store: Store) -> Store:
    fill_store(store)
    return store
