"""The results store (SQLite): the only writer of runs, results and samples."""

from slmtui.store.store import (
    ImportResult,
    ResultRow,
    SampleRow,
    Store,
    StoreWriteError,
)

__all__ = [
    "ImportResult",
    "ResultRow",
    "SampleRow",
    "Store",
    "StoreWriteError",
]
