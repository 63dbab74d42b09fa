"""Profiles: which models, tasks and GPU counts to run, as a TOML file.

Schema (every key optional unless marked; unknown keys are errors)::

    name = "offline"                 # default: the file name without .toml
    description = "..."              # one line shown in the console

    [settings]                       # defaults for every run
    dtype = "auto"                   # auto | bfloat16 | float16 | float32
    batch_size = 8                   # integer >= 1, or "auto" (sized from free GPU memory)
    engine = "fast"                  # fast | plain | llamacpp (GGUF files at their own
                                     # quantisation, llama.cpp: needs slmtui[llamacpp])
    gpus = [0]                       # GPU counts to run each model at: 0 (CPU), 1, 2, 4, 8
    parallel = "tp"                  # tp (tensor parallel) | dp (one replica per GPU)
    timeout_s = 3600                 # per-run wall-clock limit, load included; > 0
    limit = 50                       # samples per task (default: every item)
    seed = 0                         # few-shot / shuffling seed, integer >= 0
    data_dir = "../shared/data"      # <task>/*.jsonl in the hub schema
    carbon_intensity = "world"       # grid gCO2e/kWh for CO2 figures: a number >= 0 or a region
                                     # code of slmtui.carbon.GRID_INTENSITY (default "world")
    quantize = "none"                # none | int8 | int4: weight-only, applied at load (torchao)

    [[models]]                       # one table per model, at least one
    source = "smollm2-135m-instruct" # required: catalog name, hub id, local dir or .gguf file
    name = "SmolLM2-135M-Instruct"   # label in tables (default: from the source)
    gpus = [1]                       # overrides [settings]; so can dtype, batch_size, engine,
                                     # parallel, timeout_s and quantize

    [tasks.gsm8k]                    # one table per task, at least one; the table may be empty
    limit = 5                        # overrides [settings] limit; so can seed
    num_fewshot = 5                  # integer >= 0
    mode = "generate"                # the task's modes (see slmtui.tasks)
    max_new_tokens = 256             # integer >= 1
    data_file = "gsm8k.jsonl"        # one JSONL file in the hub schema

Relative paths (``data_dir``, ``data_file``, and a model ``source`` starting with ``./`` or
``../`` or ending in ``.gguf``) resolve against the profile file's folder, so a profile works from
any working directory. Values are checked on load; every problem is a one-line UserError naming
the file, the key path and what is allowed. A GPU count above what the machine has is not
checked here: the scheduler reports it when running.

A model may be listed twice under the same name with different ``quantize`` settings: the two
are different variants ("Qwen2.5-7B-Instruct" and "Qwen2.5-7B-Instruct · int4"). What a
quantisation needs (torchao installed, a kernel for the device: ``gpus = 0`` is the CPU) is
checked on load too, without importing torch (``slmtui.quantization``).

So is what an engine needs (``slmtui.spec.ENGINE_NEEDS``, without importing it): ``engine =
"llamacpp"`` runs a GGUF file (an offline catalog model or a ``.gguf`` path) at its own
quantisation, so it needs llama_cpp installed, ``quantize = "none"``, ``dtype = "auto"`` and at
most one GPU; its runs are a variant of their own ("SmolLM2-135M-Instruct · llama.cpp"), so the
same model may be listed once per engine like that.
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from slmtui.carbon import Grid, parse_grid
from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.quantization import check_quantize
from slmtui.spec import (
    DTYPES,
    ENGINE_NEEDS,
    ENGINES,
    PARALLEL_MODES,
    QUANTIZE,
    RunSpec,
    TaskOptions,
    model_label,
)

GPU_COUNTS: tuple[int, ...] = (0, 1, 2, 4, 8)
"""GPU counts a run may use; 0 runs on the CPU."""

DEFAULT_PROFILE_RESOURCE = "default_profile.toml"
"""Package data holding the embedded default (a copy of profiles/offline.toml)."""


@dataclass(frozen=True)
class Settings:
    """Defaults for every run of a profile."""

    dtype: str = "auto"
    batch_size: int | str = 8
    engine: str = "fast"
    gpus: tuple[int, ...] = (0,)
    """GPU counts to run each model at; 0 is the CPU."""
    parallel: str = "tp"
    timeout_s: float = 3600.0
    """Per-run wall-clock limit in seconds, model load included."""
    limit: int | None = None
    """Samples per task; ``None`` runs every item."""
    seed: int = 0
    data_dir: str | None = None
    """As written in the file; relative to the profile's folder."""
    carbon_intensity: str | float | None = None
    """Grid carbon intensity for CO2 figures: gCO2e/kWh or a region code (``slmtui.carbon``);
    ``None`` is the default (world average)."""
    quantize: str = "none"
    """Weight-only quantisation at load: none, int8 or int4."""

    @property
    def grid(self) -> Grid:
        return parse_grid(self.carbon_intensity)


