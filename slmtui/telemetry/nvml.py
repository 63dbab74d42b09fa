"""The NVML GPU backend: every pynvml call goes through one method that translates its errors.

Callers see two things only: plain values in slmtui's units (MB = MiB, W, mJ, %), or an
``NvmlError``. Whatever pynvml raises (``NVMLError_*``, a missing shared library, a function an old
driver lacks, a ctypes failure) becomes ``NvmlError`` at :meth:`Nvml.call`, so a telemetry caller
needs exactly one ``except``. ``pynvml`` is imported lazily (``import pynvml`` inside
:func:`open_nvml`), which is also how the tests replace it: a fake module in ``sys.modules``.

NVML ignores CUDA_VISIBLE_DEVICES: ``backend.backend_indices_for`` maps the worker's CUDA ordinals
to NVML indices the way CUDA reads that variable. Integer entries are NVML indices when
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which the scheduler sets for every worker.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from slmtui.telemetry.backend import (
    GpuDevice,
    GpuError,
    GpuProcess,
    backend_indices_for,
)

_MB = 1024 * 1024
_T = TypeVar("_T")

# NVML return codes (nvml.h) that mean "this device or driver cannot do that", not "it broke".
_UNSUPPORTED_CODES = frozenset({3, 13})  # NOT_SUPPORTED, FUNCTION_NOT_FOUND


class NvmlError(GpuError):
    """An NVML call failed; ``op`` names the call, ``code`` is NVML's return code if it gave one."""

    backend = "NVML"

    @property
    def unsupported(self) -> bool:
        """True when the device or driver lacks the feature (as opposed to a failure)."""
        return self.code in _UNSUPPORTED_CODES


NvmlProcess = GpuProcess
NvmlDevice = GpuDevice


class Nvml:
    """An initialised NVML session over a pynvml-like module: the ``nvml`` GPU backend
    (``telemetry/backend.py``). Close it (or use ``with``).

    NVML's init/shutdown are reference counted by the library, so several sessions in one process
    (the sampler, :func:`hardware_identity`) do not disturb each other.
    """

    kind = "nvml"

    def __init__(self, module: ModuleType) -> None:
        self._nvml = module
        self._closed = False
        self._lock = threading.Lock()

    def call(self, op: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run one pynvml function; the single place where its errors become ``NvmlError``."""
        try:
            return fn(*args)
        except Exception as exc:  # pynvml.NVMLError, OSError, AttributeError, ctypes errors
            code = getattr(exc, "value", None)
            raise NvmlError(
                op, str(exc) or type(exc).__name__, code if isinstance(code, int) else None
            ) from exc

    def _fn(self, name: str) -> Callable[..., Any]:
        fn = getattr(self._nvml, name, None)
        if fn is None:
            raise NvmlError(name, "not in this pynvml", 13)
        return fn

    def close(self) -> None:
        """Shut this session down; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- system -------------------------------------------------------------------------------

    def device_count(self) -> int:
        return int(self.call("device count", self._fn("nvmlDeviceGetCount")))

    def driver_version(self) -> str:
        return _text(self.call("driver version", self._fn("nvmlSystemGetDriverVersion")))

    def cuda_driver_version(self) -> str:
        """The CUDA version the driver supports, e.g. '12.8' (NVML gives 12080)."""
        value = int(self.call("CUDA driver version", self._fn("nvmlSystemGetCudaDriverVersion")))
        return f"{value // 1000}.{value % 1000 // 10}"

    def process_name(self, pid: int) -> str:
        return _text(self.call("process name", self._fn("nvmlSystemGetProcessName"), pid))

    def devices(self) -> list[NvmlDevice]:
        """Every device NVML sees, in NVML index order."""
        found = []
        for index in range(self.device_count()):
            handle = self.handle(index)
            found.append(NvmlDevice(index=index, uuid=self.uuid(handle), name=self.name(handle)))
        return found

    # ---- per device ---------------------------------------------------------------------------

    def handle(self, index: int) -> Any:
        return self.call("device handle", self._fn("nvmlDeviceGetHandleByIndex"), index)

    def name(self, handle: Any) -> str:
        return _text(self.call("device name", self._fn("nvmlDeviceGetName"), handle))

    def uuid(self, handle: Any) -> str:
        return _text(self.call("device UUID", self._fn("nvmlDeviceGetUUID"), handle))

    def memory_used_mb(self, handle: Any) -> float:
        """Memory used on the whole device (every process, plus the driver's reserve), MiB."""
        info = self.call("memory info", self._fn("nvmlDeviceGetMemoryInfo"), handle)
        return float(info.used) / _MB

    def memory_total_mb(self, handle: Any) -> float:
        info = self.call("memory info", self._fn("nvmlDeviceGetMemoryInfo"), handle)
        return float(info.total) / _MB

    def memory_free_mb(self, handle: Any) -> float:
        """Memory free on the device now (other users' processes count), MiB."""
        info = self.call("memory info", self._fn("nvmlDeviceGetMemoryInfo"), handle)
        return float(info.free) / _MB

    def utilization_pct(self, handle: Any) -> float:
        """Percent of the last sample period in which a kernel ran (NVML's ``gpu`` utilisation)."""
        rates = self.call("utilization", self._fn("nvmlDeviceGetUtilizationRates"), handle)
        return float(rates.gpu)

    def power_w(self, handle: Any) -> float:
        """Board power draw in W (NVML reports mW; on recent GPUs an average over ~1 s)."""
        return float(self.call("power usage", self._fn("nvmlDeviceGetPowerUsage"), handle)) / 1000

    def energy_mj(self, handle: Any) -> int:
        """Total energy since the driver loaded, in mJ (Volta and later)."""
        fn = self._fn("nvmlDeviceGetTotalEnergyConsumption")
        return int(self.call("total energy", fn, handle))

    def processes(self, handle: Any) -> list[NvmlProcess]:
        """Compute and graphics processes on the device, one entry per PID (largest memory kept)."""
        listed: dict[int, float | None] = {}
        for op, name in (
            ("compute processes", "nvmlDeviceGetComputeRunningProcesses"),
            ("graphics processes", "nvmlDeviceGetGraphicsRunningProcesses"),
        ):
            try:
                entries = self.call(op, self._fn(name), handle)
            except NvmlError as exc:
                if exc.unsupported and name.endswith("GraphicsRunningProcesses"):
                    continue
                raise
            for entry in entries:
                pid = int(entry.pid)
                used = entry.usedGpuMemory
                used_mb = None if used is None else float(used) / _MB
                if pid not in listed or (used_mb or 0.0) > (listed[pid] or 0.0):
                    listed[pid] = used_mb
        return [NvmlProcess(pid=pid, used_mb=used) for pid, used in listed.items()]


def open_nvml() -> Nvml:
    """Import pynvml and initialise NVML; ``NvmlError`` when either fails (CPU box, no driver)."""
    try:
        import pynvml
    except Exception as exc:  # ImportError, or a broken install
        raise NvmlError("import", f"pynvml not importable ({exc})") from exc
    session = Nvml(pynvml)
    session.call("init", session._fn("nvmlInit"))
    return session


def nvml_available() -> bool:
    """True when NVML initialises and sees at least one device."""
    try:
        with open_nvml() as nvml:
            return nvml.device_count() > 0
    except NvmlError:
        return False


nvml_indices_for = backend_indices_for
"""NVML indices of the worker's CUDA ordinals (``backend.backend_indices_for``)."""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
