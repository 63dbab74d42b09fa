"""One worker per model: the runs of one (model, dtype, engine, GPU count) group share a process.

A worker started with ``--serve`` keeps its model loaded after a run and takes the next run of
its group from its stdin (``slmtui.worker.__main__``). When a run of such a worker ends, the
scheduler hands it the next queued run of the same group at once (same GPUs, no new load);
with none queued it closes the worker's input and the worker exits. Each run keeps its own
events, stored row, timeout and failure reason. A worker that dies costs the run it was on; the
group's other queued runs start in a fresh worker as usual. Only single-process runs (CPU or one
GPU) are grouped: a torchrun job's process group lives for one run.

Hand-over prefers the group over queue order: a run of another model queued earlier waits for
the group's runs on that GPU (loads are what a sweep spends its time on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from slmtui.protocol import SERVE_GOES_ON_AFTER, RunFailed, RunFinished
from slmtui.scheduler.packing import Pending
from slmtui.spec import RunSpec

SERVE_FLAG = "--serve"


def group_key(spec: RunSpec) -> tuple[Any, ...] | None:
    """Runs with equal keys can share a worker; None: this run never shares."""
    if spec.gpus > 1:
        return None
    return (spec.model.kind, spec.model.source, spec.dtype, spec.engine, spec.gpus, spec.parallel)


def serving_argv(argv: list[str], gpu_ids: Sequence[int]) -> list[str]:
    """``argv`` asking the worker to serve its group (single-process runs only)."""
    if len(gpu_ids) > 1 or SERVE_FLAG in argv or "torch.distributed.run" in argv:
        return argv
    return [*argv, SERVE_FLAG]


def serves(argv: Sequence[str]) -> bool:
    return SERVE_FLAG in argv


def goes_on(outcome: RunFinished | RunFailed | None) -> bool:
    """Whether the worker takes another run after this outcome (it exits after the others)."""
    return isinstance(outcome, RunFinished) or (
        isinstance(outcome, RunFailed) and outcome.reason in SERVE_GOES_ON_AFTER
    )


def next_in_group(pending: Sequence[Pending], spec: RunSpec) -> Pending | None:
    """The first queued run of ``spec``'s group."""
    key = group_key(spec)
    if key is None:
        return None
    return next((p for p in pending if group_key(p.spec) == key), None)


def run_line(run_id: str, spec: RunSpec) -> bytes:
    """The stdin line that hands a serving worker its next run."""
    return (json.dumps({"run_id": run_id, "spec": spec.to_dict()}) + "\n").encode()
