"""Starting and stopping worker processes without leaving orphans.

Each worker starts in a session (and process group) of its own, so a signal meant for the app
(Ctrl+C in the terminal, SSH hang-up) does not reach it and the scheduler decides how it ends.
torchrun starts every rank in yet another session, so signalling the worker's group is not
enough: ``WorkerProcess`` also tracks the worker's descendants (psutil, refreshed while it runs)
and signals each of them. Stopping is SIGTERM to all, a grace period, then SIGKILL to what is left.
If the scheduler itself is SIGKILLed, each worker gets SIGKILL from the kernel at once (Linux
``PR_SET_PDEATHSIG``, set between fork and exec); elsewhere the workers' stdout pipe breaks and
they die on their next event (their heartbeat comes every half second).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import IO

import psutil

from slmtui.spec import RunSpec

NO_NVLINK_MULTICAST: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""Always set: NVLink SHARP / multicast hangs or fails on shared and virtualised boxes."""

LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> object | None:
    """libc's prctl, looked up before any fork (nothing may be loaded between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with(parent_pid: int) -> None:
    """In the child, before exec: SIGKILL when the thread that started us ends (the scheduler's
    thread lives as long as the scheduler), so a killed scheduler leaves no worker behind."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL.value, 0, 0, 0)  # type: ignore[operator]
        if os.getppid() != parent_pid:  # the parent died before the line above
            os._exit(1)


def worker_command(
    spec: RunSpec,
    run_id: str,
    gpu_ids: Sequence[int],
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run ``spec`` on ``gpu_ids`` (NVML indices; empty = CPU).

    A run on several GPUs starts under torchrun (one process per GPU, rank 0 emits the events).
    """
    worker_args = ["-m", "slmtui.worker", "--spec-json", spec.to_json(), "--run-id", run_id]
    if len(gpu_ids) > 1:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(len(gpu_ids)),
            *worker_args,
        ]
    else:
        argv = [sys.executable, *worker_args]
    env = dict(os.environ if base_env is None else base_env)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "PYTHONUNBUFFERED": "1",
            **NO_NVLINK_MULTICAST,
        }
    )
    return argv, env


class WorkerProcess:
    """One worker: its process, its session, its descendants, its stderr log."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, *, serve: bool = False
    ) -> None:
        """``serve``: the worker takes more runs on its stdin (``send_run``)."""
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdin=subprocess.PIPE if serve else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                preexec_fn=partial(_die_with, os.getpid()) if _PRCTL is not None else None,
            )
        self.pid = self.proc.pid
        self._known: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            self._known[self.pid] = psutil.Process(self.pid)

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def send_run(self, line: bytes) -> bool:
        """Hand a serving worker its next run; False if its input is closed (it is going)."""
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            return False
        try:
            stdin.write(line)
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def end_input(self) -> None:
        """No more runs: a serving worker exits after the one it is on."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def track_descendants(self) -> None:
        """Remember the worker's current descendants (torchrun ranks live in other sessions)."""
        root = self._known.get(self.pid)
        if root is None:
            return
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                self._known.setdefault(child.pid, child)

    def signal_all(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker's process group and to every descendant seen so far."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        for pid, process in list(self._known.items()):
            if pid == self.pid and self.proc.returncode is not None:
                continue  # reaped: the pid may already belong to someone else
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)  # psutil refuses if the pid was reused

    def terminate(self) -> None:
        self.track_descendants()
        self.signal_all(signal.SIGTERM)

    def kill(self) -> None:
        self.track_descendants()
        self.signal_all(signal.SIGKILL)

    def survivors(self) -> list[int]:
        """Pids of the worker and its known descendants that still run."""
        alive = []
        for pid, process in self._known.items():
            if pid == self.pid:
                if self.proc.poll() is None:
                    alive.append(pid)
                continue
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def close(self) -> None:
        self.end_input()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=0)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last lines of a log file (at most ``chars`` characters); "" if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return tail[-chars:]


def describe_exit(returncode: int) -> str:
    """'exited with code 1' / 'was killed by SIGKILL' for a worker's exit status."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"
