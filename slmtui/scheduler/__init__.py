"""GPU inventory, packing runs on GPUs, launching workers, reading their event streams."""

from slmtui.scheduler.gpus import Gpu, detect_gpus
from slmtui.scheduler.launch import worker_command
from slmtui.scheduler.packing import Assignment, Pending, check_fits, pack
from slmtui.scheduler.scheduler import Scheduler

__all__ = [
    "Assignment",
    "Gpu",
    "Pending",
    "Scheduler",
    "check_fits",
    "detect_gpus",
    "pack",
    "worker_command",
]
