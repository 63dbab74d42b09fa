"""What GPU a run ran on, as NVML names it. The worker adds torch/transformers versions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from slmtui.telemetry.nvml import NvmlError, nvml_indices_for, open_nvml, visible_devices


def hardware_identity(
    gpu_indices: Sequence[int] | None = None, cuda_visible_devices: str | None = None
) -> dict[str, Any]:
    """gpu_name, gpu_names, gpu_uuids, gpu_count, driver, cuda_driver (NVML's view; never raises).

    ``gpu_indices`` are CUDA ordinals (relative to CUDA_VISIBLE_DEVICES); None means every
    visible GPU. Without NVML: gpu_count 0 and None for the rest. ``cuda_driver`` is the newest
    CUDA the driver supports, not the runtime torch was built with.
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
        nvml = open_nvml()
    except NvmlError:
        return identity
    with nvml:
        with contextlib.suppress(NvmlError):
            identity["driver"] = nvml.driver_version()
        with contextlib.suppress(NvmlError):
            identity["cuda_driver"] = nvml.cuda_driver_version()
        try:
            devices = nvml.devices()
            if gpu_indices is None:
                chosen = visible_devices(devices, _env(cuda_visible_devices))
            else:
                indices = nvml_indices_for(gpu_indices, devices, cuda_visible_devices)
                chosen = [devices[i] for i in indices]
        except NvmlError:
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
