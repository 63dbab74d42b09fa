"""GSM8K: grade-school maths word problems, answered by chain of thought.

Defaults: mode ``generate``; 5 few-shot examples, the first five of the eight chain-of-thought
exemplars of Wei et al. (2022) as lm-eval's ``gsm8k-cot`` ships them (``num_fewshot`` up to 8);
256 new tokens; greedy; stop at "Question:", "</s>", "<|im_end|>" or three newlines.

Prompt (lm-eval ``gsm8k`` layout)::

    Question: <exemplar question>
    Answer: <exemplar reasoning>. The answer is <n>.

    Question: <question>
    Answer:

Score: ``exact_match`` of the final number (after ``####``, else after "The answer is", else the
last number) against the number after the gold answer's ``####``, compared by value, ignoring
``,`` ``$`` units and a trailing period (see ``slmtui.scoring``). ``answer_found`` is the share of
outputs with any number in them.
Data: openai/gsm8k, config "main", split "test": ``{"question": str, "answer": "...\\n#### <n>"}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from slmtui.scoring import extract_gsm8k_answer, gsm8k_gold, numbers_equal
from slmtui.tasks.base import GenerateResponse, Item, Response, Scored
from slmtui.tasks.declared import DeclaredTask, FieldError, require_str

# The eight chain-of-thought exemplars of Wei et al. 2022 (as in lm-eval's gsm8k-cot.yaml).
_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers "
        "plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in "
        "the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they "
        "have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had "
        "32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave "
        "Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How "
        "many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 "
        "more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each "
        "day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So "
        "5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 "
        "more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she "
        "has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)


class Gsm8kTask(DeclaredTask):
    name: ClassVar[str] = "gsm8k"
    version: ClassVar[str] = "1.0"
    default_mode: ClassVar[str] = "generate"
    modes: ClassVar[tuple[str, ...]] = ("generate",)
    primary_metric: ClassVar[str] = "exact_match"
    default_max_new_tokens: ClassVar[int] = 256
    default_num_fewshot: ClassVar[int] = 5
    hub_id: ClassVar[str] = "openai/gsm8k"
    hub_config: ClassVar[str | None] = "main"
    hub_split: ClassVar[str] = "test"
    stop: ClassVar[tuple[str, ...]] = ("Question:", "</s>", "<|im_end|>", "\n\n\n")
    fixed_fewshot: ClassVar[tuple[Item, ...]] = tuple(
        Item(id=f"gsm8k-cot-{i}", doc={"question": q, "cot": cot})
        for i, (q, cot) in enumerate(_COT_EXEMPLARS)
    )

    def check_doc(self, doc: dict[str, Any]) -> None:
        require_str(doc, "question")
        answer = require_str(doc, "answer")
        if gsm8k_gold(answer) is None:
            raise FieldError("answer", "must end with '#### <number>'")

    def doc_to_text(self, doc: dict[str, Any], mode: str) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: dict[str, Any], mode: str) -> str:
        # Only the fixed chain-of-thought exemplars are ever shown as examples.
        return " " + doc["cot"]

    def score(self, item: Item, response: Response, mode: str) -> Scored:
        if not isinstance(response, GenerateResponse):
            raise TypeError(f"gsm8k scores a GenerateResponse, got {type(response).__name__}")
        predicted = extract_gsm8k_answer(response.text)
        gold = gsm8k_gold(item.doc["answer"]) or ""
        exact = 1.0 if numbers_equal(predicted, gold) else 0.0
        return Scored(
            score=exact,
            prediction=predicted or "",
            gold=gold,
            metrics={"exact_match": exact, "answer_found": 1.0 if predicted is not None else 0.0},
        )
