"""What the run ran on: GPU, driver, CUDA, library versions, CPU. Goes into every result row.

Every probe tolerates failure (a field is None rather than an exception): a missing NVML or an
odd /proc must not fail a run.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any


def describe_hardware() -> dict[str, Any]:
    """gpu_name, gpu_count, driver, cuda, torch, transformers, python, cpu (and cpu_count)."""
    import torch
    import transformers

    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_name = None
    if gpu_count:
        with contextlib.suppress(Exception):
            gpu_name = torch.cuda.get_device_name(0)
    return {
        "gpu_name": gpu_name,
        "gpu_count": gpu_count,
        "driver": _nvidia_driver() if gpu_count else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def _nvidia_driver() -> str | None:
    """The driver version from the GPU backend, else from /proc; None when neither answers."""
    from slmtui.telemetry.backend import GpuError, open_backend

    with contextlib.suppress(GpuError), open_backend() as backend:
        return backend.driver_version()
    with (
        contextlib.suppress(OSError, IndexError),
        open("/proc/driver/nvidia/version", encoding="utf-8") as f,
    ):
        text = f.read()
        # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
        words = text.split("Kernel Module", 1)[1].split()
        return words[0]
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` says."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