@dataclass(frozen=True)
class ModelEntry:
    """One ``[[models]]`` table; ``None`` fields take the profile's ``[settings]``."""

    name: str
    source: str
    """Catalog name, hub id, local directory or ``.gguf`` file, as written."""
    gpus: tuple[int, ...] | None = None
    dtype: str | None = None
    batch_size: int | str | None = None
    engine: str | None = None
    parallel: str | None = None
    timeout_s: float | None = None
    quantize: str | None = None
    """none, int8 or int4; the same name may appear once per setting (two variants)."""


@dataclass(frozen=True)
class TaskEntry:
    """One ``[tasks.<name>]`` table; ``None`` fields take ``[settings]`` or the task's default."""

    name: str
    limit: int | None = None
    num_fewshot: int | None = None
    mode: str | None = None
    max_new_tokens: int | None = None
    data_file: str | None = None
    """As written in the file; relative to the profile's folder."""
    seed: int | None = None


@dataclass(frozen=True)
class Profile:
    """A parsed, validated profile. ``path`` is where it was read from (``None``: embedded)."""

    name: str
    models: tuple[ModelEntry, ...]
    tasks: tuple[TaskEntry, ...]
    settings: Settings = field(default_factory=Settings)
    description: str = ""
    path: Path | None = field(default=None, compare=False)

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the profile resolve against."""
        return self.path.parent if self.path is not None else Path.cwd()

    def runs(
        self,
        limit: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        gpus_available: int | None = None,
    ) -> list[RunSpec]:
        """Every run of the profile: models x tasks x GPU counts, in file order.

        ``limit`` and ``data_dir`` (the command line's) override the profile's. With
        ``gpus_available``, runs needing more GPUs than that are left out (compare with
        ``runs()`` to tell the user what was dropped). Model sources are resolved through
        ``slmtui.catalog.resolve_model``; an unknown source, a missing data folder or data file
        is a UserError.
        """
        from slmtui.catalog import resolve_model

        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise UserError(f"--limit must be an integer >= 1, got {limit}")
        where = self._label()
        if data_dir is not None:
            run_data_dir: str | None = str(Path(data_dir).expanduser().resolve())
            if not Path(run_data_dir).is_dir():
                raise UserError(
                    f"--data-dir {data_dir}: not a directory; expected <data_dir>/<task>/*.jsonl"
                )
        else:
            run_data_dir = self._resolve_path(self.settings.data_dir)
            if run_data_dir is not None and not Path(run_data_dir).is_dir():
                raise UserError(
                    f"{where}: [settings] data_dir '{self.settings.data_dir}' is not a directory "
                    f"({run_data_dir}); expected <data_dir>/<task>/*.jsonl"
                )
        for task in self.tasks:
            data_file = self._resolve_path(task.data_file)
            if data_file is not None and not Path(data_file).is_file():
                raise UserError(
                    f"{where}: [tasks.{task.name}] data_file '{task.data_file}' is not a file "
                    f"({data_file})"
                )
        specs: list[RunSpec] = []
        for index, entry in enumerate(self.models, start=1):
            place = f"[[models]] #{index}"
            problem = engine_problem(entry, self.settings, place) or quantize_problem(
                entry, self.settings, place
            )
            if problem is not None:
                raise UserError(f"{where}: {problem}")
            source = self._resolve_source(entry.source)
            try:
                ref = resolve_model(source)
            except UserError as exc:
                raise UserError(f"{where}: [[models]] #{index} source: {exc}") from None
            model = replace(ref, name=entry.name)
            gpu_counts = entry.gpus if entry.gpus is not None else self.settings.gpus
            for task in self.tasks:
                options = TaskOptions(
                    limit=limit if limit is not None else _first(task.limit, self.settings.limit),
                    num_fewshot=task.num_fewshot,
                    mode=task.mode,
                    max_new_tokens=task.max_new_tokens,
                    data_file=self._resolve_path(task.data_file),
                    seed=_first(task.seed, self.settings.seed),
                )
                for gpus in gpu_counts:
                    if gpus_available is not None and gpus > gpus_available:
                        continue
                    specs.append(
                        RunSpec(
                            model=model,
                            task=task.name,
                            options=options,
                            gpus=gpus,
                            parallel=_first(entry.parallel, self.settings.parallel),
                            dtype=_first(entry.dtype, self.settings.dtype),
                            batch_size=_first(entry.batch_size, self.settings.batch_size),
                            engine=_first(entry.engine, self.settings.engine),
                            data_dir=run_data_dir,
                            timeout_s=_first(entry.timeout_s, self.settings.timeout_s),
                            quantize=_first(entry.quantize, self.settings.quantize),
                        )
                    )
        return specs

    def _label(self) -> str:
        return str(self.path) if self.path is not None else f"profile '{self.name}'"

    def _resolve_path(self, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (self.base_dir / path).resolve())

    def _resolve_source(self, source: str) -> str:
        resolved = self._resolve_path(source) if _is_path_source(source) else None
        return resolved or source


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def engine_problem(entry: ModelEntry, settings: Settings, where: str) -> str | None:
    """Why ``entry``'s engine cannot run it (``where`` names the model's table), or None.

    Reads ``spec.ENGINE_NEEDS``: a library looked up without importing it, GGUF-only sources,
    an engine that computes with the file's own weights (dtype "auto", quantize "none"), the
    most GPUs. Checked on load and again by ``Profile.runs``, as ``quantize_problem``.
    """
    engine = _first(entry.engine, settings.engine)
    needs = ENGINE_NEEDS.get(engine)
    if needs is None:
        return None  # an unknown name is refused where it is read
    origin = "" if entry.engine is not None else " (from [settings])"
    head = f"{where} engine {_show(engine)}{origin}"
    if needs.gguf_only and not _is_gguf_source(entry.source):
        return (
            f"{head} runs GGUF files only (an offline model or a .gguf file), not source "
            f'{_show(entry.source)}; use engine "fast" for it'
        )
    if needs.library is not None and not library_installed(needs.library):
        return f"{head} needs {needs.library}, which is not installed; {needs.install}"
    if needs.own_weights:
        quantize = _first(entry.quantize, settings.quantize)
        if quantize != "none":
            return (
                f"{head} runs the GGUF file at its own quantisation: quantize must be "
                f'"none", got {_show(quantize)}'
            )
        dtype = _first(entry.dtype, settings.dtype)
        if dtype != "auto":
            return (
                f'{head} computes with the GGUF file\'s own types: dtype must be "auto", '
                f"got {_show(dtype)}"
            )
    gpus = entry.gpus if entry.gpus is not None else settings.gpus
    too_many = [g for g in gpus if needs.max_gpus is not None and g > needs.max_gpus]
    if too_many:
        allowed = "the CPU or one GPU" if needs.max_gpus == 1 else f"at most {needs.max_gpus} GPUs"
        return f"{head} runs on {allowed}, not gpus = {list(too_many)}"
    return None


def _is_gguf_source(source: str) -> bool:
    from slmtui.catalog import is_gguf_source

    return is_gguf_source(source)


def library_installed(name: str) -> bool:
    """Whether ``name`` is importable, found without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def quantize_problem(entry: ModelEntry, settings: Settings, where: str) -> str | None:
    """Why ``entry``'s quantize setting cannot run (``where`` names the model's table), or None.

    Checked on load and again by ``Profile.runs`` (the console edits models after loading).
    """
    quantize = _first(entry.quantize, settings.quantize)
    gpus = entry.gpus if entry.gpus is not None else settings.gpus
    try:
        check_quantize(quantize, gpus, _first(entry.dtype, settings.dtype))
    except UserError as exc:
        origin = "" if entry.quantize is not None else " (from [settings])"
        return f"{where} quantize {_show(quantize)}{origin}: {exc}"
    return None


