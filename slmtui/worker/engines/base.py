"""The engine interface: load a model its own way, answer a task's requests, as fast as it can.

Three engines implement it: ``plain`` (transformers ``generate`` and a plain forward; the
reference), ``fast`` (static KV cache, CUDA graphs, batching; plain's loader) and ``llamacpp``
(a GGUF file at its own quantisation; llama.cpp loads it). The runner owns the timing window:
it synchronises, reads clocks and NVML around the engine's calls; an engine only reports, per
finished request, what it produced, and per batch when its first token appeared.

Loading belongs to the engine class (``Engine.load(spec)``): the runner asks the spec's engine
for a ``LoadedModel``, keeps it across a worker's runs, and builds the engine on it
(``Engine.start``). Engines whose ``loader`` is the same share a loaded model: the fast engine
that gives way to plain hands plain the model it was given, never a second load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
)

if TYPE_CHECKING:
    from slmtui.spec import RunSpec


@dataclass(frozen=True)
class Completed:
    """One request answered. ``index`` is its position in the list the engine was given."""

    index: int
    response: GenerateResponse | LoglikelihoodResponse
    tokens_in: int
    tokens_out: int
    ttft_s: float | None = None
    """Seconds from when the engine took this request up (its static batch started, or it took
    a slot under continuous batching) to its first generated token."""
    batch: int | None = None
    """Which engine batch (or prefill group) gave its first token: requests of one batch share
    one prefill, and ``ttft_s``."""
    itl_s: float | None = None
    """Mean seconds between its consecutive generated tokens (inter-token latency); None with
    fewer than two tokens."""


class LoadError(Exception):
    """The model could not be loaded (RunFailed reason "load_failed"); one line for the user."""


Step = Callable[[str], None]
"""Told, in words, which loading step begins (``RunProgress.step``)."""


@dataclass
class LoadedModel:
    """A model as an engine's ``load`` left it, ready for any engine of the same ``loader``."""

    model: Any
    tokenizer: Any
    device: Any
    """The ``torch.device`` that torch's work and memory counters belong to (the CPU for a
    model torch does not hold, such as llama.cpp's; ``device`` in ``metrics`` says where that
    one computes)."""
    dtype: Any
    """A ``torch.dtype``, or the name of what the weights compute in ("Q4_1")."""
    path: str
    """What was actually read: hub id, directory, converted checkpoint or GGUF file."""
    notes: list[str] = field(default_factory=list)
    """Facts worth recording with the result (e.g. 'converted GGUF in 35.1 s')."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """What the weights are (``weights``, ``weight_bytes``, ``quantize*``): run metrics."""
    loader: str = "transformers"
    """Which ``Engine.loader`` made it: only engines with that loader can run it."""

    @property
    def dtype_name(self) -> str:
        """The dtype as the run reports it: 'bfloat16', 'float32', 'Q4_1'."""
        return str(self.dtype).removeprefix("torch.")


def text_config(config: Any) -> Any:
    """The decoder's config: multimodal configs nest it (``get_text_config``), text-only ones
    are it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class Engine(ABC):
    name: ClassVar[str]
    loader: ClassVar[str] = "transformers"
    """What ``load`` produces; a loaded model is shared only by engines with the same loader."""
    fallback: ClassVar[str | None] = None
    """The engine that runs the same loaded model instead when this one refuses it or fails in
    its set-up (``engines.start_engine``); None: this engine's failures are the run's."""

    @classmethod
    @abstractmethod
    def load(
        cls, spec: RunSpec, *, ctx: Any | None = None, on_step: Step | None = None
    ) -> LoadedModel | None:
        """Load ``spec.model`` for this engine in this process (``ctx``: the torchrun job,
        ``worker.distributed``); LoadError when it cannot. None: this rank has no part in the
        run (a layer-sharded model lives on rank 0 alone)."""

    @classmethod
    def refusal(cls, loaded: LoadedModel) -> str | None:
        """Why this engine will not run ``loaded`` (one line), or None; only asked of an engine
        with a ``fallback``."""
        return None

    @classmethod
    def start(cls, loaded: LoadedModel, *, batch_size: int | str) -> Engine:
        """This engine on ``loaded`` (not yet prepared or warmed up)."""
        return cls(loaded.model, loaded.tokenizer, batch_size=batch_size)

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int | str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.live_tokens = 0
        """Tokens generated so far (read by the progress heartbeat while the engine runs; may run
        a few tokens ahead of the final counts, which come from ``Completed``)."""

    def batch_size_used(self, requested: int | str) -> int:
        """The batch size the run reports: the engine's own choice for "auto", else the one
        asked for (a halving after an out-of-memory error is a note, not a new setting)."""
        return self.batch_size if requested == "auto" else int(requested)

    def prepare(  # noqa: B027
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Work that belongs before the measured window (tokenising); timed apart."""

    def warmup(  # noqa: B027
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Compile, capture graphs, touch kernels. Reported apart, never inside THR/LAT."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerateRequest]) -> Iterator[Completed]:
        """Greedy generation; yields each request as it finishes, in any order."""

    @abstractmethod
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> Iterator[Completed]:
        """Log-probability of every continuation; yields each request as it finishes."""
