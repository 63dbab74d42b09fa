"""Loading a task's items: explicit file, then data directory, then the hub, then the sample set.

Order (the first that has items wins):

1. ``options.data_file``: one JSONL file in the task's hub schema (source "file"); must exist.
2. ``<data_dir>/<task>/*.jsonl``, files in name order (source "data_dir"); a ``data_dir`` that
   does not exist is an error, a missing ``<task>`` folder in it falls through.
3. The Hugging Face hub through ``datasets`` (source "hub"), imported only here. Skipped at once
   when ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` is set, when ``datasets`` is not installed or
   when the hub's host does not answer a TCP connect within ``HUB_PROBE_TIMEOUT_S``; any failure
   of ``load_dataset`` also counts as "hub unavailable". Library output goes to stderr (the
   worker's stdout carries events only).
4. The embedded sample set, ``slmtui/tasks/samples/<task>.jsonl`` (source "sample"): items written
   for slmtui, never the benchmark; results say so.

Every document is checked against the task's schema; a bad one raises a UserError naming the
file, the line and the field. Items keep file order (hub rows of splits stored sorted by label
are shuffled with the run's seed, see ``hub_shuffle``); ``options.limit`` keeps the first items.
Item ids: the dataset's id when present, else "<task>-<index>" (0-based, in load order);
duplicates get "#2", "#3"... appended.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from slmtui.errors import UserError
from slmtui.spec import TaskOptions
from slmtui.tasks.base import Item, TaskData
from slmtui.tasks.declared import DeclaredTask, FieldError
from slmtui.tasks.registry import get_task

HUB_PROBE_TIMEOUT_S = 2.0
"""How long the hub's host may take to accept a TCP connection before the hub counts as away."""
_TRUE = {"1", "true", "yes", "on"}
_hub_reachable_cache: dict[str, bool] = {}


def load_task_data(task_name: str, options: TaskOptions, data_dir: str | None) -> TaskData:
    """The task's items from the first source that has them (see the module docstring)."""
    task = get_task(task_name)
    if options.limit is not None and options.limit < 1:
        raise UserError(f"task {task.name}: limit {options.limit} must be 1 or more")

    if options.data_file:
        path = Path(options.data_file).expanduser()
        if not path.is_file():
            raise UserError(f"task {task.name}: data_file '{options.data_file}' is not a file")
        docs = _read_jsonl(path)
        return _task_data(task, docs, options, source="file", location=str(path))

    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UserError(
                f"data_dir '{data_dir}' is not a directory; expected <data_dir>/<task>/*.jsonl"
            )
        files = sorted((root / task.name).glob("*.jsonl"))
        if files:
            docs = [doc for path in files for doc in _read_jsonl(path)]
            return _task_data(
                task, docs, options, source="data_dir", location=str(root / task.name)
            )

    hub_rows = _hub_rows(task)
    if hub_rows is not None:
        label = f"{task.hub_id}" + (f" ({task.hub_config})" if task.hub_config else "")
        location = f"{label} split {task.hub_split}"
        docs = [(f"hub {location}", i + 1, row) for i, row in enumerate(hub_rows)]
        if task.hub_shuffle:
            random.Random(f"{task.name}:{options.seed}").shuffle(docs)
        return _task_data(task, docs, options, source="hub", location=location)

    sample = resources.files("slmtui.tasks").joinpath("samples", f"{task.name}.jsonl")
    with resources.as_file(sample) as path:
        docs = _read_jsonl(Path(path), label=f"slmtui/tasks/samples/{task.name}.jsonl")
    return _task_data(
        task, docs, options, source="sample", location=f"slmtui/tasks/samples/{task.name}.jsonl"
    )


def check_local_data(task_name: str, options: TaskOptions, data_dir: str | None) -> None:
    """Validate every line of the local files a run would read: ``data_file``, else
    ``<data_dir>/<task>/*.jsonl``. The app calls this before any worker starts, so a bad line is a
    user error (file, line, field) that writes nothing; the hub and the sample set are left alone.
    """
    task = get_task(task_name)
    local = bool(options.data_file) or (
        bool(data_dir) and any((Path(str(data_dir)).expanduser() / task.name).glob("*.jsonl"))
    )
    if local:
        load_task_data(task_name, options, data_dir)


# -- documents ----------------------------------------------------------------------------------

Doc = tuple[str, int, Any]
"""(where: file or hub label, line or row number from 1, the parsed value)."""


def _read_jsonl(path: Path, label: str | None = None) -> list[Doc]:
    where = label or str(path)
    docs: list[Doc] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{where} line {lineno}: not valid JSON ({exc.msg})") from exc
                docs.append((where, lineno, value))
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise UserError(f"{where}: cannot read ({exc.strerror})") from exc
    return docs


def _task_data(
    task: DeclaredTask, docs: list[Doc], options: TaskOptions, *, source: str, location: str
) -> TaskData:
    items = list(_items(task, docs))
    if not items:
        raise UserError(f"task {task.name}: {location} holds no items")
    limited = items[: options.limit] if options.limit is not None else items
    return TaskData(items=limited, source=source, location=location, fewshot_pool=items)


def _items(task: DeclaredTask, docs: Iterable[Doc]) -> Iterator[Item]:
    seen: dict[str, int] = {}
    for index, (where, lineno, doc) in enumerate(docs):
        unit = "row" if where.startswith("hub ") else "line"
        if not isinstance(doc, dict):
            raise UserError(
                f"{where} {unit} {lineno}: must be a JSON object, not {type(doc).__name__}"
            )
        try:
            task.check_doc(doc)
        except FieldError as exc:
            raise UserError(f"{where} {unit} {lineno}: {exc}") from exc
        item_id = task.item_id(doc, index)
        count = seen.get(item_id, 0) + 1
        seen[item_id] = count
        yield Item(id=item_id if count == 1 else f"{item_id}#{count}", doc=doc)


# -- the hub ------------------------------------------------------------------------------------


def hub_disabled() -> bool:
    """The environment says offline, or ``datasets`` is not installed."""
    if any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    ):
        return True
    from importlib.util import find_spec

    return find_spec("datasets") is None


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout_s`` (cached per host).

    The probe runs in a daemon thread so a hanging DNS lookup cannot hold the caller longer.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key in _hub_reachable_cache:
        return _hub_reachable_cache[key]
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="slmtui-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    reachable = bool(result and result[0])
    _hub_reachable_cache[key] = reachable
    return reachable


def _hub_rows(task: DeclaredTask) -> list[dict[str, Any]] | None:
    """The task's split from the hub, or None when the hub is unavailable for any reason."""
    if hub_disabled() or not hub_reachable():
        return None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import datasets

            dataset = datasets.load_dataset(task.hub_id, task.hub_config, split=task.hub_split)
            return [dict(row) for row in dataset]
    except Exception:  # any failure means "hub unavailable": fall through to the sample set
        return None
