"""What the Pick tab edits: models, tasks and their settings, turned back into a Profile.

Textual-free, so the same rules are tested without an app. A ``Selection`` starts from a
profile; every edit keeps it valid (GPU counts the box has, the task's own modes), and
``to_profile`` gives the profile that is launched or saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from slmtui.errors import UserError
from slmtui.profile import GPU_COUNTS, ModelEntry, Profile, Settings, TaskEntry
from slmtui.spec import DTYPES, QUANTIZE, RunSpec, model_label
from slmtui.tasks import TASK_NAMES, get_task

BATCH_SIZES: tuple[int | str, ...] = (1, 2, 4, 8, 16, 32, 64, "auto")
"""The batch-size cycle in Pick (``b``); "auto": the engine sizes it from free memory."""
"""Batch sizes the Pick tab cycles through (a profile may hold any integer >= 1)."""


@dataclass
class ModelChoice:
    """One model row of the Pick tab."""

    entry: ModelEntry
    """As the profile (or the user) gave it; name and source are kept as written."""
    gpus: tuple[int, ...]
    """GPU counts to run at (0 = CPU), only counts the box has."""
    dtype: str
    batch_size: int | str
    selected: bool = True
    quantize: str = "none"
    """Weight-only quantisation: none, int8 or int4 (``slmtui.quantization``)."""
    settings_engine: str | None = None
    """``[settings] engine``, which the model runs on when its entry names none."""

    @property
    def engine(self) -> str | None:
        """The engine the model's runs get: its entry's, else the settings'."""
        return self.entry.engine if self.entry.engine is not None else self.settings_engine

    @property
    def label(self) -> str:
        """'name', 'name · int4' or 'name · llama.cpp': what tells variants of a model apart
        (the label its runs will have, so the settings' engine counts)."""
        return model_label(self.entry.name, self.quantize, self.engine)


@dataclass
class TaskChoice:
    """One task row of the Pick tab; ``None`` options take the task's default."""

    name: str
    selected: bool = True
    limit: int | None = None
    num_fewshot: int | None = None
    mode: str | None = None
    entry: TaskEntry | None = None
    """The profile's table for this task, when it had one (max_new_tokens, data_file, seed)."""

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(get_task(self.name).modes)

    @property
    def shown_mode(self) -> str:
        return self.mode or get_task(self.name).default_mode

    @property
    def shown_fewshot(self) -> int:
        return (
            self.num_fewshot
            if self.num_fewshot is not None
            else get_task(self.name).default_num_fewshot
        )


