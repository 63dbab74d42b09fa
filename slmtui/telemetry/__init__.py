"""GPU telemetry: a sampler per worker, energy windows, hardware identity, all through the GPU
backend seam (``backend.py``; NVML is the backend today, ``nvml.py``).

No torch here: the runner synchronises CUDA before ``begin_window`` / ``end_window``.
"""

from slmtui.telemetry.backend import (
    GpuBackend,
    GpuError,
    backend_available,
    backend_indices_for,
    open_backend,
    visible_devices,
)
from slmtui.telemetry.energy import counter_delta_j, energy_metrics
from slmtui.telemetry.identity import hardware_identity
from slmtui.telemetry.nvml import NvmlError, nvml_available, nvml_indices_for
from slmtui.telemetry.sampler import REPORT_METRIC_KEYS, TelemetrySampler, metrics_from_report

__all__ = [
    "REPORT_METRIC_KEYS",
    "GpuBackend",
    "GpuError",
    "NvmlError",
    "TelemetrySampler",
    "backend_available",
    "backend_indices_for",
    "counter_delta_j",
    "energy_metrics",
    "hardware_identity",
    "metrics_from_report",
    "nvml_available",
    "nvml_indices_for",
    "open_backend",
    "visible_devices",
]
