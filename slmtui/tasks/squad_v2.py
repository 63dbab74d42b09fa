"""SQuAD 2.0: extractive reading comprehension; about half the dev questions have no answer.

Defaults: mode ``generate``; 0 few-shot examples; 32 new tokens (the brief suggests 10-30; gold
answers are short spans, the longest in the shared 104-item dev subset is 7 words, and 32 tokens
leave room for a lead-in such as "The answer is"); greedy; stop at the first newline (as lm-eval's
``squadv2``).

Prompt (lm-eval ``squadv2`` layout, after a one-line instruction so that a zero-shot model knows
it may abstain)::

    Answer each question with a short span copied from the background, or "unanswerable" if the
    background does not contain the answer.

    Title: <title>

    Background: <context>

    Question: <question>

    Answer:

A few-shot example's answer is its first gold answer, or "unanswerable" (lm-eval's target).

Score: the official SQuAD 2.0 normalisation, EM and F1 as the maximum over the gold answers; for
an unanswerable question only an abstaining prediction (empty, "unanswerable", "no answer",
"cannot be answered") scores 1. Metrics per item: ``f1`` (primary), ``exact_match``, and
``HasAns_f1``/``HasAns_exact`` or ``NoAns_f1``/``NoAns_exact`` (the official subset breakdown,
averaged over their subset). All on a 0..1 scale (the official script prints 0..100).
Data: rajpurkar/squad_v2, split "validation":
``{"id", "title", "context", "question", "answers": {"text": [str], "answer_start": [int]}}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from slmtui.scoring import normalize_squad, squad_exact, squad_f1, squad_prediction
from slmtui.tasks.base import GenerateResponse, Item, Response, Scored
from slmtui.tasks.declared import DeclaredTask, FieldError, require_str

NO_ANSWER = "unanswerable"


class SquadV2Task(DeclaredTask):
    name: ClassVar[str] = "squad_v2"
    version: ClassVar[str] = "1.0"
    default_mode: ClassVar[str] = "generate"
    modes: ClassVar[tuple[str, ...]] = ("generate",)
    primary_metric: ClassVar[str] = "f1"
    default_max_new_tokens: ClassVar[int] = 32
    default_num_fewshot: ClassVar[int] = 0
    hub_id: ClassVar[str] = "rajpurkar/squad_v2"
    hub_split: ClassVar[str] = "validation"
    id_field: ClassVar[str | None] = "id"
    description: ClassVar[str] = (
        "Answer each question with a short span copied from the background, or "
        f'"{NO_ANSWER}" if the background does not contain the answer.\n\n'
    )
    stop: ClassVar[tuple[str, ...]] = ("\n",)

    def check_doc(self, doc: dict[str, Any]) -> None:
        require_str(doc, "context")
        require_str(doc, "question")
        if "title" in doc and not isinstance(doc["title"], str):
            raise FieldError("title", "must be a string")
        answers = doc.get("answers")
        shape = "must be an object with 'text' and 'answer_start' lists"
        if not isinstance(answers, dict):
            raise FieldError("answers", shape)
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list):
            raise FieldError("answers", shape)
        if not all(isinstance(t, str) for t in texts):
            raise FieldError("answers.text", "must be a list of strings")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in starts):
            raise FieldError("answers.answer_start", "must be a list of integers")
        if len(texts) != len(starts):
            raise FieldError(
                "answers", "must have as many 'answer_start' entries as 'text' entries"
            )

    def doc_to_text(self, doc: dict[str, Any], mode: str) -> str:
        title = f"Title: {doc['title']}\n\n" if doc.get("title") else ""
        return f"{title}Background: {doc['context']}\n\nQuestion: {doc['question']}\n\nAnswer:"

    def doc_to_target(self, doc: dict[str, Any], mode: str) -> str:
        texts = doc["answers"]["text"]
        return " " + (texts[0] if texts else NO_ANSWER)

    def score(self, item: Item, response: Response, mode: str) -> Scored:
        if not isinstance(response, GenerateResponse):
            raise TypeError(f"squad_v2 scores a GenerateResponse, got {type(response).__name__}")
        golds: list[str] = item.doc["answers"]["text"]
        prediction = squad_prediction(response.text)
        f1 = squad_f1(prediction, golds)
        exact = squad_exact(prediction, golds)
        subset = "HasAns" if any(normalize_squad(g) for g in golds) else "NoAns"
        return Scored(
            score=f1,
            prediction=prediction or NO_ANSWER,
            gold=" | ".join(dict.fromkeys(golds)) if subset == "HasAns" else NO_ANSWER,
            metrics={
                "f1": f1,
                "exact_match": exact,
                f"{subset}_f1": f1,
                f"{subset}_exact": exact,
            },
        )
