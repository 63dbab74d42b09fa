"""Which runs to start: the requested specs minus those already measured (resume).

A spec is measured when the store holds a finished run with its ``run_key``. Specs with the
same key measure the same thing (the key ignores the display name and the timeout), so a
request that lists one twice runs it once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from slmtui.spec import RunSpec


class FinishedKeys(Protocol):
    """What ``plan_runs`` needs from a store (``slmtui.store.Store`` has it)."""

    def completed_keys(self) -> set[str]: ...


@dataclass(frozen=True)
class Plan:
    to_run: list[RunSpec]
    """Specs to submit, in request order, each key once."""
    skipped: list[RunSpec]
    """Specs whose key the store holds as finished (resume)."""
    duplicates: list[RunSpec] = field(default_factory=list)
    """Later specs with the key of an earlier one in the same request."""


def plan_runs(specs: Iterable[RunSpec], store: FinishedKeys | None, rerun: bool = False) -> Plan:
    """Split ``specs`` into runs to start and runs already stored; ``rerun`` skips nothing."""
    done = set() if rerun or store is None else store.completed_keys()
    seen: set[str] = set()
    to_run: list[RunSpec] = []
    skipped: list[RunSpec] = []
    duplicates: list[RunSpec] = []
    for spec in specs:
        key = spec.run_key
        if key in seen:
            duplicates.append(spec)
            continue
        seen.add(key)
        (skipped if key in done else to_run).append(spec)
    return Plan(to_run=to_run, skipped=skipped, duplicates=duplicates)