def _is_path_source(source: str) -> bool:
    """Whether a model source names a file or folder (so it resolves against the profile)."""
    return (
        source.startswith(("./", "../", "~", "/"))
        or source.lower().endswith(".gguf")
        or os.path.isabs(source)
    )


# -- loading ------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "description", "settings", "models", "tasks")
_SETTINGS_KEYS = tuple(f.name for f in fields(Settings))
_MODEL_KEYS = tuple(f.name for f in fields(ModelEntry))
_TASK_KEYS = tuple(f.name for f in fields(TaskEntry) if f.name != "name")


class _Checker:
    """Typed reads of one TOML table with errors naming the file and the key path."""

    def __init__(self, label: str) -> None:
        self.label = label

    def fail(self, where: str, message: str) -> UserError:
        prefix = f"{self.label}: {where} " if where else f"{self.label}: "
        return UserError(prefix + message)

    def keys(self, table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key not in allowed:
                hint = did_you_mean(key, allowed) or f"; allowed: {allowed_list(allowed)}"
                what = "unknown top-level key" if not where else "unknown key"
                raise self.fail(where, f"{what} '{key}'{hint}")

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail("", f"{where} must be a table, got {_show(value)}")
        return value

    def string(self, table: Mapping[str, Any], key: str, where: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"{key} must be a non-empty string, got {_show(value)}")
        return value

    def integer(self, table: Mapping[str, Any], key: str, where: str, minimum: int) -> int | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"{key} must be an integer >= {minimum}, got {_show(value)}")
        return value

    def batch_size(self, table: Mapping[str, Any], where: str) -> int | str | None:
        """An integer >= 1, or "auto" (the engine sizes it from free memory and says so)."""
        if table.get("batch_size") == "auto":
            return "auto"
        value = table.get("batch_size")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise self.fail(
                where, f'batch_size must be an integer >= 1 or "auto", got {_show(value)}'
            )
        return value

    def positive(self, table: Mapping[str, Any], key: str, where: str) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.fail(where, f"{key} must be a number > 0, got {_show(value)}")
        return float(value)

    def choice(
        self, table: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...]
    ) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or value not in allowed:
            hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
            raise self.fail(
                where, f"{key} must be {allowed_list(allowed)}, got {_show(value)}{hint}"
            )
        return value

    def gpus(self, table: Mapping[str, Any], where: str) -> tuple[int, ...] | None:
        value = table.get("gpus")
        if value is None:
            return None
        counts = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        ok = (
            isinstance(counts, list)
            and counts
            and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
            and all(c in GPU_COUNTS for c in counts)
            and len(set(counts)) == len(counts)
        )
        if not ok:
            raise self.fail(
                where,
                "gpus must be a list of distinct GPU counts from "
                f"{', '.join(map(str, GPU_COUNTS))} (0 = CPU), got {_show(value)}",
            )
        return tuple(counts)


