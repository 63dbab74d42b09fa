"""Which queued runs start now, on which GPUs. Pure functions: no processes, no NVML.

Rules: a run asking k GPUs gets k GPUs of its own (a GPU is never shared: two runs on one GPU
would measure each other); among free GPUs it gets those with the most free memory. The queue is
served first come first served with backfill: a run that does not fit yet does not hold back
smaller runs behind it (on 8 GPUs, four 1-GPU runs and a 4-GPU run start together). CPU runs
(``gpus=0``) share the cores, so at most one runs at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from slmtui.errors import UserError
from slmtui.scheduler.gpus import Gpu, describe_box
from slmtui.spec import RunSpec


@dataclass(frozen=True)
class Pending:
    """A queued run."""

    run_id: str
    spec: RunSpec


@dataclass(frozen=True)
class Assignment:
    """A run to start now on ``gpu_ids`` (NVML indices, ascending; empty for the CPU)."""

    run_id: str
    spec: RunSpec
    gpu_ids: tuple[int, ...]


def check_fits(
    specs: Iterable[RunSpec], gpus: Sequence[Gpu], cuda_visible_devices: str | None = None
) -> None:
    """Refuse, before anything starts, a run that asks more GPUs than the box lends."""
    for spec in specs:
        if spec.gpus < 0:
            raise UserError(
                f"model {spec.model.name} ({spec.task}): gpus = {spec.gpus}; "
                f"allowed 0 (CPU) to {len(gpus)}"
            )
        if spec.gpus > len(gpus):
            asked = f"{spec.gpus} GPU{'s' if spec.gpus != 1 else ''} asked"
            allowed = f"0 (CPU) to {len(gpus)}" if gpus else "0 (CPU)"
            raise UserError(
                f"model {spec.model.name} ({spec.task}): {asked}, "
                f"{describe_box(gpus, cuda_visible_devices)}; allowed gpus: {allowed}"
            )


def pack(
    pending: Sequence[Pending], free_gpus: Sequence[Gpu], *, cpu_free: bool = True
) -> list[Assignment]:
    """The queued runs that start now, in queue order, with their GPUs.

    ``free_gpus`` are the GPUs no run holds; ``cpu_free`` is False while a CPU run is running.
    A run asking more GPUs than are free waits; later, smaller runs may start (backfill).
    """
    free = sorted(free_gpus, key=lambda g: (-g.free_mb, g.index))
    out: list[Assignment] = []
    for run in pending:
        k = run.spec.gpus
        if k == 0:
            if cpu_free:
                out.append(Assignment(run.run_id, run.spec, ()))
                cpu_free = False
            continue
        if k <= len(free):
            taken, free = free[:k], free[k:]
            out.append(Assignment(run.run_id, run.spec, tuple(sorted(g.index for g in taken))))
        if not free and not cpu_free:
            break
    return out
