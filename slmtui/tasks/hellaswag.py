"""HellaSwag: pick the most plausible ending of an everyday scene (4 endings).

Defaults: mode ``loglikelihood`` (the only one); 0 few-shot examples (lm-eval's default; the Open
LLM Leaderboard used 10).

Prompt (lm-eval ``hellaswag``): ``preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize())``; each choice is " " + ``preprocess(ending)``, where ``preprocess`` strips,
turns " [title]" into ". ", deletes other ``[bracketed]`` WikiHow artefacts and squashes double
spaces. A few-shot example is its query followed by its gold ending.

Score: ``acc`` (argmax of the summed log-probability) and ``acc_norm`` (argmax of log-probability
per byte of the ending; primary). The prediction shown is acc_norm's pick, as a letter A-D.
Data: Rowan/hellaswag, split "validation": ``{"ind", "activity_label", "ctx_a", "ctx_b",
"endings": [4 str], "label": "0".."3"}`` (the hub stores the label as a string; an int is accepted).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from slmtui.scoring import acc_from_logprobs, acc_norm_from_logprobs, argmax, normalized_logprobs
from slmtui.tasks.base import Item, Response, Scored
from slmtui.tasks.declared import DeclaredTask, FieldError, require_str, require_str_list

N_ENDINGS = 4
LETTERS = "ABCD"


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up of WikiHow artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def gold_index(doc: dict[str, Any]) -> int:
    return int(doc["label"])


class HellaswagTask(DeclaredTask):
    name: ClassVar[str] = "hellaswag"
    version: ClassVar[str] = "1.0"
    default_mode: ClassVar[str] = "loglikelihood"
    modes: ClassVar[tuple[str, ...]] = ("loglikelihood",)
    primary_metric: ClassVar[str] = "acc_norm"
    default_max_new_tokens: ClassVar[int] = 1
    """Unused: HellaSwag is scored by log-likelihood only."""
    default_num_fewshot: ClassVar[int] = 0
    hub_id: ClassVar[str] = "Rowan/hellaswag"
    hub_split: ClassVar[str] = "validation"
    id_field: ClassVar[str | None] = "ind"

    def check_doc(self, doc: dict[str, Any]) -> None:
        require_str(doc, "activity_label", nonempty=False)
        require_str(doc, "ctx_a", nonempty=False)
        require_str(doc, "ctx_b", nonempty=False)
        if not (doc["ctx_a"] + doc["ctx_b"]).strip():
            raise FieldError("ctx_a", "and 'ctx_b' must not both be empty")
        require_str_list(doc.get("endings"), "endings", min_len=N_ENDINGS, max_len=N_ENDINGS)
        label = doc.get("label")
        if isinstance(label, bool) or str(label) not in {str(i) for i in range(N_ENDINGS)}:
            raise FieldError("label", f"must be '0' to '{N_ENDINGS - 1}', not {label!r}")

    def query(self, doc: dict[str, Any]) -> str:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return preprocess(doc["activity_label"] + ": " + ctx)

    def doc_to_text(self, doc: dict[str, Any], mode: str) -> str:
        return self.query(doc)

    def continuations(self, doc: dict[str, Any]) -> tuple[str, ...]:
        return tuple(" " + preprocess(ending) for ending in doc["endings"])

    def doc_to_target(self, doc: dict[str, Any], mode: str) -> str:
        return self.continuations(doc)[gold_index(doc)]

    def score(self, item: Item, response: Response, mode: str) -> Scored:
        choices = self.continuations(item.doc)
        logprobs = self.expect_loglikelihood(response, len(choices)).logprobs
        gold = gold_index(item.doc)
        acc = acc_from_logprobs(logprobs, gold)
        acc_norm = acc_norm_from_logprobs(logprobs, choices, gold)
        picked = argmax(normalized_logprobs(logprobs, choices))
        return Scored(
            score=acc_norm,
            prediction=LETTERS[picked],
            gold=LETTERS[gold],
            metrics={"acc": acc, "acc_norm": acc_norm},
        )