@dataclass
class Selection:
    """The console's editable copy of a profile (see the module docstring)."""

    profile: Profile
    models: list[ModelChoice]
    tasks: list[TaskChoice]
    gpus_available: int = 0
    notes: list[str] = field(default_factory=list)
    """What loading had to change (GPU counts the box lacks), for the user."""
    data_dir: str | None = None
    """The command line's ``--data-dir``: every run's data folder (it is part of a run's key)."""
    timeout_s: float | None = None
    """The command line's ``--timeout``: every run's wall-clock limit."""

    @classmethod
    def from_profile(
        cls,
        profile: Profile,
        gpus_available: int = 0,
        data_dir: str | None = None,
        timeout_s: float | None = None,
    ) -> Selection:
        """Every profile model selected; the five tasks listed, the profile's selected."""
        allowed = allowed_gpu_counts(gpus_available)
        s = profile.settings
        notes: list[str] = []
        models: list[ModelChoice] = []
        for entry in profile.models:
            wanted = entry.gpus if entry.gpus is not None else s.gpus
            kept = tuple(c for c in wanted if c in allowed)
            if kept != tuple(wanted):
                dropped = ", ".join(str(c) for c in wanted if c not in allowed)
                notes.append(f"{entry.name}: GPU count {dropped} left out ({_box(gpus_available)})")
            models.append(
                ModelChoice(
                    entry=entry,
                    gpus=kept or (max(allowed),),
                    dtype=entry.dtype or s.dtype,
                    batch_size=entry.batch_size or s.batch_size,
                    quantize=entry.quantize or s.quantize,
                    settings_engine=s.engine,
                )
            )
        by_name = {t.name: t for t in profile.tasks}
        tasks = [
            TaskChoice(
                name=name,
                selected=name in by_name,
                limit=by_name[name].limit if name in by_name else None,
                num_fewshot=by_name[name].num_fewshot if name in by_name else None,
                mode=by_name[name].mode if name in by_name else None,
                entry=by_name.get(name),
            )
            for name in TASK_NAMES
        ]
        return cls(profile, models, tasks, gpus_available, notes, data_dir, timeout_s)

    # -- edits --------------------------------------------------------------------------------

    @property
    def gpu_counts(self) -> tuple[int, ...]:
        return allowed_gpu_counts(self.gpus_available)

    def add_model(self, source: str, name: str | None = None) -> ModelChoice:
        """Add a model by catalog name, hub id, local directory or .gguf path (else UserError)."""
        from slmtui.catalog import resolve_model

        ref = resolve_model(source)
        written = ref.source if ref.kind in ("local", "gguf") else source.strip()
        label = name or ref.name
        s = self.profile.settings
        if any(m.label == model_label(label, s.quantize, s.engine) for m in self.models):
            raise UserError(f"model '{label}' is already in the list; remove it first or rename it")
        choice = ModelChoice(
            entry=ModelEntry(name=label, source=written),
            gpus=(max(self.gpu_counts),) if self.gpus_available == 0 else (1,),
            dtype=s.dtype,
            batch_size=s.batch_size,
            quantize=s.quantize,
            settings_engine=s.engine,
        )
        self.models.append(choice)
        return choice

    def remove_model(self, index: int) -> ModelChoice:
        return self.models.pop(index)

    def cycle_gpus(self, index: int) -> tuple[int, ...]:
        """Next single GPU count the box has (0 = CPU) for model ``index``."""
        model = self.models[index]
        counts = self.gpu_counts
        current = model.gpus[-1] if model.gpus else counts[0]
        position = counts.index(current) if current in counts else -1
        model.gpus = (counts[(position + 1) % len(counts)],)
        return model.gpus

    def cycle_dtype(self, index: int) -> str:
        model = self.models[index]
        model.dtype = DTYPES[(DTYPES.index(model.dtype) + 1) % len(DTYPES)]
        return model.dtype

    def cycle_quantize(self, index: int) -> str:
        """Next of none, int8, int4 for model ``index``, skipping a value that another row of
        the same model already has (two rows would be one variant). A value the device or the
        installed torchao cannot run is taken: the plan line says why it cannot run."""
        model = self.models[index]
        taken = {m.label for n, m in enumerate(self.models) if n != index}
        start = QUANTIZE.index(model.quantize) if model.quantize in QUANTIZE else 0
        for step in range(1, len(QUANTIZE)):
            value = QUANTIZE[(start + step) % len(QUANTIZE)]
            if model_label(model.entry.name, value, model.engine) not in taken:
                model.quantize = value
                break
        return model.quantize

    def cycle_batch_size(self, index: int) -> int | str:
        model = self.models[index]
        at = BATCH_SIZES.index(model.batch_size) if model.batch_size in BATCH_SIZES else -1
        if at < 0:  # a size from the profile that is not in the cycle: the next bigger one
            at = sum(1 for b in BATCH_SIZES if isinstance(b, int) and b <= model.batch_size) - 1
        model.batch_size = BATCH_SIZES[(at + 1) % len(BATCH_SIZES)]
        return model.batch_size

    def cycle_mode(self, index: int) -> str:
        task = self.tasks[index]
        modes = task.modes
        task.mode = modes[(modes.index(task.shown_mode) + 1) % len(modes)]
        return task.mode

    def set_limit(self, index: int, text: str) -> int | None:
        """Samples per task from what the user typed ('' = the profile's default)."""
        self.tasks[index].limit = _count(text, "sample limit", minimum=1)
        return self.tasks[index].limit

    def set_fewshot(self, index: int, text: str) -> int | None:
        self.tasks[index].num_fewshot = _count(text, "few-shot", minimum=0)
        return self.tasks[index].num_fewshot

    # -- results ------------------------------------------------------------------------------

    def to_profile(self, name: str | None = None) -> Profile:
        """The selected models and tasks as a Profile (UserError when either is empty)."""
        models = [m for m in self.models if m.selected]
        tasks = [t for t in self.tasks if t.selected]
        if not models:
            raise UserError("no model selected; select one with space in the Models list")
        if not tasks:
            raise UserError("no task selected; select one with space in the Tasks list")
        settings = self.profile.settings
        return replace(
            self.profile,
            name=name or self.profile.name,
            models=tuple(
                replace(
                    m.entry,
                    gpus=m.gpus,
                    dtype=m.dtype,
                    batch_size=m.batch_size,
                    quantize=_explicit(m.quantize, m.entry.quantize, settings.quantize),
                )
                for m in models
            ),
            tasks=tuple(
                replace(
                    t.entry or TaskEntry(name=t.name),
                    limit=t.limit,
                    num_fewshot=t.num_fewshot,
                    mode=t.mode,
                )
                for t in tasks
            ),
            settings=settings if isinstance(settings, Settings) else Settings(),
        )

    def specs(self, limit: int | None = None) -> list[RunSpec]:
        """The runs of the selection (``limit``: the command line's cap on samples)."""
        specs = self.to_profile().runs(
            limit=limit, data_dir=self.data_dir, gpus_available=self.gpus_available
        )
        if self.timeout_s is not None:
            specs = [replace(spec, timeout_s=self.timeout_s) for spec in specs]
        return specs


def _explicit(value: str, written: str | None, default: str) -> str | None:
    """A model's setting as the profile should hold it: None when it is the [settings] default
    and the model did not name it (a saved profile stays as short as the loaded one)."""
    return None if written is None and value == default else value


def allowed_gpu_counts(gpus_available: int) -> tuple[int, ...]:
    """GPU counts a run may ask on this box: 0 (CPU) and the profile counts up to what it has."""
    return tuple(c for c in GPU_COUNTS if c <= gpus_available)


def _box(gpus_available: int) -> str:
    return "no GPU found" if gpus_available == 0 else f"this box has {gpus_available} GPU(s)"


def _count(text: str, what: str, *, minimum: int) -> int | None:
    text = text.strip().lower()
    if text in ("", "default"):
        return None
    if not text.isdigit() or int(text) < minimum:
        raise UserError(
            f"{what} '{text}': must be an integer >= {minimum}, or empty for the profile's default"
        )
    return int(text)
