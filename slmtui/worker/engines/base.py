"""The engine interface: answer a task's requests with a loaded model, as fast as it can.

Two engines implement it: ``plain`` (transformers ``generate`` and a plain forward; the reference)
and ``fast`` (static KV cache, CUDA graphs, batching). The runner owns the timing window:
it synchronises, reads clocks and NVML around the engine's calls; an engine only reports, per
finished request, what it produced, and per batch when its first token appeared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
)


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


def text_config(config: Any) -> Any:
    """The decoder's config: multimodal configs nest it (``get_text_config``), text-only ones
    are it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class Engine(ABC):
    name: ClassVar[str]

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.live_tokens = 0
        """Tokens generated so far (read by the progress heartbeat while the engine runs; may run
        a few tokens ahead of the final counts, which come from ``Completed``)."""

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
