"""The worker's telemetry sampler: NVML in its own thread, energy windows, one report at the end.

A :class:`TelemetrySampler` reads, every ``period_s`` and for the run's GPUs: memory held by the
worker's process tree (NVML's per-process list, summed over the run's GPUs), memory used on each
whole GPU, utilisation and power; plus the process tree's RSS (the memory of a CPU run). Named
windows (``begin_window`` / ``end_window``, called by the runner right after a CUDA synchronise)
read NVML's total-energy counters at their ends. ``stop`` returns the report that becomes the
result's ``telemetry`` dict; :func:`metrics_from_report` lifts its headline numbers into the flat
result metrics.

Failure never reaches the run: without NVML the report says ``gpu: "none"`` and memory is RSS; an
NVML error mid-run is recorded, the failing reading is skipped, and after
``MAX_CONSECUTIVE_FAILURES`` failed samples NVML is dropped (``degraded`` says why) while RSS
sampling goes on. An NVML call that never returns (a driver that stopped answering) holds up no
one for long: the run's own calls (``snapshot`` for the heartbeat, the windows, ``stop``) wait at
most ``stall_s`` for it, then NVML is given up for the run the same way. Only misuse of the API (a
window ended twice) raises.

Attribution: NVML lists processes by PID. Inside a container NVML may report host PIDs that match
nothing in the worker's namespace (nvtop #149); then the sampler cannot tell its own process from
others, reports the whole GPU's used memory (``mem_source: "nvml_device"``) and calls a GPU
contaminated only when NVML lists more than one process on it at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from slmtui.telemetry.backend import GpuBackend, GpuError, backend_indices_for, open_backend
from slmtui.telemetry.energy import TimeIntegral, counter_delta_j, energy_metrics
from slmtui.telemetry.series import Series

_MB = 1024 * 1024
_Family = dict[int, psutil.Process | None]
"""The run's process tree by PID (``None``: not readable through psutil)."""
MAX_CONSECUTIVE_FAILURES = 3
"""Samples in a row in which every NVML reading failed before NVML is given up for the run."""
MAX_ERRORS_KEPT = 10
FAMILY_REFRESH_S = 5.0
"""How often the worker's process tree (children via psutil) is re-read: a scan of every process
on the box (~4 ms of mostly GIL-held Python), too dear for every sample."""
NVML_STALL_S = 10.0
"""An NVML call blocked this long counts as NVML not answering (its reads take milliseconds)."""
UNKNOWN_PID_REFRESH_S = 1.0
"""Sooner when NVML lists a PID outside the known tree (a new child?), at most this often."""

REPORT_METRIC_KEYS = (
    "peak_mem_mb",
    "mem_source",
    "gpu_util_mean_pct",
    "power_mean_w",
    "power_max_w",
    "contaminated",
)
"""Report keys that :func:`metrics_from_report` copies into the flat result metrics."""


@dataclass
class _Gpu:
    ordinal: int
    """CUDA ordinal as the worker sees it (relative to CUDA_VISIBLE_DEVICES)."""
    nvml_index: int
    handle: Any
    name: str = ""
    uuid: str = ""
    util_pct: float | None = None
    power_w: float | None = None
    device_used_mb: float | None = None
    process_mem_mb: float | None = None
    """Memory NVML attributes to the worker's process tree on this GPU; None when none is seen."""
    process_count: int = 0


@dataclass
class _Window:
    name: str
    t_begin_s: float
    counters_mj: list[int] | None
    power_j: float
    util_pct_s: float
    error: str | None = None


@dataclass
class _Foreign:
    pid: int
    nvml_index: int
    name: str | None
    used_mb: float | None
    first_seen_s: float
    last_seen_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "nvml_index": self.nvml_index,
            "used_mb": None if self.used_mb is None else round(self.used_mb, 1),
            "first_seen_s": round(self.first_seen_s, 3),
            "last_seen_s": round(self.last_seen_s, 3),
        }


