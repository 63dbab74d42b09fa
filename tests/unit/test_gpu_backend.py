"""The GPU backend seam: another vendor is one module registered in ``telemetry.backend``.

A scripted backend (no pynvml at all) stands in for a second vendor; the scheduler's inventory,
a result's hardware identity and the telemetry sampler all read it, unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from slmtui.scheduler.gpus import detect_gpus
from slmtui.telemetry import TelemetrySampler, hardware_identity
from slmtui.telemetry import backend as backends
from slmtui.telemetry.backend import GpuDevice, GpuError, GpuProcess, open_backend
from slmtui.telemetry.nvml import NvmlError


class OtherVendor:
    """Two 64 GB devices; the run's own process holds 2 GiB on device 1."""

    kind = "other"

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> OtherVendor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def device_count(self) -> int:
        return 2

    def devices(self) -> list[GpuDevice]:
        return [GpuDevice(i, f"OTHER-{i}", "Other X1") for i in range(2)]

    def driver_version(self) -> str:
        return "9.9"

    def cuda_driver_version(self) -> str:
        return "n/a"

    def process_name(self, pid: int) -> str:
        return "python"

    def handle(self, index: int) -> Any:
        return index

    def name(self, handle: Any) -> str:
        return "Other X1"

    def uuid(self, handle: Any) -> str:
        return f"OTHER-{handle}"

    def memory_used_mb(self, handle: Any) -> float:
        return 2048.0 + handle

    def memory_total_mb(self, handle: Any) -> float:
        return 65536.0

    def memory_free_mb(self, handle: Any) -> float:
        return 60000.0 - handle

    def utilization_pct(self, handle: Any) -> float:
        return 50.0

    def power_w(self, handle: Any) -> float:
        return 300.0

    def energy_mj(self, handle: Any) -> int:
        return 1_000_000

    def processes(self, handle: Any) -> list[GpuProcess]:
        return [GpuProcess(os.getpid(), 2048.0)] if handle == 1 else []


@pytest.fixture
def other_vendor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML is not there at all
    monkeypatch.setitem(backends.BACKENDS, "other", OtherVendor)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_nvml_errors_are_gpu_errors_and_keep_their_message() -> None:
    error = NvmlError("power usage", "not supported", 3)
    assert isinstance(error, GpuError) and error.unsupported
    assert str(error) == "NVML power usage: not supported"


def test_with_nvml_missing_the_next_backend_answers(other_vendor: None) -> None:
    with open_backend() as backend:
        assert backend.kind == "other"


def test_the_inventory_reads_any_backend(other_vendor: None) -> None:
    gpus = detect_gpus("1")
    assert [(g.index, g.name, g.total_mb, g.free_mb, g.uuid) for g in gpus] == [
        (1, "Other X1", 65536.0, 59999.0, "OTHER-1")
    ]


def test_hardware_identity_reads_any_backend(other_vendor: None) -> None:
    identity = hardware_identity([0], cuda_visible_devices="1")
    assert identity["gpu_names"] == ["Other X1"] and identity["gpu_uuids"] == ["OTHER-1"]
    assert identity["driver"] == "9.9" and identity["gpu_count"] == 1


def test_the_sampler_reads_any_backend(other_vendor: None) -> None:
    sampler = TelemetrySampler([0], os.getpid(), period_s=3600, cuda_visible_devices="1")
    sampler.start()
    report = sampler.stop()
    assert report["gpu"] == "other" and report["degraded"] is None
    assert report["peak_process_mem_mb"] == 2048.0 and report["mem_source"] == "nvml_process"


def test_with_no_backend_the_one_registered_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(NvmlError, match="pynvml not importable"):
        open_backend()
