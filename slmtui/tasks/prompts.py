"""From loaded items to requests: effective settings, few-shot draw, one request per item.

Few-shot examples (tasks without fixed exemplars) come from one seeded draw over the whole loaded
data (``TaskData.fewshot_pool``, before ``limit``): the draw orders the pool once by
``Random(f"{task}:{seed}")`` and every item takes the first ``k`` of that order that are not the
item itself. So all items share the same examples except where an item would see itself (it then
gets the next one), the examples do not change with ``limit``, and two runs with the same seed
send the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from slmtui.errors import UserError
from slmtui.spec import TaskOptions
from slmtui.tasks.base import Item, Request, TaskData
from slmtui.tasks.declared import DeclaredTask


@dataclass(frozen=True)
class TaskSettings:
    """The options of one run with every default filled in."""

    mode: str
    num_fewshot: int
    max_new_tokens: int
    """Token budget per generate request (unused in loglikelihood mode)."""
    seed: int


def resolve_settings(task: DeclaredTask, options: TaskOptions) -> TaskSettings:
    """Fill the task's defaults into ``options``; UserError on a mode or count the task refuses."""
    mode = options.mode or task.default_mode
    task.check_mode(mode)
    num_fewshot = task.default_num_fewshot if options.num_fewshot is None else options.num_fewshot
    if num_fewshot < 0:
        raise UserError(f"task {task.name}: num_fewshot {num_fewshot} must be 0 or more")
    if task.fixed_fewshot and num_fewshot > len(task.fixed_fewshot):
        raise UserError(
            f"task {task.name}: num_fewshot {num_fewshot} is more than its "
            f"{len(task.fixed_fewshot)} fixed examples; allowed: 0 to {len(task.fixed_fewshot)}"
        )
    max_new_tokens = (
        task.default_max_new_tokens if options.max_new_tokens is None else options.max_new_tokens
    )
    if max_new_tokens < 1:
        raise UserError(f"task {task.name}: max_new_tokens {max_new_tokens} must be 1 or more")
    return TaskSettings(
        mode=mode, num_fewshot=num_fewshot, max_new_tokens=max_new_tokens, seed=options.seed
    )


class FewshotSampler:
    """Picks each item's few-shot examples (see the module docstring)."""

    def __init__(self, task: DeclaredTask, pool: list[Item], k: int, seed: int) -> None:
        self.k = k
        if task.fixed_fewshot:
            self._order = list(task.fixed_fewshot[:k])
            return
        if k > 0 and k > len(pool) - 1:
            raise UserError(
                f"task {task.name}: num_fewshot {k} needs {k + 1} items but the data has "
                f"{len(pool)}; allowed: 0 to {max(0, len(pool) - 1)}"
            )
        rng = random.Random(f"{task.name}:{seed}")
        # k + 1 candidates: enough to skip the item itself once.
        self._order = rng.sample(pool, min(len(pool), k + 1)) if k > 0 else []

    def for_item(self, item: Item) -> list[Item]:
        return [shot for shot in self._order if shot.id != item.id][: self.k]


def build_requests(
    task: DeclaredTask, data: TaskData, options: TaskOptions
) -> tuple[TaskSettings, list[Request]]:
    """The effective settings and one request per item of ``data.items``, in order."""
    settings = resolve_settings(task, options)
    pool = data.fewshot_pool or data.items
    sampler = FewshotSampler(task, pool, settings.num_fewshot, settings.seed)
    requests = [
        task.build_request(item, sampler.for_item(item), settings.mode, settings.max_new_tokens)
        for item in data.items
    ]
    return settings, requests