@dataclass
class _Peaks:
    process_mem_mb: float | None = None
    device_used_mb: float | None = None
    rss_mb: float | None = None
    power_w: float | None = None

    def update(self, name: str, value: float | None) -> None:
        if value is None:
            return
        current = getattr(self, name)
        if current is None or value > current:
            setattr(self, name, value)


@dataclass
class _State:
    peaks: _Peaks = field(default_factory=_Peaks)
    power: TimeIntegral = field(default_factory=TimeIntegral)
    """Summed power of the run's GPUs over time, J."""
    util: TimeIntegral = field(default_factory=TimeIntegral)
    """Mean utilisation of the run's GPUs over time, %·s."""
    n_samples: int = 0
    n_gpu_samples: int = 0
    pid_seen: bool = False
    crowded: bool = False
    """NVML listed more than one process on one of the run's GPUs at once."""
    foreign: dict[tuple[int, int], _Foreign] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    n_errors: int = 0
    consecutive_failures: int = 0


class TelemetrySampler:
    """Samples the run's GPUs (NVML) and process tree (psutil) in a background thread.

    ``gpu_indices`` are the CUDA ordinals the worker uses (relative to CUDA_VISIBLE_DEVICES);
    empty for a CPU run. ``pid`` is the root of the run's process tree: its descendants count as
    the run's own. Use as ``start() ... stop()`` or as a context manager.
    """

    def __init__(
        self,
        gpu_indices: list[int],
        pid: int,
        period_s: float = 0.2,
        *,
        max_series_points: int = 300,
        cuda_visible_devices: str | None = None,
        backend_factory: Callable[[], GpuBackend] = open_backend,
        stall_s: float = NVML_STALL_S,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.gpu_indices = list(gpu_indices)
        self.pid = pid
        self.period_s = period_s
        self._cuda_visible_devices = cuda_visible_devices
        self._backend_factory = backend_factory
        self._backend: GpuBackend | None = None
        self._backend_kind = "none"
        """The open backend's name ("nvml"), kept for the report after it is closed."""
        self._gpus: list[_Gpu] = []
        self._counter_supported = False
        self._degraded: str | None = None
        self._series = Series(max_series_points)
        self._state = _State()
        self._windows_open: dict[str, _Window] = {}
        self._windows: dict[str, dict[str, Any]] = {}
        self._family: _Family = {pid: None}
        self._family_read_at = float("-inf")
        self._names: dict[int, str | None] = {}
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._started = False
        self._report: dict[str, Any] | None = None
        self._latest: dict[str, Any] = {}
        self.stall_s = stall_s
        self._stalled = False
        """An NVML call stopped answering: nobody waits for the lock or calls NVML again."""

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open NVML for the run's GPUs (or note why not) and start sampling. Idempotent."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._t0 = time.monotonic()
            if self.gpu_indices:
                self._open_gpus()
            self._sample()
        self._thread = threading.Thread(target=self._loop, name="slmtui-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop sampling and return the report (the same dict on every later call)."""
        if self._report is not None:
            return self._report
        self._stop_event.set()
        if self._thread is not None and not self._stalled:
            self._thread.join(timeout=min(5 * self.period_s + 5, self.stall_s))
        with self._locked() as locked:
            if self._report is not None:
                return self._report
            if self._started and locked:
                self._bounded(self._sample)
            for name in list(self._windows_open):
                window = self._windows_open.pop(name)
                self._windows[name] = _empty_window(
                    window, "window not ended before the sampler stopped"
                )
            self._report = self._build_report()
            backend, self._backend = self._backend, None
            if backend is not None and not self._stalled:
                self._bounded(backend.close)
            return self._report

    def __enter__(self) -> TelemetrySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- NVML that stops answering -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """Hold the lock, waiting at most ``stall_s`` for it; yields False (without the lock)
        when NVML stopped answering: the sampler thread is stuck in a call, holding it."""
        locked = not self._stalled and self._lock.acquire(timeout=self.stall_s)
        if not locked:
            self._give_up_nvml()
        try:
            yield locked
        finally:
            if locked:
                self._lock.release()

    def _bounded(self, fn: Callable[[], object]) -> bool:
        """Run NVML work for a caller (the run's main thread) in a helper thread, waiting at most
        ``stall_s``; False (and NVML given up) when it did not return."""
        if self._stalled:
            return False
        helper = threading.Thread(target=fn, name="slmtui-nvml-call", daemon=True)
        helper.start()
        helper.join(self.stall_s)
        if helper.is_alive():
            self._give_up_nvml()
            return False
        return True

    def _give_up_nvml(self) -> None:
        if self._stalled:
            return
        self._stalled = True
        self._degraded = (
            f"NVML stopped answering (a call blocked for over {self.stall_s:g} s); "
            f"GPU sampling stopped at {self._now():.1f} s"
        )

    def _open_gpus(self) -> None:
        try:
            backend = self._backend_factory()
        except GpuError as exc:
            self._degraded = (
                f"no {exc.backend} ({exc.detail}): GPU memory, power and energy not measured"
            )
            return
        try:
            indices = backend_indices_for(
                self.gpu_indices, backend.devices(), self._cuda_visible_devices
            )
            gpus = []
            for ordinal, index in zip(self.gpu_indices, indices, strict=True):
                handle = backend.handle(index)
                gpus.append(
                    _Gpu(
                        ordinal, index, handle, name=backend.name(handle), uuid=backend.uuid(handle)
                    )
                )
        except GpuError as exc:
            backend.close()
            self._degraded = f"{exc}: GPU memory, power and energy not measured"
            return
        self._backend, self._gpus = backend, gpus
        self._backend_kind = backend.kind
        self._counter_supported = True
        for gpu in gpus:
            try:
                backend.energy_mj(gpu.handle)
            except GpuError as exc:
                self._counter_supported = False
                if not exc.unsupported:
                    self._note_error(exc)

    def _loop(self) -> None:
        while not self._stop_event.wait(self.period_s):
            with self._lock:
                if self._report is not None:
                    return
                self._sample()

    # ---- sampling -----------------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _sample(self) -> None:
        """Take one sample of everything; call with the lock held. Never raises."""
        t_s = self._now()
        state = self._state
        family = self._read_family(t_s)
        rss_mb = _rss_mb(family)
        state.n_samples += 1
        state.peaks.update("rss_mb", rss_mb)
        values: dict[str, float | None] = {"rss_mb": rss_mb}
        if self._backend is not None and not self._stalled:
            values.update(self._sample_gpus(t_s, family))
        self._series.add(t_s, values)
        self._latest = values

    def _sample_gpus(self, t_s: float, family: _Family) -> dict[str, float | None]:
        assert self._backend is not None
        state = self._state
        failures = 0
        for gpu in self._gpus:
            if self._stalled or self._backend is None:
                return {}  # NVML was given up while a call blocked: these readings are stale
            failures += self._read_gpu(gpu, t_s, family)
        if self._stalled or self._backend is None:
            return {}
        if failures == len(self._gpus) * 4:
            state.consecutive_failures += 1
            if state.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                self._degraded = (
                    f"NVML failed {state.consecutive_failures} samples in a row "
                    f"({state.errors[-1] if state.errors else 'unknown error'}); "
                    f"GPU sampling stopped at {t_s:.1f} s"
                )
                self._backend.close()
                self._backend = None
            return {}
        state.consecutive_failures = 0
        state.n_gpu_samples += 1
        utils = [g.util_pct for g in self._gpus if g.util_pct is not None]
        powers = [g.power_w for g in self._gpus if g.power_w is not None]
        used = [g.device_used_mb for g in self._gpus if g.device_used_mb is not None]
        own = [g.process_mem_mb for g in self._gpus if g.process_mem_mb is not None]
        util_pct = sum(utils) / len(utils) if utils else None
        power_w = sum(powers) if len(powers) == len(self._gpus) else None
        used_mb = sum(used) if len(used) == len(self._gpus) else None
        own_mb = sum(own) if own else None
        if own:
            state.pid_seen = True
        state.power.add(t_s, power_w)
        state.util.add(t_s, util_pct)
        state.peaks.update("power_w", power_w)
        state.peaks.update("device_used_mb", used_mb)
        state.peaks.update("process_mem_mb", own_mb)
        return {
            "util_pct": util_pct,
            "power_w": power_w,
            "device_used_mb": used_mb,
            "process_mem_mb": own_mb,
        }

    def _read_gpu(self, gpu: _Gpu, t_s: float, family: _Family) -> int:
        """Refresh one GPU's readings; returns how many of its 4 readings failed."""
        backend = self._backend
        assert backend is not None
        failed = 0
        readers: list[tuple[str, Callable[[Any], float]]] = [
            ("util_pct", backend.utilization_pct),
            ("power_w", backend.power_w),
            ("device_used_mb", backend.memory_used_mb),
        ]
        for attr, read in readers:
            try:
                setattr(gpu, attr, read(gpu.handle))
            except GpuError as exc:
                setattr(gpu, attr, None)
                failed += 1
                self._note_error(exc)
        try:
            processes = backend.processes(gpu.handle)
        except GpuError as exc:
            gpu.process_mem_mb = None
            self._note_error(exc)
            return failed + 1
        if any(p.pid not in family for p in processes):
            family = self._read_family(t_s, UNKNOWN_PID_REFRESH_S)
        own = [p for p in processes if p.pid in family]
        gpu.process_count = len(processes)
        own_mb = [p.used_mb for p in own if p.used_mb is not None]
        gpu.process_mem_mb = sum(own_mb) if own_mb else None
        if len(processes) > 1:
            self._state.crowded = True
        for proc in processes:
            if proc.pid in family:
                continue
            key = (gpu.nvml_index, proc.pid)
            seen = self._state.foreign.get(key)
            if seen is None:
                self._state.foreign[key] = _Foreign(
                    proc.pid, gpu.nvml_index, self._process_name(proc.pid), proc.used_mb, t_s, t_s
                )
            else:
                seen.last_seen_s = t_s
                if proc.used_mb is not None and (seen.used_mb or 0.0) < proc.used_mb:
                    seen.used_mb = proc.used_mb
        return failed

    def _read_family(self, t_s: float, max_age_s: float = FAMILY_REFRESH_S) -> _Family:
        """The run's process tree by PID, re-read when older than ``max_age_s``."""
        if t_s - self._family_read_at >= max_age_s:
            self._family_read_at = t_s
            family: _Family = {self.pid: None}
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.pid)
                family[self.pid] = root
                family.update((c.pid, c) for c in root.children(recursive=True))
            self._family = family
        return self._family

    def _process_name(self, pid: int) -> str | None:
        if pid not in self._names:
            name: str | None = None
            with contextlib.suppress(psutil.Error):
                name = psutil.Process(pid).name()
            if name is None and self._backend is not None:
                with contextlib.suppress(GpuError):
                    name = self._backend.process_name(pid) or None
            self._names[pid] = name
        return self._names[pid]

    def _note_error(self, exc: GpuError) -> None:
        state = self._state
        state.n_errors += 1
        if len(state.errors) < MAX_ERRORS_KEPT:
            state.errors.append(f"{self._now():.2f} s: {exc}")

    # ---- windows ------------------------------------------------------------------------------

    def begin_window(self, name: str) -> None:
        """Open the measured window ``name``: read the energy counters (after a CUDA sync)."""
        with self._locked():
            self._require_started("begin_window")
            if name in self._windows_open or name in self._windows:
                raise ValueError(f"telemetry window {name!r} was already begun")
            counters, error = self._sample_and_count()
            self._windows_open[name] = _Window(
                name=name,
                t_begin_s=self._state.power.last_t_s or self._now(),
                counters_mj=counters,
                power_j=self._state.power.total,
                util_pct_s=self._state.util.total,
                error=error,
            )

    def end_window(self, name: str) -> dict[str, Any]:
        """Close the window ``name`` (after a CUDA sync) and return its energy entry."""
        with self._locked():
            self._require_started("end_window")
            window = self._windows_open.pop(name, None)
            if window is None:
                raise ValueError(f"telemetry window {name!r} was not begun (or already ended)")
            counters, error = self._sample_and_count()
            self._windows[name] = self._close_window(window, counters, error or window.error)
            return self._windows[name]

    def _sample_and_count(self) -> tuple[list[int] | None, str | None]:
        """A sample and the energy counters, for a window's end; bounded in time."""
        out: list[tuple[list[int] | None, str | None]] = []

        def work() -> None:
            self._sample()
            out.append(self._read_counters())

        if not self._bounded(work) or not out:
            return None, self._degraded or "NVML stopped answering"
        return out[0]

    def _require_started(self, what: str) -> None:
        if not self._started or self._report is not None:
            raise RuntimeError(f"{what} needs a started, not yet stopped, TelemetrySampler")

    def _read_counters(self) -> tuple[list[int] | None, str | None]:
        if self._backend is None or not self._counter_supported:
            return None, None
        try:
            return [self._backend.energy_mj(g.handle) for g in self._gpus], None
        except GpuError as exc:
            self._note_error(exc)
            return None, str(exc)

    def _close_window(
        self, window: _Window, counters_mj: list[int] | None, error: str | None
    ) -> dict[str, Any]:
        state = self._state
        t_end_s = self._now()
        if state.power.last_t_s is not None and state.power.last_t_s >= window.t_begin_s:
            t_end_s = state.power.last_t_s
        duration_s = t_end_s - window.t_begin_s
        power_j: float | None = state.power.total - window.power_j
        util_pct_s = state.util.total - window.util_pct_s
        sampled = duration_s > 0 and state.n_gpu_samples > 0
        entry = _empty_window(window, None)
        entry["duration_s"] = duration_s
        if sampled:
            assert power_j is not None
            entry["power_integral_j"] = power_j
            entry["power_mean_w"] = power_j / duration_s
            entry["gpu_util_mean_pct"] = util_pct_s / duration_s
        else:
            power_j = None
        if not self._gpus:
            entry["flagged"] = "no GPU telemetry (no NVML or a CPU run)"
        elif error is not None:
            entry["flagged"] = f"energy counter unreadable: {error}"
        elif self._counter_supported and window.counters_mj is not None and counters_mj:
            energy_j, per_gpu_j, flag = counter_delta_j(window.counters_mj, counters_mj)
            entry.update(
                energy_j=energy_j, source="nvml_counter", flagged=flag, per_gpu_energy_j=per_gpu_j
            )
        elif self._counter_supported:
            entry["flagged"] = "NVML was lost during the window"
        elif power_j is not None:
            entry.update(energy_j=power_j, source="power_integral")
        else:
            entry["flagged"] = "energy counter unsupported and no power samples in the window"
        return entry

    # ---- reading ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Live values for progress events: the latest sample, per GPU and summed. Never waits
        more than ``stall_s`` (the heartbeat calls it); without the lock it reads what it can."""
        with self._locked():
            latest = dict(self._latest)
            gpus = [
                {
                    "index": g.ordinal,
                    "nvml_index": g.nvml_index,
                    "util_pct": g.util_pct,
                    "power_w": g.power_w,
                    "process_mem_mb": _r(g.process_mem_mb),
                    "device_used_mb": _r(g.device_used_mb),
                }
                for g in self._gpus
            ]
            mem_mb, mem_source = self._current_mem(latest)
            return {
                "gpu": self._backend_kind if self._gpus else "none",
                "degraded": self._degraded,
                "gpus": gpus,
                "util_pct": _r(latest.get("util_pct")),
                "power_w": _r(latest.get("power_w")),
                "process_mem_mb": _r(latest.get("process_mem_mb")),
                "device_used_mb": _r(latest.get("device_used_mb")),
                "rss_mb": _r(latest.get("rss_mb")),
                "mem_mb": _r(mem_mb),
                "mem_source": mem_source,
                "peak_mem_mb": _r(self._peak_mem()[0]),
                "contaminated": self._contaminated(),
            }

    def _current_mem(self, latest: dict[str, Any]) -> tuple[float | None, str]:
        if self._state.pid_seen and latest.get("process_mem_mb") is not None:
            return latest["process_mem_mb"], "nvml_process"
        if latest.get("device_used_mb") is not None:
            return latest["device_used_mb"], "nvml_device"
        if self._gpus and self._state.n_gpu_samples:
            return None, "nvml_device"
        return latest.get("rss_mb"), "rss"

    def _peak_mem(self) -> tuple[float | None, str]:
        peaks = self._state.peaks
        if self._state.pid_seen:
            return peaks.process_mem_mb, "nvml_process"
        if peaks.device_used_mb is not None:
            return peaks.device_used_mb, "nvml_device"
        return peaks.rss_mb, "rss"

    def _contaminated(self) -> bool:
        if self._state.pid_seen:
            return bool(self._state.foreign)
        return self._state.crowded

    def _build_report(self) -> dict[str, Any]:
        state = self._state
        peak_mem_mb, mem_source = self._peak_mem()
        power_s = state.power.span_s
        util_s = state.util.span_s
        if state.pid_seen:
            foreign = [f.as_dict() for f in state.foreign.values()]
            attribution = "pid"
        else:
            foreign = [f.as_dict() for f in state.foreign.values()] if state.crowded else []
            attribution = "pid" if not self._gpus else "none: NVML lists no PID of this run"
        return {
            "gpu": self._backend_kind if self._gpus else "none",
            "gpus": [
                {"index": g.ordinal, "nvml_index": g.nvml_index, "name": g.name, "uuid": g.uuid}
                for g in self._gpus
            ],
            "period_s": self.period_s,
            "n_samples": state.n_samples,
            "peak_mem_mb": _r(peak_mem_mb),
            "mem_source": mem_source,
            "peak_process_mem_mb": _r(state.peaks.process_mem_mb),
            "peak_device_used_mb": _r(state.peaks.device_used_mb),
            "peak_rss_mb": _r(state.peaks.rss_mb),
            "gpu_util_mean_pct": _r(state.util.total / util_s) if util_s else None,
            "power_mean_w": _r(state.power.total / power_s) if power_s else None,
            "power_max_w": _r(state.peaks.power_w),
            "energy_counter": self._counter_supported,
            "energy": dict(self._windows),
            "foreign_processes": foreign,
            "process_attribution": attribution,
            "contaminated": self._contaminated(),
            "series": self._series.export(),
            "degraded": self._degraded,
            "n_errors": state.n_errors,
            "errors": list(state.errors),
        }


def metrics_from_report(
    report: dict[str, Any],
    *,
    window: str = "steady",
    tokens_out: int | None = None,
    n_samples: int | None = None,
    n_correct: float | None = None,
) -> dict[str, Any]:
    """The flat result metrics a report gives: MEM, utilisation, power, and the window's energy.

    ``energy_j`` and the per-unit energies come from the window ``window`` (None when it is
    missing or flagged); ``energy_source`` and ``energy_flagged`` say where it came from or why not.
    """
    metrics = {key: report.get(key) for key in REPORT_METRIC_KEYS}
    entry = report.get("energy", {}).get(window)
    if entry is None:
        energy_j, source, flagged = None, None, f"no window {window!r} was measured"
    else:
        energy_j, source, flagged = entry["energy_j"], entry["source"], entry["flagged"]
    metrics.update(energy_metrics(energy_j, tokens_out, n_samples, n_correct))
    metrics["energy_source"] = source if energy_j is not None else None
    metrics["energy_flagged"] = flagged
    # Why NVML stopped answering (or never did); None when it answered throughout.
    metrics["telemetry_degraded"] = report.get("degraded")
    return metrics


def _empty_window(window: _Window, flagged: str | None) -> dict[str, Any]:
    return {
        "energy_j": None,
        "source": None,
        "flagged": flagged,
        "t_begin_s": round(window.t_begin_s, 6),
        "duration_s": None,
        "per_gpu_energy_j": None,
        "power_integral_j": None,
        "power_mean_w": None,
        "gpu_util_mean_pct": None,
    }


def _rss_mb(family: _Family) -> float | None:
    """Resident memory of the process tree, MiB; None when no member is readable."""
    total = 0
    seen = False
    for proc in family.values():
        if proc is None:
            continue
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
            seen = True
    return total / _MB if seen else None


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
