"""Benchmark tasks: declared prompts and scoring, data loading, requests. No torch here.

Use::

    task = get_task("gsm8k")
    data = load_task_data("gsm8k", options, data_dir)        # file > data_dir > hub > sample
    settings, requests = build_requests(task, data, options)  # one request per data.items entry
    scored = [task.score(item, response, settings.mode) for item, response in ...]
    metrics = task.aggregate(scored)                          # {"exact_match": 0.41, ...}

Defaults per task (every one is a task option):

| task | mode(s) | few-shot | max new tokens | primary metric |
|---|---|---|---|---|
| gsm8k | generate | 5 (fixed CoT exemplars, up to 8) | 256 | exact_match |
| squad_v2 | generate | 0 | 32 | f1 |
| hellaswag | loglikelihood | 0 | - | acc_norm |
| arc_easy | generate, loglikelihood | 0 | 5 | acc |
| imdb | generate, loglikelihood | 0 | 5 | acc |
"""

from slmtui.tasks.base import Item, Scored, Task, TaskData
from slmtui.tasks.data import load_task_data
from slmtui.tasks.declared import DeclaredTask
from slmtui.tasks.prompts import FewshotSampler, TaskSettings, build_requests, resolve_settings
from slmtui.tasks.registry import TASK_NAMES, get_task

__all__ = [
    "TASK_NAMES",
    "DeclaredTask",
    "FewshotSampler",
    "Item",
    "Scored",
    "Task",
    "TaskData",
    "TaskSettings",
    "build_requests",
    "get_task",
    "load_task_data",
    "resolve_settings",
]
