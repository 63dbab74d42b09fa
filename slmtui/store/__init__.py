"""The results store (SQLite): the only writer of runs, results and samples."""

from slmtui.store.store import (
    RUN_STATUSES,
    TERMINAL_STATUSES,
    ImportResult,
    ResultRow,
    RunRow,
    RunStatus,
    SampleRow,
    Store,
    StoreWriteError,
)

__all__ = [
    "RUN_STATUSES",
    "TERMINAL_STATUSES",
    "ImportResult",
    "ResultRow",
    "RunRow",
    "RunStatus",
    "SampleRow",
    "Store",
    "StoreWriteError",
]
