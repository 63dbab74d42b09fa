"""Telemetry on CPU: NVML absent, NVML replaced by a scripted double, and a double that breaks.

The sampler's period is set long (60 s) where values are asserted, so samples happen only at the
explicit points (start, begin_window, end_window, stop) and every number is hand-computable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from slmtui.telemetry import (
    GpuError,
    TelemetrySampler,
    counter_delta_j,
    energy_metrics,
    hardware_identity,
    metrics_from_report,
    nvml_available,
    nvml_indices_for,
)
from slmtui.telemetry.energy import TimeIntegral
from slmtui.telemetry.nvml import NvmlDevice
from slmtui.telemetry.series import Series

MIB = 1024 * 1024
ME = os.getpid()
NO_SUCH_PID = 4_194_304 + 4242
"""Above Linux's default pid_max: a PID from another namespace that psutil cannot see."""
NEVER = 60.0
"""A sampling period no test waits for: samples happen only at explicit calls."""


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"fake NVML error {value}")
        self.value = value


class FakeNvml:
    """A pynvml double. Tests set per-GPU values; ``fail_from`` makes every call fail from then."""

    def __init__(self, n_gpus: int = 1) -> None:
        self.uuids = [f"GPU-{i:04d}-aaaa" for i in range(n_gpus)]
        self.util = [50] * n_gpus
        self.power_mw = [100_000] * n_gpus
        self.used_bytes = [2000 * MIB] * n_gpus
        self.energy_mj: list[list[int]] = [[] for _ in range(n_gpus)]
        """Scripted counter reads per GPU (popped in order; the last value repeats)."""
        self.energy_code: int | None = None
        """NVML return code raised by the energy counter (3 = not supported)."""
        self.procs: list[list[tuple[int, int | None]]] = [[] for _ in range(n_gpus)]
        """(pid, used bytes) per GPU."""
        self.fail_power_once = False
        self.fail_from: float | None = None
        """time.monotonic() after which every call raises (a GPU falling off the bus)."""
        self.calls = 0
        self.hang_from: float | None = None
        """time.monotonic() after which every call blocks until ``answer`` is set (a driver that
        stopped answering)."""
        self.answer = threading.Event()

    def module(self) -> ModuleType:
        mod = ModuleType("pynvml")
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(mod, name, getattr(self, name))
        mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        return mod

    def _tick(self) -> None:
        self.calls += 1
        if self.hang_from is not None and time.monotonic() >= self.hang_from:
            self.answer.wait(60)
        if self.fail_from is not None and time.monotonic() >= self.fail_from:
            raise FakeNVMLError(15)  # GPU is lost

    def nvmlInit(self) -> None:
        self._tick()

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        self._tick()
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._tick()
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Fake H100"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.uuids[handle]

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        return f"proc{pid}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        self._tick()
        return SimpleNamespace(used=self.used_bytes[handle], total=80 * 1024 * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._tick()
        return SimpleNamespace(gpu=self.util[handle], memory=10)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self._tick()
        if self.fail_power_once:
            self.fail_power_once = False
            raise FakeNVMLError(999)
        return self.power_mw[handle]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        self._tick()
        if self.energy_code is not None:
            raise FakeNVMLError(self.energy_code)
        reads = self.energy_mj[handle]
        return reads.pop(0) if len(reads) > 1 else reads[0]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        self._tick()
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.procs[handle]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        raise FakeNVMLError(3)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    double = FakeNvml(n_gpus=2)
    double.energy_mj = [[0], [0]]
    monkeypatch.setitem(sys.modules, "pynvml", double.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return double


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError


@pytest.fixture
def child() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# ---- without NVML ---------------------------------------------------------------------------


def test_cpu_box_without_nvml_reports_gpu_none_and_process_rss(no_nvml: None) -> None:
    assert nvml_available() is False
    assert hardware_identity()["gpu_count"] == 0
    sampler = TelemetrySampler([0], ME, period_s=0.01)
    sampler.start()
    sampler.begin_window("steady")
    time.sleep(0.05)
    window = sampler.end_window("steady")
    live = sampler.snapshot()
    report = sampler.stop()
    assert live["gpu"] == "none" and live["mem_source"] == "rss" and live["mem_mb"] > 0
    assert report["gpu"] == "none"
    assert report["mem_source"] == "rss"
    assert report["peak_mem_mb"] == report["peak_rss_mb"] > 0
    assert "no NVML" in report["degraded"]
    assert window["energy_j"] is None and window["flagged"].startswith("no GPU telemetry")
    assert report["power_mean_w"] is None and report["contaminated"] is False
    metrics = metrics_from_report(report, tokens_out=10, n_samples=2)
    assert metrics["energy_j"] is None and metrics["energy_per_token_j"] is None


def test_cpu_run_needs_no_nvml_at_all(fake: FakeNvml) -> None:
    sampler = TelemetrySampler([], ME, period_s=NEVER)
    sampler.start()
    report = sampler.stop()
    assert fake.calls == 0
    assert report["gpu"] == "none" and report["degraded"] is None and report["mem_source"] == "rss"


# ---- memory ---------------------------------------------------------------------------------


def test_peak_memory_is_the_process_tree_summed_over_the_runs_gpus(
    fake: FakeNvml, child: int
) -> None:
    fake.procs = [[(ME, 1000 * MIB)], [(child, 500 * MIB)]]
    sampler = TelemetrySampler([0, 1], ME, period_s=NEVER)
    sampler.start()  # sample 1: 1000 + 500
    fake.procs = [[(ME, 1200 * MIB)], [(child, 700 * MIB)]]
    sampler.begin_window("load")  # sample 2: 1900 (the peak)
    fake.procs = [[(ME, 1300 * MIB)], [(child, 100 * MIB)]]
    sampler.end_window("load")  # sample 3: 1400
    live = sampler.snapshot()
    report = sampler.stop()
    assert live["process_mem_mb"] == 1400.0 and live["mem_source"] == "nvml_process"
    assert [g["process_mem_mb"] for g in live["gpus"]] == [1300.0, 100.0]
    assert report["peak_mem_mb"] == 1900.0
    assert report["mem_source"] == "nvml_process"
    assert report["peak_device_used_mb"] == 4000.0
    assert report["contaminated"] is False and report["foreign_processes"] == []
    assert max(m for m in report["series"]["process_mem_mb"] if m is not None) == 1900.0


def test_a_child_started_mid_run_is_found_when_nvml_lists_it(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("slmtui.telemetry.sampler.UNKNOWN_PID_REFRESH_S", 0.0)
    sampler = TelemetrySampler([0], ME, period_s=NEVER)
    sampler.start()  # the process tree is read here: no child yet
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake.procs = [[(ME, 100 * MIB), (proc.pid, 400 * MIB)]]
        sampler.begin_window("load")  # an unknown PID on the GPU: the tree is read again
        sampler.end_window("load")
        report = sampler.stop()
    finally:
        proc.kill()
        proc.wait()
    assert report["peak_mem_mb"] == 500.0
    assert report["contaminated"] is False and report["foreign_processes"] == []


def test_invisible_pid_falls_back_to_the_gpus_used_memory(fake: FakeNvml) -> None:
    fake.procs = [[(NO_SUCH_PID, 900 * MIB)], []]  # a host PID: ours, seen from a container
    fake.used_bytes = [3000 * MIB, 1000 * MIB]
    sampler = TelemetrySampler([0, 1], ME, period_s=NEVER)
    sampler.start()
    report = sampler.stop()
    assert report["mem_source"] == "nvml_device"
    assert report["peak_mem_mb"] == 4000.0
    assert report["contaminated"] is False and report["foreign_processes"] == []
    assert report["process_attribution"].startswith("none")


# ---- foreign processes ----------------------------------------------------------------------


def test_a_foreign_process_on_the_runs_gpu_marks_it_contaminated(fake: FakeNvml) -> None:
    fake.procs = [[(ME, 1000 * MIB), (NO_SUCH_PID, 300 * MIB)], []]
    sampler = TelemetrySampler([0, 1], ME, period_s=NEVER)
    sampler.start()
    assert sampler.snapshot()["contaminated"] is True
    report = sampler.stop()
    assert report["contaminated"] is True
    assert report["peak_mem_mb"] == 1000.0  # the foreign process's memory is not ours
    (foreign,) = report["foreign_processes"]
    assert foreign["pid"] == NO_SUCH_PID and foreign["used_mb"] == 300.0
    assert foreign["name"] == f"proc{NO_SUCH_PID}" and foreign["nvml_index"] == 0


def test_without_pid_attribution_two_processes_on_one_gpu_mean_contaminated(
    fake: FakeNvml,
) -> None:
    fake.procs = [[(NO_SUCH_PID, 900 * MIB), (NO_SUCH_PID + 1, 50 * MIB)], []]
    sampler = TelemetrySampler([0, 1], ME, period_s=NEVER)
    sampler.start()
    report = sampler.stop()
    assert report["mem_source"] == "nvml_device"
    assert report["contaminated"] is True
    assert {f["pid"] for f in report["foreign_processes"]} == {NO_SUCH_PID, NO_SUCH_PID + 1}


def test_the_other_gpus_of_the_box_are_not_the_runs_business(fake: FakeNvml) -> None:
    fake.procs = [[(ME, 1000 * MIB)], [(NO_SUCH_PID, 300 * MIB)]]
    sampler = TelemetrySampler([0], ME, period_s=NEVER)
    sampler.start()
    report = sampler.stop()
    assert report["contaminated"] is False and report["peak_device_used_mb"] == 2000.0


# ---- energy ---------------------------------------------------------------------------------


def test_window_energy_is_the_counter_delta_summed_over_gpus(fake: FakeNvml) -> None:
    # reads: probe at start, begin_window, end_window
    fake.energy_mj = [[500, 1000, 6000], [0, 2000, 4500]]
    sampler = TelemetrySampler([0, 1], ME, period_s=NEVER)
    sampler.start()
    sampler.begin_window("steady")
    window = sampler.end_window("steady")
    report = sampler.stop()
    assert window["energy_j"] == 7.5
    assert window["per_gpu_energy_j"] == [5.0, 2.5]
    assert window["source"] == "nvml_counter" and window["flagged"] is None
    assert report["energy"]["steady"] == window
    metrics = metrics_from_report(report, tokens_out=30, n_samples=3, n_correct=0)
    assert metrics["energy_j"] == 7.5 and metrics["energy_source"] == "nvml_counter"
    assert metrics["energy_per_token_j"] == 0.25 and metrics["energy_per_sample_j"] == 2.5
    assert metrics["energy_per_correct_j"] is None


def test_a_counter_that_does_not_advance_is_flagged_not_stored(fake: FakeNvml) -> None:
    fake.energy_mj = [[0, 1000, 1000], [0, 10, 900]]
    sampler = TelemetrySampler([0, 1], ME, period_s=NEVER)
    sampler.start()
    sampler.begin_window("warmup")
    window = sampler.end_window("warmup")
    sampler.stop()
    assert window["energy_j"] is None
    assert "did not advance" in window["flagged"] and "GPU 0" in window["flagged"]
    assert window["per_gpu_energy_j"] == [0.0, 0.89]


def test_power_is_integrated_only_where_the_counter_is_unsupported(fake: FakeNvml) -> None:
    fake.energy_code = 3  # NVML_ERROR_NOT_SUPPORTED
    fake.power_mw = [150_000, 100_000]
    sampler = TelemetrySampler([0, 1], ME, period_s=0.01)
    sampler.start()
    sampler.begin_window("steady")
    time.sleep(0.1)
    window = sampler.end_window("steady")
    report = sampler.stop()
    assert window["source"] == "power_integral" and window["flagged"] is None
    assert window["energy_j"] == pytest.approx(250.0 * window["duration_s"])
    assert window["power_mean_w"] == pytest.approx(250.0)
    assert report["energy_counter"] is False and report["n_errors"] == 0
    assert report["power_mean_w"] == 250.0 and report["power_max_w"] == 250.0


def test_window_misuse_raises() -> None:
    sampler = TelemetrySampler([], ME, period_s=NEVER)
    with pytest.raises(RuntimeError):
        sampler.begin_window("steady")
    sampler.start()
    sampler.begin_window("steady")
    with pytest.raises(ValueError, match="already begun"):
        sampler.begin_window("steady")
    with pytest.raises(ValueError, match="not begun"):
        sampler.end_window("load")
    report = sampler.stop()
    assert report["energy"]["steady"]["flagged"].startswith("window not ended")
    with pytest.raises(ValueError):
        TelemetrySampler([], ME, period_s=0)


# ---- failures -------------------------------------------------------------------------------


def test_one_failed_reading_is_skipped_and_recorded(fake: FakeNvml) -> None:
    fake.energy_mj = [[0, 100, 600], [0, 100, 600]]
    sampler = TelemetrySampler([0, 1], ME, period_s=NEVER)
    sampler.start()
    fake.fail_power_once = True
    sampler.begin_window("steady")
    window = sampler.end_window("steady")
    report = sampler.stop()
    assert report["degraded"] is None and report["n_errors"] == 1
    assert "power usage" in report["errors"][0]
    assert window["energy_j"] == 1.0


def test_an_nvml_error_mid_run_degrades_the_telemetry_never_the_run(fake: FakeNvml) -> None:
    fake.energy_mj = [[0, 1000, 2000], [0, 1000, 2000]]
    fake.procs = [[(ME, 1000 * MIB)], []]
    sampler = TelemetrySampler([0, 1], ME, period_s=0.01)
    sampler.start()
    sampler.begin_window("steady")
    fake.fail_from = time.monotonic()
    time.sleep(0.15)  # many failing samples in the thread
    window = sampler.end_window("steady")
    live = sampler.snapshot()
    report = sampler.stop()
    assert "in a row" in report["degraded"] and report["n_errors"] >= 12
    assert window["energy_j"] is None and window["flagged"] is not None
    assert report["peak_mem_mb"] == 1000.0  # what was measured before the failure is kept
    assert report["mem_source"] == "nvml_process" and live["degraded"] is not None
    assert report["series"]["rss_mb"][-1] is not None  # RSS sampling went on
    lifted = metrics_from_report(report, window="steady", n_samples=4)
    assert "in a row" in lifted["telemetry_degraded"]  # the result says so too


def test_nvml_that_stops_answering_holds_the_run_up_at_most_the_stall_grace(
    fake: FakeNvml,
) -> None:
    fake.energy_mj = [[0, 1000], [0, 1000]]
    fake.procs = [[(ME, 1000 * MIB)], []]
    sampler = TelemetrySampler([0, 1], ME, period_s=0.01, stall_s=0.5)
    sampler.start()
    sampler.begin_window("steady")
    time.sleep(0.05)
    fake.hang_from = time.monotonic()  # every NVML call from now on blocks
    try:
        calls = fake.calls
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and fake.calls == calls:
            time.sleep(0.01)  # the sampler thread's next call: it blocks, holding its lock
        time.sleep(0.05)
        t0 = time.monotonic()
        live = sampler.snapshot()  # the heartbeat's call
        assert time.monotonic() - t0 < 5
        assert "NVML stopped answering" in live["degraded"]
        assert sampler.snapshot()["degraded"] == live["degraded"]  # and now at once
        window = sampler.end_window("steady")
        report = sampler.stop()
        assert time.monotonic() - t0 < 10  # the run went on: a few stall graces at most
    finally:
        fake.answer.set()
    assert window["energy_j"] is None and "stopped answering" in window["flagged"]
    assert "NVML stopped answering" in report["degraded"]
    assert report["peak_mem_mb"] == 1000.0  # what was measured before is kept
    lifted = metrics_from_report(report, window="steady", n_samples=4)
    assert "stopped answering" in lifted["telemetry_degraded"]


def test_nvml_that_fails_at_init_leaves_gpu_none(fake: FakeNvml) -> None:
    fake.fail_from = 0.0
    sampler = TelemetrySampler([0], ME, period_s=NEVER)
    sampler.start()
    report = sampler.stop()
    assert report["gpu"] == "none" and report["mem_source"] == "rss"
    assert report["degraded"].startswith("no NVML (fake NVML error 15)")


def test_the_thread_samples_at_its_period(fake: FakeNvml) -> None:
    sampler = TelemetrySampler([0], ME, period_s=0.01)
    sampler.start()
    time.sleep(0.2)
    report = sampler.stop()
    assert report["n_samples"] >= 8
    assert len(report["series"]["t_s"]) == report["n_samples"]
    assert sampler.stop() is report


# ---- GPU mapping and identity ---------------------------------------------------------------


def test_cuda_ordinals_map_to_nvml_indices_through_cuda_visible_devices() -> None:
    devices = [NvmlDevice(i, f"GPU-{i}abc-{i}", "H100") for i in range(4)]
    assert nvml_indices_for([0, 1], devices, None) == [0, 1]
    assert nvml_indices_for([0, 1], devices, "2,3") == [2, 3]
    assert nvml_indices_for([1], devices, "3,1") == [1]
    assert nvml_indices_for([0], devices, "GPU-2abc") == [2]
    with pytest.raises(GpuError, match="not among the 1 visible"):
        nvml_indices_for([1], devices, "1,7,2")  # the list ends at the first unknown id
    with pytest.raises(GpuError):
        nvml_indices_for([0], devices, "")


def test_sampler_reads_the_physical_gpu_cuda_visible_devices_names(fake: FakeNvml) -> None:
    fake.util = [10, 90]
    sampler = TelemetrySampler([0], ME, period_s=NEVER, cuda_visible_devices="1")
    sampler.start()
    live = sampler.snapshot()
    report = sampler.stop()
    assert live["gpus"][0]["util_pct"] == 90.0
    assert report["gpus"] == [
        {"index": 0, "nvml_index": 1, "name": "Fake H100", "uuid": "GPU-0001-aaaa"}
    ]


def test_hardware_identity_from_nvml(fake: FakeNvml) -> None:
    assert nvml_available() is True
    identity = hardware_identity(cuda_visible_devices="1")
    assert identity == {
        "gpu_name": "Fake H100",
        "gpu_names": ["Fake H100"],
        "gpu_uuids": ["GPU-0001-aaaa"],
        "gpu_count": 1,
        "driver": "550.54.15",
        "cuda_driver": "12.4",
    }
    assert hardware_identity([0, 1])["gpu_count"] == 2


# ---- pure parts -----------------------------------------------------------------------------


def test_energy_metrics_per_token_sample_and_correct_answer() -> None:
    assert energy_metrics(120.0, 600, 10, 4) == {
        "energy_j": 120.0,
        "energy_per_token_j": 0.2,
        "energy_per_sample_j": 12.0,
        "energy_per_correct_j": 30.0,
    }
    # log-likelihood run: no generated tokens; unknown energy gives no ratios
    assert energy_metrics(50.0, 0, 5)["energy_per_token_j"] is None
    assert energy_metrics(None, 600, 10, 4)["energy_per_sample_j"] is None


def test_counter_delta_in_joules() -> None:
    assert counter_delta_j([1_000, 5_000], [3_500, 5_250]) == (2.75, [2.5, 0.25], None)
    total, per_gpu, flag = counter_delta_j([9_000], [1_000])  # counter reset
    assert total is None and per_gpu == [-8.0] and flag is not None


def test_time_integral_is_a_trapezoid_that_skips_missing_values() -> None:
    power = TimeIntegral()
    for t_s, watts in [(0.0, 100.0), (1.0, 200.0), (2.0, None), (3.0, 200.0)]:
        power.add(t_s, watts)
    assert power.total == 150.0 + 400.0 and power.span_s == 3.0


def test_series_downsamples_but_keeps_the_memory_peak_and_the_mean() -> None:
    series = Series(max_points=300)
    for i in range(5000):
        mem = 9999.0 if i == 2345 else 100.0
        series.add(i * 0.2, {"util_pct": 50.0, "power_w": float(i % 2) * 100, "rss_mb": mem})
    out = series.export()
    assert len(series) == 5000
    assert 150 <= len(out["t_s"]) <= 300
    assert max(out["rss_mb"]) == 9999.0
    assert out["t_s"][0] == 0.0 and out["t_s"] == sorted(out["t_s"])
    assert all(u == 50.0 for u in out["util_pct"])
    assert out["process_mem_mb"][0] is None


def test_telemetry_never_imports_torch() -> None:
    code = "import sys, slmtui.telemetry; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
