"""Which GPUs this box lends to runs: the GPU backend's devices (``telemetry/backend.py``; NVML),
limited by slmtui's CUDA_VISIBLE_DEVICES.

GPUs are named by their backend index (for NVML the index ``nvidia-smi`` shows, PCI bus order).
Workers get those indices in CUDA_VISIBLE_DEVICES together with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
so CUDA numbers them the same way. Without a backend (no driver, no GPU) the inventory is empty:
a CPU box.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from slmtui.telemetry.backend import GpuError, open_backend, visible_devices

_MB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    index: int
    """NVML index, as ``nvidia-smi`` and the user's CUDA_VISIBLE_DEVICES name it."""
    name: str
    total_mb: float
    """Device memory in MiB."""
    free_mb: float
    """Memory free when the inventory was taken, in MiB (other users' processes count)."""
    uuid: str = ""


def detect_gpus(cuda_visible_devices: str | None = None) -> list[Gpu]:
    """The GPUs runs may use: NVML devices named by CUDA_VISIBLE_DEVICES (default: the env's).

    Any NVML failure (library missing, no driver, no device) gives an empty list.
    """
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    return select_visible(read_nvml_devices(), cuda_visible_devices)


def read_nvml_devices() -> list[Gpu]:
    """Every device the GPU backend sees, in its index order; empty when there is none."""
    try:
        backend = open_backend()
    except GpuError:
        return []
    with backend:
        try:
            devices: list[Gpu] = []
            for device in backend.devices():
                handle = backend.handle(device.index)
                devices.append(
                    Gpu(
                        index=device.index,
                        name=device.name,
                        total_mb=backend.memory_total_mb(handle),
                        free_mb=backend.memory_free_mb(handle),
                        uuid=device.uuid,
                    )
                )
            return devices
        except GpuError:
            return []


def select_visible(devices: Sequence[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The devices CUDA_VISIBLE_DEVICES names, in its order, read as CUDA reads it (one reading
    for the whole tree: ``telemetry.backend.visible_devices``)."""
    return visible_devices(devices, cuda_visible_devices)


def describe_box(gpus: Sequence[Gpu], cuda_visible_devices: str | None = None) -> str:
    """'this box has 2 (CUDA_VISIBLE_DEVICES=2,3)' for user-facing messages."""
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices})" if cuda_visible_devices else ""
    if not gpus:
        if cuda_visible_devices is not None:
            return f"this box lends none (CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})"
        return "this box has none (no NVIDIA GPU found through NVML)"
    return f"this box has {len(gpus)}{where}"
