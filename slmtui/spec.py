"""What one run is: a model, a task with its options, GPUs and settings. Plain data, stdlib only.

A RunSpec crosses every boundary (profile -> plan -> scheduler -> worker -> store) as JSON.
Its ``run_key`` identifies the measurement: two specs with the same key measure the same thing,
so a stored run with that key lets ``plan`` skip it (resume).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

ModelKind = Literal["hub", "local", "gguf", "pypi"]
Mode = Literal["generate", "loglikelihood"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Engine = Literal["fast", "plain", "llamacpp"]
Parallel = Literal["tp", "dp"]
Quantize = Literal["none", "int8", "int4"]

DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class EngineNeeds:
    """What an engine takes, checked when a profile loads (``profile.engine_problem``) without
    importing the engine, its library or torch."""

    library: str | None = None
    """Import name of a library it needs beyond torch and transformers, looked up without
    importing it."""
    install: str = ""
    """How to install ``library`` (said in the refusal)."""
    gguf_only: bool = False
    """Runs GGUF files only: an offline catalog model or a ``.gguf`` file."""
    own_weights: bool = False
    """Computes with the weights as the file stores them: ``dtype`` must be "auto" and
    ``quantize`` "none"."""
    max_gpus: int | None = None
    """Most GPUs one run may use (None: any count the box has)."""
    label: str | None = None
    """Appended to the model's label, making its runs a variant of their own
    ("SmolLM2-135M-Instruct · llama.cpp")."""


ENGINE_NEEDS: dict[str, EngineNeeds] = {
    "fast": EngineNeeds(),
    "plain": EngineNeeds(),
    "llamacpp": EngineNeeds(
        library="llama_cpp",
        install="pip install 'slmtui[llamacpp]' (builds llama.cpp from source: a C++ compiler "
        "and cmake, about 6 minutes on 2 cores)",
        gguf_only=True,
        own_weights=True,
        max_gpus=1,
        label="llama.cpp",
    ),
}
"""Every engine by name (``slmtui.worker.engines`` registers its module) and what it needs."""
ENGINES: tuple[str, ...] = tuple(ENGINE_NEEDS)
PARALLEL_MODES: tuple[str, ...] = ("tp", "dp")
MODES: tuple[str, ...] = ("generate", "loglikelihood")
QUANTIZE: tuple[str, ...] = ("none", "int8", "int4")
"""Weight-only quantisation applied at load: none (the dtype as loaded), int8 or int4."""


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it, resolved to where it comes from.

    ``source`` is a hub id (kind "hub"), a directory (kind "local"), a ``.gguf`` file (kind "gguf")
    or the name of a PyPI-packaged offline model (kind "pypi", see ``slmtui.catalog``).
    """

    name: str
    source: str
    kind: ModelKind


@dataclass(frozen=True)
class TaskOptions:
    """Per-task settings; ``None`` means the task's default (see ``slmtui.tasks``)."""

    limit: int | None = None
    num_fewshot: int | None = None
    mode: Mode | None = None
    max_new_tokens: int | None = None
    data_file: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class RunSpec:
    """One run: model x task x GPU count x settings."""

    model: ModelRef
    task: str
    options: TaskOptions = field(default_factory=TaskOptions)
    gpus: int = 0
    """GPUs the run uses; 0 runs on the CPU."""
    parallel: Parallel = "tp"
    """How a run on several GPUs splits: tensor parallel ("tp") or one replica per GPU ("dp")."""
    dtype: Dtype = "auto"
    batch_size: int | Literal["auto"] = 8
    """Most sequences in flight (fast engine) or per batch (plain); "auto": the engine sizes it
    from free memory and records its choice (profiles do not offer it yet)."""
    engine: Engine = "fast"
    data_dir: str | None = None
    timeout_s: float = 3600.0
    """Wall-clock limit for the whole run, load included; not part of the run key."""
    quantize: Quantize = "none"
    """Weight-only quantisation at load ("none", "int8", "int4"; see ``slmtui.worker.quantize``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["model"] = ModelRef(**d["model"])
        d["options"] = TaskOptions(**d.get("options", {}))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_dict(json.loads(text))

    @property
    def run_key(self) -> str:
        """A short hash of everything that changes the measurement (not the timeout).

        ``quantize`` enters only when it is not "none", so the keys of runs stored before the
        setting existed stay the same (resume still finds them).
        """
        d = self.to_dict()
        d.pop("timeout_s")
        d["model"].pop("name")
        if d.get("quantize") == "none":
            d.pop("quantize")
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def model_label(self) -> str:
        """The model as tables show it: its name, plus the quantisation or the engine when they
        make it a variant ('Qwen2.5-7B-Instruct · int4', 'SmolLM2-135M-Instruct · llama.cpp')."""
        return model_label(self.model.name, self.quantize, self.engine)

    @property
    def label(self) -> str:
        """Human label: 'model · task · 1 GPU' ('model · int4 · task · 1 GPU' when quantised)."""
        where = "CPU" if self.gpus == 0 else f"{self.gpus} GPU" + ("s" if self.gpus > 1 else "")
        return f"{self.model_label} · {self.task} · {where}"

    def with_limit(self, limit: int | None) -> RunSpec:
        return replace(self, options=replace(self.options, limit=limit))


def model_label(name: str, quantize: str | None, engine: str | None = None) -> str:
    """``name``, ``name · int4`` for a quantised variant, ``name · llama.cpp`` for a run of an
    engine that computes with the file's own weights (one place builds this label)."""
    parts = [name]
    if quantize not in (None, "none"):
        parts.append(str(quantize))
    needs = ENGINE_NEEDS.get(engine or "")
    if needs is not None and needs.label:
        parts.append(needs.label)
    return " · ".join(parts)
