"""IMDB: is a movie review positive or negative? (binary sentiment)

Defaults: mode ``generate`` (the study's setting); 0 few-shot examples (reviews are long);
5 new tokens; greedy; stop at the first newline. Mode ``loglikelihood`` compares " negative"
with " positive".

lm-eval has no IMDB task; the prompt follows its binary-sentiment layout (GLUE SST-2)::

    <review, with each <br /> tag turned into a newline>
    Question: Is this review positive or negative?
    Answer:

A few-shot example ends in " positive" or " negative". Generate mode reads the first
"positive"/"negative" word of the output (any case); metrics ``acc`` (primary) and
``answer_found``. Loglikelihood mode: ``acc`` (argmax; the two endings are the same length in
bytes, so no acc_norm).
Data: stanfordnlp/imdb, split "test": ``{"text": str, "label": 0 (negative) or 1 (positive)}``.
The hub split is sorted by label, so hub rows are shuffled with the run's seed before ``limit``;
local files keep their order.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from slmtui.scoring import acc_from_logprobs, argmax, extract_sentiment
from slmtui.tasks.base import GenerateResponse, Item, Response, Scored
from slmtui.tasks.declared import DeclaredTask, FieldError, require_str

LABELS = ("negative", "positive")
"""Label 0 and label 1, as the hub numbers them."""
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)


class ImdbTask(DeclaredTask):
    name: ClassVar[str] = "imdb"
    version: ClassVar[str] = "1.0"
    default_mode: ClassVar[str] = "generate"
    modes: ClassVar[tuple[str, ...]] = ("generate", "loglikelihood")
    primary_metric: ClassVar[str] = "acc"
    default_max_new_tokens: ClassVar[int] = 5
    default_num_fewshot: ClassVar[int] = 0
    hub_id: ClassVar[str] = "stanfordnlp/imdb"
    hub_split: ClassVar[str] = "test"
    hub_shuffle: ClassVar[bool] = True
    stop: ClassVar[tuple[str, ...]] = ("\n",)

    def check_doc(self, doc: dict[str, Any]) -> None:
        require_str(doc, "text")
        label = doc.get("label")
        if isinstance(label, bool) or label not in (0, 1):
            raise FieldError("label", f"must be 0 (negative) or 1 (positive), not {label!r}")

    def doc_to_text(self, doc: dict[str, Any], mode: str) -> str:
        review = _BR_RE.sub("\n", doc["text"]).strip()
        return f"{review}\nQuestion: Is this review positive or negative?\nAnswer:"

    def doc_to_target(self, doc: dict[str, Any], mode: str) -> str:
        return " " + LABELS[doc["label"]]

    def continuations(self, doc: dict[str, Any]) -> tuple[str, ...]:
        return tuple(" " + label for label in LABELS)

    def score(self, item: Item, response: Response, mode: str) -> Scored:
        self.check_mode(mode)
        gold = LABELS[item.doc["label"]]
        if mode == "generate":
            if not isinstance(response, GenerateResponse):
                raise TypeError(f"imdb generate scores a GenerateResponse, got {response!r}")
            picked = extract_sentiment(response.text)
            acc = 1.0 if picked == gold else 0.0
            return Scored(
                score=acc,
                prediction=picked or "",
                gold=gold,
                metrics={"acc": acc, "answer_found": 1.0 if picked is not None else 0.0},
            )
        logprobs = self.expect_loglikelihood(response, len(LABELS)).logprobs
        acc = acc_from_logprobs(logprobs, item.doc["label"])
        return Scored(
            score=acc, prediction=LABELS[argmax(logprobs)], gold=gold, metrics={"acc": acc}
        )
