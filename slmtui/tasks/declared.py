"""What every declared task shares: schema checks, prompt assembly, aggregation.

A task states its facts as class attributes (name, version, modes, defaults, hub source) and
implements ``check_doc`` (the hub schema), ``doc_to_text`` / ``doc_to_target`` (the prompt, as
lm-evaluation-harness splits it) and ``score``. Few-shot prompts are built the lm-eval way::

    description + (text(shot) + target(shot) + "\\n\\n") * k + text(item)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from slmtui.errors import UserError, allowed_list
from slmtui.scoring import mean_metrics
from slmtui.tasks.base import (
    GenerateRequest,
    Item,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
    Request,
    Response,
    Scored,
)

FEWSHOT_SEPARATOR = "\n\n"


class FieldError(ValueError):
    """One field of one document breaks the task's schema; the loader adds file and line."""

    def __init__(self, field: str, expected: str) -> None:
        super().__init__(f"field '{field}' {expected}")
        self.field = field
        self.expected = expected


def require_str(doc: dict[str, Any], field: str, *, nonempty: bool = True) -> str:
    value = doc.get(field)
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise FieldError(field, "must be a non-empty string" if nonempty else "must be a string")
    return value


def require_str_list(
    value: Any, field: str, *, min_len: int = 0, max_len: int | None = None
) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FieldError(field, "must be a list of strings")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        span = f"{min_len} to {max_len}" if max_len is not None else f"at least {min_len}"
        raise FieldError(field, f"must hold {span} strings, not {len(value)}")
    return value


class DeclaredTask:
    """Base of the five tasks; see the module docstring. Instances are stateless."""

    name: ClassVar[str]
    version: ClassVar[str]
    default_mode: ClassVar[str]
    modes: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    default_max_new_tokens: ClassVar[int]
    default_num_fewshot: ClassVar[int]
    hub_id: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    hub_split: ClassVar[str]
    hub_shuffle: ClassVar[bool] = False
    """Shuffle hub rows with the run's seed before ``limit`` (for splits stored sorted by label)."""
    id_field: ClassVar[str | None] = None
    """The document field holding the dataset's own item id, if it has one."""
    description: ClassVar[str] = ""
    """Text put before the few-shot examples and the item."""
    stop: ClassVar[tuple[str, ...]] = ("\n",)
    fixed_fewshot: ClassVar[tuple[Item, ...]] = ()
    """Few-shot examples fixed by the task (GSM8K chain of thought); empty: drawn from the data."""

    def __repr__(self) -> str:
        return f"<task {self.name} v{self.version}>"

    # -- data -----------------------------------------------------------------------------------

    def check_doc(self, doc: dict[str, Any]) -> None:
        """Raise FieldError when ``doc`` does not follow the task's hub schema."""
        raise NotImplementedError

    def item_id(self, doc: dict[str, Any], index: int) -> str:
        """The dataset's id when present, else '<task>-<index>' (index in load order)."""
        if self.id_field is not None:
            value = doc.get(self.id_field)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                return str(value)
        return f"{self.name}-{index}"

    # -- prompts --------------------------------------------------------------------------------

    def doc_to_text(self, doc: dict[str, Any], mode: str) -> str:
        raise NotImplementedError

    def doc_to_target(self, doc: dict[str, Any], mode: str) -> str:
        """The answer as a few-shot example shows it, with its leading space."""
        raise NotImplementedError

    def continuations(self, doc: dict[str, Any]) -> tuple[str, ...]:
        """Loglikelihood mode: every choice, with its leading space."""
        raise NotImplementedError

    def check_mode(self, mode: str) -> None:
        if mode not in self.modes:
            allowed = allowed_list(self.modes)
            raise UserError(f"task {self.name}: mode '{mode}' is not supported; allowed: {allowed}")

    def context(self, item: Item, fewshot: Sequence[Item], mode: str) -> str:
        """The full prompt: description, few-shot examples, then the item's text."""
        if any(shot.id == item.id for shot in fewshot):
            raise ValueError(f"few-shot examples of {self.name} item {item.id} include the item")
        parts = [
            self.doc_to_text(shot.doc, mode) + self.doc_to_target(shot.doc, mode)
            for shot in fewshot
        ]
        parts.append(self.doc_to_text(item.doc, mode))
        return self.description_for(mode) + FEWSHOT_SEPARATOR.join(parts)

    def description_for(self, mode: str) -> str:
        """Text before the examples and the item in this mode."""
        return self.description

    def build_request(
        self, item: Item, fewshot: list[Item], mode: str, max_new_tokens: int
    ) -> Request:
        self.check_mode(mode)
        prompt = self.context(item, fewshot, mode)
        if mode == "loglikelihood":
            return LoglikelihoodRequest(context=prompt, continuations=self.continuations(item.doc))
        return GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, stop=self.stop)

    # -- scoring --------------------------------------------------------------------------------

    def score(self, item: Item, response: Response, mode: str) -> Scored:
        raise NotImplementedError

    def aggregate(self, scored: list[Scored]) -> dict[str, float]:
        """Mean of each per-item metric over the items reporting it; the primary metric included."""
        return mean_metrics(s.metrics | {self.primary_metric: s.score} for s in scored)

    @staticmethod
    def expect_loglikelihood(response: Response, n_choices: int) -> LoglikelihoodResponse:
        if not isinstance(response, LoglikelihoodResponse):
            raise TypeError(f"expected a LoglikelihoodResponse, got {type(response).__name__}")
        if len(response.logprobs) != n_choices:
            raise ValueError(f"{len(response.logprobs)} log-probabilities for {n_choices} choices")
        return response
