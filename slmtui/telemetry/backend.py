"""The GPU backend seam: what slmtui asks of a vendor's management library, and which one answers.

Every GPU reading in slmtui (the scheduler's inventory, the worker's telemetry sampler and energy
windows, a result's hardware identity) goes through a :class:`GpuBackend` session opened by
:func:`open_backend`. NVML (``telemetry/nvml.py``) is the one backend today; another vendor is one
module implementing this protocol plus a line in ``BACKENDS``. Values are in slmtui's units
(MiB, W, mJ, %); every failure is a :class:`GpuError`, so callers need one ``except``.

:func:`visible_devices` is the one reading of CUDA_VISIBLE_DEVICES (indices or UUID prefixes; the
list ends at the first entry that names no device, as CUDA reads it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


class GpuError(Exception):
    """A GPU backend call failed; ``op`` names the call, ``code`` is the library's code if any."""

    def __init__(self, op: str, detail: str, code: int | None = None) -> None:
        super().__init__(f"{self.backend} {op}: {detail}")
        self.op = op
        self.detail = detail
        self.code = code

    backend = "GPU"
    """The backend's name in messages ("NVML")."""

    @property
    def unsupported(self) -> bool:
        """True when the device or driver lacks the feature (as opposed to a failure)."""
        return False


@dataclass(frozen=True)
class GpuDevice:
    """One device as the backend names it."""

    index: int
    """The backend's index (for NVML: PCI bus order, as ``nvidia-smi`` shows)."""
    uuid: str
    name: str


@dataclass(frozen=True)
class GpuProcess:
    """A process the backend lists on a device."""

    pid: int
    """As the backend reports it: a host PID, which differs from ours inside a PID namespace."""
    used_mb: float | None
    """Device memory the process holds, MiB, its context included; None if not reported."""


class GpuBackend(Protocol):
    """An open session with a vendor's GPU management library. Close it (or use ``with``)."""

    kind: str
    """The backend's name in ``BACKENDS`` ("nvml")."""

    def close(self) -> None: ...
    def __enter__(self) -> GpuBackend: ...
    def __exit__(self, *exc: object) -> None: ...

    # the system
    def device_count(self) -> int: ...
    def devices(self) -> list[GpuDevice]: ...
    def driver_version(self) -> str: ...
    def cuda_driver_version(self) -> str:
        """The newest compute runtime the driver supports (for NVIDIA: CUDA, e.g. '12.8')."""
        ...

    def process_name(self, pid: int) -> str: ...

    # one device, by the handle ``handle(index)`` gives
    def handle(self, index: int) -> Any: ...
    def name(self, handle: Any) -> str: ...
    def uuid(self, handle: Any) -> str: ...
    def memory_used_mb(self, handle: Any) -> float: ...
    def memory_total_mb(self, handle: Any) -> float: ...
    def memory_free_mb(self, handle: Any) -> float: ...
    def utilization_pct(self, handle: Any) -> float: ...
    def power_w(self, handle: Any) -> float: ...
    def energy_mj(self, handle: Any) -> int:
        """Total energy since the driver loaded, mJ (a counter; windows take deltas)."""
        ...

    def processes(self, handle: Any) -> list[GpuProcess]: ...


def _open_nvml() -> GpuBackend:
    from slmtui.telemetry.nvml import open_nvml

    return open_nvml()


BACKENDS: dict[str, Callable[[], GpuBackend]] = {"nvml": _open_nvml}
"""Backends by name, tried in this order by :func:`open_backend`."""


def open_backend() -> GpuBackend:
    """The first backend that opens; ``GpuError`` when none does (CPU box, no driver).

    With one backend registered its own error comes back as it is ("NVML init: ...").
    """
    errors: list[GpuError] = []
    for opener in BACKENDS.values():
        try:
            return opener()
        except GpuError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    raise GpuError("open", "; ".join(str(e) for e in errors) or "no GPU backend registered")


def backend_available() -> bool:
    """True when a backend opens and sees at least one device."""
    try:
        with open_backend() as backend:
            return backend.device_count() > 0
    except GpuError:
        return False


class _Named(Protocol):
    index: int
    uuid: str


_N = TypeVar("_N", bound=_Named)


def visible_devices(devices: Sequence[_N], cuda_visible_devices: str | None) -> list[_N]:
    """The devices CUDA_VISIBLE_DEVICES leaves, in CUDA ordinal order (None: all of them).

    Entries are indices or (prefixes of) UUIDs; as in CUDA, the list ends at the first entry that
    names no device (or one already named), so "" and "-1" hide every GPU.
    """
    if cuda_visible_devices is None:
        return list(devices)
    chosen: list[_N] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        match: _N | None = None
        if token.isdigit():
            match = next((d for d in devices if d.index == int(token)), None)
        elif token.startswith("GPU-"):
            hits = [d for d in devices if d.uuid.startswith(token)]
            match = hits[0] if len(hits) == 1 else None
        if match is None or match in chosen:
            break
        chosen.append(match)
    return chosen


def backend_indices_for(
    gpu_indices: Sequence[int],
    devices: Sequence[GpuDevice],
    cuda_visible_devices: str | None = None,
) -> list[int]:
    """Backend indices of the worker's CUDA ordinals ``gpu_indices`` (read via
    CUDA_VISIBLE_DEVICES, default the environment's). ``GpuError`` (op "map") when an ordinal
    names no visible device, e.g. a MIG instance or an index past the list."""
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = visible_devices(devices, cuda_visible_devices)
    mapped = []
    for ordinal in gpu_indices:
        if not 0 <= ordinal < len(visible):
            raise GpuError(
                "map",
                f"CUDA device {ordinal} is not among the {len(visible)} visible "
                f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})",
            )
        mapped.append(visible[ordinal].index)
    return mapped
