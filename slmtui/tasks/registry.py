"""The declared tasks by name. Unknown names get a one-line UserError with "did you mean"."""

from __future__ import annotations

from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.tasks.arc_easy import ArcEasyTask
from slmtui.tasks.declared import DeclaredTask
from slmtui.tasks.gsm8k import Gsm8kTask
from slmtui.tasks.hellaswag import HellaswagTask
from slmtui.tasks.imdb import ImdbTask
from slmtui.tasks.squad_v2 import SquadV2Task

_TASKS: dict[str, DeclaredTask] = {
    task.name: task
    for task in (Gsm8kTask(), SquadV2Task(), HellaswagTask(), ArcEasyTask(), ImdbTask())
}

TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
"""gsm8k, squad_v2, hellaswag, arc_easy, imdb (the study's five tasks)."""


def get_task(name: str) -> DeclaredTask:
    """The task called ``name``; UserError naming the allowed tasks otherwise."""
    task = _TASKS.get(name)
    if task is None:
        raise UserError(
            f"unknown task '{name}'{did_you_mean(name, TASK_NAMES)}; "
            f"allowed: {allowed_list(TASK_NAMES)}"
        )
    return task