def _show(value: Any) -> str:
    """A value as the error message quotes it: TOML-like, strings in double quotes."""
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def checked_runs(
    profile: Profile,
    *,
    where: str,
    limit: int | None = None,
    data_dir: str | None = None,
    timeout_s: float | None = None,
    gpus_available: int | None = None,
) -> list[RunSpec]:
    """The driver core: a profile plus the command line's overrides as run specs, with every
    check that can fail before a worker starts (``check_overrides``, ``check_runs``). The
    headless run uses it; the console builds the same specs (``Selection.specs``) and runs
    ``check_runs`` at launch."""
    check_overrides(limit, timeout_s, data_dir)
    specs = profile.runs(limit=limit, data_dir=data_dir, gpus_available=gpus_available)
    check_runs(specs, where)
    if timeout_s is not None:
        specs = [replace(spec, timeout_s=float(timeout_s)) for spec in specs]
    return specs


def check_runs(specs: Iterable[RunSpec], where: str) -> None:
    """What a worker would only find later, as one-line user errors before anything is
    written: a hub model missing offline, a line of a local data file that breaks the task's
    schema."""
    from slmtui.catalog import hub_model_unavailable
    from slmtui.tasks.data import check_local_data

    specs = list(specs)
    for source in dict.fromkeys(s.model.source for s in specs if s.model.kind == "hub"):
        if (why := hub_model_unavailable(source)) is not None:
            raise UserError(f"{where}: {why}")
    for task, options, data_dir in dict.fromkeys(
        (s.task, replace(s.options, limit=None), s.data_dir) for s in specs
    ):
        check_local_data(task, options, data_dir)


