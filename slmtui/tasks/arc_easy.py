"""ARC-Easy: grade-school science questions with 3 to 5 labelled choices.

Defaults: mode ``generate`` (the study's setting: the model writes the label); 0 few-shot
examples; 5 new tokens; greedy; stop at the first newline. Mode ``loglikelihood`` is lm-eval's
``arc_easy``.

Generate prompt (lm-eval's MMLU-style multiple-choice layout)::

    The following are multiple choice science questions. Answer with the label of the correct
    choice.

    Question: <question>
    A. <choice>
    B. <choice>
    ...
    Answer:

A few-shot example ends in " <label>". The answer is the first label the output names ("The
answer is (B).", "b", "C) foo", "3"; see ``slmtui.scoring.extract_choice_label``); an output
that only repeats a choice's text names that choice. Metrics: ``acc`` (primary) and
``answer_found`` (share of outputs naming any label).

Loglikelihood prompt (lm-eval ``arc_easy``): ``"Question: <question>\\nAnswer:"`` with each
choice's text as " <text>"; metrics ``acc`` (primary) and ``acc_norm`` (per byte of the choice).
Data: allenai/ai2_arc, config "ARC-Easy", split "test": ``{"id", "question", "choices": {"text":
[str], "label": [str]}, "answerKey"}``; labels are "A".."E" or "1".."5".
"""

from __future__ import annotations

from typing import Any, ClassVar

from slmtui.scoring import (
    acc_from_logprobs,
    acc_norm_from_logprobs,
    argmax,
    extract_choice_label,
)
from slmtui.tasks.base import GenerateResponse, Item, Response, Scored
from slmtui.tasks.declared import DeclaredTask, FieldError, require_str, require_str_list

MIN_CHOICES, MAX_CHOICES = 2, 8


class ArcEasyTask(DeclaredTask):
    name: ClassVar[str] = "arc_easy"
    version: ClassVar[str] = "1.0"
    default_mode: ClassVar[str] = "generate"
    modes: ClassVar[tuple[str, ...]] = ("generate", "loglikelihood")
    primary_metric: ClassVar[str] = "acc"
    default_max_new_tokens: ClassVar[int] = 5
    default_num_fewshot: ClassVar[int] = 0
    hub_id: ClassVar[str] = "allenai/ai2_arc"
    hub_config: ClassVar[str | None] = "ARC-Easy"
    hub_split: ClassVar[str] = "test"
    id_field: ClassVar[str | None] = "id"
    stop: ClassVar[tuple[str, ...]] = ("\n",)
    generate_description: ClassVar[str] = (
        "The following are multiple choice science questions. "
        "Answer with the label of the correct choice.\n\n"
    )

    def check_doc(self, doc: dict[str, Any]) -> None:
        require_str(doc, "question")
        choices = doc.get("choices")
        if not isinstance(choices, dict):
            raise FieldError("choices", "must be an object with 'text' and 'label' lists")
        texts = require_str_list(
            choices.get("text"), "choices.text", min_len=MIN_CHOICES, max_len=MAX_CHOICES
        )
        labels = require_str_list(
            choices.get("label"), "choices.label", min_len=MIN_CHOICES, max_len=MAX_CHOICES
        )
        if len(texts) != len(labels):
            raise FieldError("choices", "must have as many 'label' entries as 'text' entries")
        if len(set(labels)) != len(labels) or not all(label.strip() for label in labels):
            raise FieldError("choices.label", "must be distinct, non-empty labels")
        key = doc.get("answerKey")
        if not isinstance(key, str) or key not in labels:
            raise FieldError("answerKey", f"must be one of the choice labels {labels}, not {key!r}")

    def gold_index(self, doc: dict[str, Any]) -> int:
        return doc["choices"]["label"].index(doc["answerKey"])

    def description_for(self, mode: str) -> str:
        return self.generate_description if mode == "generate" else ""

    def doc_to_text(self, doc: dict[str, Any], mode: str) -> str:
        if mode == "loglikelihood":
            return f"Question: {doc['question']}\nAnswer:"
        listed = "".join(
            f"{label}. {text}\n"
            for label, text in zip(doc["choices"]["label"], doc["choices"]["text"], strict=True)
        )
        return f"Question: {doc['question']}\n{listed}Answer:"

    def doc_to_target(self, doc: dict[str, Any], mode: str) -> str:
        if mode == "loglikelihood":
            return self.continuations(doc)[self.gold_index(doc)]
        return " " + doc["answerKey"]

    def continuations(self, doc: dict[str, Any]) -> tuple[str, ...]:
        return tuple(" " + text for text in doc["choices"]["text"])

    def score(self, item: Item, response: Response, mode: str) -> Scored:
        self.check_mode(mode)
        doc = item.doc
        labels: list[str] = doc["choices"]["label"]
        gold = doc["answerKey"]
        if mode == "generate":
            if not isinstance(response, GenerateResponse):
                raise TypeError(f"arc_easy generate scores a GenerateResponse, got {response!r}")
            picked = extract_choice_label(response.text, labels, doc["choices"]["text"])
            acc = 1.0 if picked == gold else 0.0
            return Scored(
                score=acc,
                prediction=picked or "",
                gold=gold,
                metrics={"acc": acc, "answer_found": 1.0 if picked is not None else 0.0},
            )
        choices = self.continuations(doc)
        logprobs = self.expect_loglikelihood(response, len(choices)).logprobs
        gold_i = self.gold_index(doc)
        acc = acc_from_logprobs(logprobs, gold_i)
        acc_norm = acc_norm_from_logprobs(logprobs, choices, gold_i)
        return Scored(
            score=acc,
            prediction=labels[argmax(logprobs)],
            gold=gold,
            metrics={"acc": acc, "acc_norm": acc_norm},
        )
