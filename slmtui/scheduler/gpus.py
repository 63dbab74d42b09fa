"""Which GPUs this box lends to runs: NVML's devices, limited by slmtui's CUDA_VISIBLE_DEVICES.

GPUs are named by their NVML index (the index ``nvidia-smi`` shows, PCI bus order). Workers get
those indices in CUDA_VISIBLE_DEVICES together with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so CUDA
numbers them the same way. Without NVML (no driver, no GPU) the inventory is empty: a CPU box.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

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
    """Every device NVML sees, in NVML index order; empty when NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        devices: list[Gpu] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                Gpu(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    total_mb=memory.total / _MB,
                    free_mb=memory.free / _MB,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return devices
    except Exception:
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def select_visible(devices: Sequence[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The devices CUDA_VISIBLE_DEVICES names, in its order, read as CUDA reads it.

    Unset: all devices. Entries are indices or (prefixes of) UUIDs; as in CUDA, the list ends
    at the first entry that names no device, so "" and "-1" hide every GPU.
    """
    if cuda_visible_devices is None:
        return list(devices)
    chosen: list[Gpu] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        match = _find(devices, token)
        if match is None or match in chosen:
            break
        chosen.append(match)
    return chosen


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


def _find(devices: Sequence[Gpu], token: str) -> Gpu | None:
    if token.isdigit():
        return next((d for d in devices if d.index == int(token)), None)
    if token.startswith("GPU-"):
        hits = [d for d in devices if d.uuid.startswith(token)]
        return hits[0] if len(hits) == 1 else None
    return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
