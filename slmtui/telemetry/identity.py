"""What GPU a run ran on, as the GPU backend names it (the worker adds library versions)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from slmtui.telemetry.backend import GpuError, backend_indices_for, open_backend, visible_devices


def hardware_identity(
    gpu_indices: Sequence[int] | None = None, cuda_visible_devices: str | None = None
) -> dict[str, Any]:
    """gpu_name, gpu_names, gpu_uuids, gpu_count, driver, cuda_driver (the backend's view; never
    raises).

    ``gpu_indices`` are CUDA ordinals (relative to CUDA_VISIBLE_DEVICES); None means every
    visible GPU. Without a GPU backend: gpu_count 0 and None for the rest. ``cuda_driver`` is the
    newest CUDA the driver supports, not the runtime torch was built with.
    """
    identity: dict[str, Any] = {
        "gpu_name": None,
        "gpu_names": [],
        "gpu_uuids": [],
        "gpu_count": 0,
        "driver": None,
        "cuda_driver": None,
    }
    try:
        backend = open_backend()
    except GpuError:
        return identity
    with backend:
        with contextlib.suppress(GpuError):
            identity["driver"] = backend.driver_version()
        with contextlib.suppress(GpuError):
            identity["cuda_driver"] = backend.cuda_driver_version()
        try:
            devices = backend.devices()
            if gpu_indices is None:
                chosen = visible_devices(devices, _env(cuda_visible_devices))
            else:
                indices = backend_indices_for(gpu_indices, devices, cuda_visible_devices)
                chosen = [devices[i] for i in indices]
        except GpuError:
            return identity
    identity["gpu_names"] = [d.name for d in chosen]
    identity["gpu_uuids"] = [d.uuid for d in chosen]
    identity["gpu_count"] = len(chosen)
    identity["gpu_name"] = chosen[0].name if chosen else None
    return identity


def _env(cuda_visible_devices: str | None) -> str | None:
    if cuda_visible_devices is None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    return cuda_visible_devices
