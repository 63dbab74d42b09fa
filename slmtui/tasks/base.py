"""What a task is: items in, requests out, outputs scored. No torch here.

A back end (the worker's engines) answers two kinds of request, as in lm-evaluation-harness:
``GenerateRequest`` (generate until a stop string or a token budget) and
``LoglikelihoodRequest`` (log-probability of each continuation given the context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    """Generation stops at the first of these strings; it is cut from the output."""


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuations: tuple[str, ...]
    """Each choice, scored as log P(continuation | context); a leading space belongs here."""


Request = GenerateRequest | LoglikelihoodRequest


@dataclass(frozen=True)
class LoglikelihoodResponse:
    logprobs: tuple[float, ...]
    """Summed log-probability of each continuation (nats)."""
    greedy: tuple[bool, ...] = ()
    """Whether each continuation is the greedy one, token by token."""


@dataclass(frozen=True)
class GenerateResponse:
    text: str
    tokens_out: int


Response = GenerateResponse | LoglikelihoodResponse


@dataclass(frozen=True)
class Item:
    """One benchmark item as loaded (the hub's schema), with a stable id."""

    id: str
    doc: dict[str, Any]


@dataclass(frozen=True)
class Scored:
    """How one item scored: ``score`` is the primary metric (0..1); ``metrics`` the rest."""

    score: float
    prediction: str
    gold: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskData:
    items: list[Item]
    source: str
    """Where the items came from: 'file', 'data_dir', 'hub' or 'sample'."""
    location: str
    """The file, directory or hub id read."""
    fewshot_pool: list[Item] = field(default_factory=list)
    """Every loaded item, before ``limit``: few-shot examples are drawn from here (never the item
    itself), so they do not change with the limit. Empty means ``items``."""


class Task(Protocol):
    name: str
    version: str
    default_mode: str
    modes: tuple[str, ...]
    primary_metric: str
    """The accuracy that enters PER (e.g. 'exact_match', 'f1', 'acc_norm', 'acc')."""
    default_max_new_tokens: int
    """Token budget of a generate request when the options give none (unused by loglikelihood)."""
    default_num_fewshot: int

    def build_request(
        self, item: Item, fewshot: list[Item], mode: str, max_new_tokens: int
    ) -> Request: ...

    def score(self, item: Item, response: Response, mode: str) -> Scored: ...

    def aggregate(self, scored: list[Scored]) -> dict[str, float]:
        """Mean of each per-item metric; the primary metric under ``primary_metric``."""
        ...