def check_overrides(
    limit: int | None = None,
    timeout_s: float | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> None:
    """The command line's overrides of a profile (``slmtui run``, headless or console), checked
    before anything is opened or written."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be an integer >= 1")
    if timeout_s is not None and not timeout_s > 0:
        raise UserError(f"--timeout {timeout_s:g}: must be a number of seconds > 0")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise UserError(
            f"--data-dir {data_dir}: no such directory; give a folder of <task>/*.jsonl files"
        )


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile file; UserError (one line) on any problem."""
    path = Path(path)
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"profile '{label}' not found") from None
    except IsADirectoryError:
        raise UserError(f"profile '{label}' is a directory, not a .toml file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"profile '{label}' cannot be read: {exc}") from None
    return parse_profile(text, label=label, path=path.resolve(), default_name=path.stem)


def parse_profile(
    text: str, *, label: str, path: Path | None = None, default_name: str = "profile"
) -> Profile:
    """Validate profile TOML text; ``label`` names it in errors, ``path`` anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{label}: TOML syntax error: {exc}") from None
    check = _Checker(label)
    check.keys(data, _TOP_KEYS, "")
    name = check.string(data, "name", "") or default_name
    description = check.string(data, "description", "") or ""
    settings = _parse_settings(check, check.table(data.get("settings", {}), "[settings]"))
    models = _parse_models(check, data.get("models"), settings)
    tasks = _parse_tasks(check, check.table(data.get("tasks", {}), "[tasks]"))
    return Profile(
        name=name,
        models=models,
        tasks=tasks,
        settings=settings,
        description=description,
        path=path,
    )


def _parse_settings(check: _Checker, table: dict[str, Any]) -> Settings:
    where = "[settings]"
    check.keys(table, _SETTINGS_KEYS, where)
    defaults = Settings()
    return Settings(
        dtype=check.choice(table, "dtype", where, DTYPES) or defaults.dtype,
        batch_size=_first(check.batch_size(table, where), defaults.batch_size),
        engine=check.choice(table, "engine", where, ENGINES) or defaults.engine,
        gpus=check.gpus(table, where) or defaults.gpus,
        parallel=check.choice(table, "parallel", where, PARALLEL_MODES) or defaults.parallel,
        timeout_s=_first(check.positive(table, "timeout_s", where), defaults.timeout_s),
        limit=check.integer(table, "limit", where, 1),
        seed=_first(check.integer(table, "seed", where, 0), defaults.seed),
        data_dir=check.string(table, "data_dir", where),
        carbon_intensity=_carbon_intensity(check, table, where),
        quantize=check.choice(table, "quantize", where, QUANTIZE) or defaults.quantize,
    )


def _carbon_intensity(check: _Checker, table: Mapping[str, Any], where: str) -> str | float | None:
    value = table.get("carbon_intensity")
    if value is None:
        return None
    try:
        parse_grid(value, where="carbon_intensity")
    except UserError as exc:
        raise check.fail(where, str(exc)) from None
    return value if isinstance(value, str) else float(value)


def _parse_models(check: _Checker, value: Any, settings: Settings) -> tuple[ModelEntry, ...]:
    if value is None or value == []:
        raise check.fail("", "no models; add a [[models]] table with a source")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise check.fail("", f"models must be [[models]] tables, got {_show(value)}")
    entries: list[ModelEntry] = []
    seen: dict[str, int] = {}  # model label ('name' or 'name · int4') -> the table using it
    for index, table in enumerate(value, start=1):
        where = f"[[models]] #{index}"
        check.keys(table, _MODEL_KEYS, where)
        source = check.string(table, "source", where)
        if source is None:
            raise check.fail(
                where, "needs source (a catalog name, hub id, local directory or .gguf file)"
            )
        name = check.string(table, "name", where) or default_model_name(source)
        entry = ModelEntry(
            name=name,
            source=source,
            gpus=check.gpus(table, where),
            dtype=check.choice(table, "dtype", where, DTYPES),
            batch_size=check.batch_size(table, where),
            engine=check.choice(table, "engine", where, ENGINES),
            parallel=check.choice(table, "parallel", where, PARALLEL_MODES),
            timeout_s=check.positive(table, "timeout_s", where),
            quantize=check.choice(table, "quantize", where, QUANTIZE),
        )
        quantize = _first(entry.quantize, settings.quantize)
        label = model_label(name, quantize, _first(entry.engine, settings.engine))
        if label in seen:
            raise check.fail(where, f"name '{name}' is already used by [[models]] #{seen[label]}")
        seen[label] = index
        problem = engine_problem(entry, settings, where) or quantize_problem(entry, settings, where)
        if problem is not None:
            raise check.fail("", problem)
        entries.append(entry)
    return tuple(entries)


def _parse_tasks(check: _Checker, tables: dict[str, Any]) -> tuple[TaskEntry, ...]:
    from slmtui.tasks import TASK_NAMES, get_task

    if not tables:
        raise check.fail(
            "", f"no tasks; add a [tasks.<name>] table, <name> one of {allowed_list(TASK_NAMES)}"
        )
    entries: list[TaskEntry] = []
    for name, value in tables.items():
        where = f"[tasks.{name}]"
        if name not in TASK_NAMES:
            hint = did_you_mean(name, TASK_NAMES) or f"; allowed: {allowed_list(TASK_NAMES)}"
            raise check.fail(where, f"unknown task '{name}'{hint}")
        table = check.table(value, where)
        check.keys(table, _TASK_KEYS, where)
        entries.append(
            TaskEntry(
                name=name,
                limit=check.integer(table, "limit", where, 1),
                num_fewshot=check.integer(table, "num_fewshot", where, 0),
                mode=check.choice(table, "mode", where, tuple(get_task(name).modes)),
                max_new_tokens=check.integer(table, "max_new_tokens", where, 1),
                data_file=check.string(table, "data_file", where),
                seed=check.integer(table, "seed", where, 0),
            )
        )
    return tuple(entries)


def default_model_name(source: str) -> str:
    """A label from a source: the hub id's or path's last part, without ``.gguf``."""
    last = source.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    return last[: -len(".gguf")] if last.lower().endswith(".gguf") else last


def embedded_default() -> Profile:
    """The offline profile shipped inside the package (identical to ``profiles/offline.toml``)."""
    text = resources.files("slmtui").joinpath(DEFAULT_PROFILE_RESOURCE).read_text("utf-8")
    return parse_profile(text, label=f"embedded {DEFAULT_PROFILE_RESOURCE}", default_name="offline")


# -- saving -------------------------------------------------------------------------------------


def profile_to_dict(profile: Profile, *, base_dir: Path | None = None) -> dict[str, Any]:
    """The TOML document of a profile; relative paths are rebased onto ``base_dir``."""
    target = (base_dir or profile.base_dir).resolve()

    def rebase(value: str | None) -> str | None:
        if value is None or Path(value).expanduser().is_absolute() or value.startswith("~"):
            return value
        absolute = (profile.base_dir / value).resolve()
        return Path(os.path.relpath(absolute, target)).as_posix()

    settings = profile.settings
    doc: dict[str, Any] = {"name": profile.name}
    if profile.description:
        doc["description"] = profile.description
    doc["settings"] = _without_none(
        {
            "dtype": settings.dtype,
            "batch_size": settings.batch_size,
            "engine": settings.engine,
            "gpus": list(settings.gpus),
            "parallel": settings.parallel,
            "timeout_s": settings.timeout_s,
            "limit": settings.limit,
            "seed": settings.seed,
            "data_dir": rebase(settings.data_dir),
            "carbon_intensity": settings.carbon_intensity,
            "quantize": settings.quantize if settings.quantize != "none" else None,
        }
    )
    doc["models"] = [
        _without_none(
            {
                "name": m.name,
                "source": rebase(m.source) if _is_path_source(m.source) else m.source,
                "gpus": list(m.gpus) if m.gpus is not None else None,
                "dtype": m.dtype,
                "batch_size": m.batch_size,
                "engine": m.engine,
                "parallel": m.parallel,
                "timeout_s": m.timeout_s,
                "quantize": m.quantize,
            }
        )
        for m in profile.models
    ]
    doc["tasks"] = {
        t.name: _without_none(
            {
                "limit": t.limit,
                "num_fewshot": t.num_fewshot,
                "mode": t.mode,
                "max_new_tokens": t.max_new_tokens,
                "data_file": rebase(t.data_file),
                "seed": t.seed,
            }
        )
        for t in profile.tasks
    }
    return doc


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Profile:
    """Write ``profile`` to ``path`` atomically (temp file + rename); returns it as saved there.

    Relative paths are rewritten to stay correct from the new folder. Comments are not kept.
    """
    path = Path(path).resolve()
    doc = profile_to_dict(profile, base_dir=path.parent)
    text = (
        "# slmtui profile (schema: see slmtui/profile.py or profiles/offline.toml)\n\n"
        + tomli_w.dumps(doc)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return parse_profile(text, label=str(path), path=path, default_name=path.stem)


__all__ = [
    "GPU_COUNTS",
    "ModelEntry",
    "Profile",
    "Settings",
    "TaskEntry",
    "default_model_name",
    "embedded_default",
    "load_profile",
    "parse_profile",
    "save_profile",
]
