"""Pure scoring functions: model output in, number out. Stdlib only, no torch.

Conventions follow EleutherAI's lm-evaluation-harness and the official SQuAD 2.0 evaluator so that
numbers compare with published ones:

- GSM8K: the final number after ``####``, else after the last "The answer is", else the last
  number in the output; ``,`` ``$`` units and a trailing ``.`` are ignored and numbers compare
  by value ("18.00" == "18"). lm-eval's ``gsm8k-cot`` strips the same characters before its
  exact match.
- SQuAD v2: the official ``normalize_answer`` (lower case, drop punctuation, drop the articles
  a/an/the, collapse white space); EM and F1 are the maximum over the gold answers; an unanswerable
  question has the single gold answer "" and only an empty prediction scores 1. A prediction that
  says "unanswerable", "no answer" or "cannot be answered" counts as empty.
- Multiple choice by log-likelihood: ``acc`` is argmax of the summed log-probabilities; ``acc_norm``
  argmax of log-probability divided by the UTF-8 byte length of the ending (lm-eval divides by the
  length of the choice string, which is the continuation without its leading space delimiter).
  Ties go to the first choice, as with ``numpy.argmax``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation

# --- numbers (GSM8K) --------------------------------------------------------------------------

_MINUS = "-\u2212"  # ASCII hyphen-minus and the Unicode minus sign
_NUMBER = (
    rf"(?:(?<![\w)\]])(?P<sign>[{_MINUS}]))?"  # a sign only when not a subtraction ("20-12")
    r"\$?"
    r"(?P<digits>\d[\d,]*(?:\.\d+)?)"
)
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*\(?\s*" + _NUMBER, re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*(?P<tail>.*)", re.DOTALL)


def canonical_number(text: str) -> str | None:
    """A number as a canonical string: "1,234.50" -> "1234.5", "$18.00" -> "18", "−3" -> "-3".

    Returns None when ``text`` holds no number. Only the first number in ``text`` is read.
    """
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    return _canonical(match)


def _canonical(match: re.Match[str]) -> str | None:
    digits = match.group("digits").replace(",", "")
    sign = "-" if match.group("sign") else ""
    try:
        value = Decimal(sign + digits)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text


def extract_gsm8k_answer(text: str) -> str | None:
    """The model's final answer as a canonical number string, or None when it gave no number.

    Order: the first number after the last ``####``; else the number after the last
    "The answer is"; else the last number anywhere in ``text``.
    """
    hashes = list(_HASHES_RE.finditer(text))
    if hashes:
        found = canonical_number(hashes[-1].group("tail"))
        if found is not None:
            return found
    answer_is = list(_ANSWER_IS_RE.finditer(text))
    if answer_is:
        found = _canonical(answer_is[-1])
        if found is not None:
            return found
    numbers = list(_NUMBER_RE.finditer(text))
    for match in reversed(numbers):
        found = _canonical(match)
        if found is not None:
            return found
    return None


def gsm8k_gold(answer_field: str) -> str | None:
    """The gold number of a GSM8K ``answer`` field (text after its ``####``), canonical."""
    if "####" not in answer_field:
        return None
    return canonical_number(answer_field.split("####")[-1])


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Two canonical number strings denote the same value (None never equals anything)."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def score_gsm8k(output: str, gold_answer_field: str) -> float:
    """Exact match (1.0 or 0.0) of the output's final number against the gold ``answer`` field."""
    return (
        1.0 if numbers_equal(extract_gsm8k_answer(output), gsm8k_gold(gold_answer_field)) else 0.0
    )


# --- SQuAD v2 ---------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_NO_ANSWER_RE = re.compile(
    r"\b(unanswerable|no answer|cannot be answered|can not be answered|not answerable)\b"
)


def normalize_squad(text: str) -> str:
    """The official SQuAD normalisation: lower, drop punctuation, drop a/an/the, squash spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def is_no_answer(prediction: str) -> bool:
    """Whether a prediction abstains: empty, "unanswerable", "no answer", "cannot be answered"."""
    normalized = normalize_squad(prediction)
    return normalized == "" or _NO_ANSWER_RE.search(normalized) is not None


def squad_prediction(output: str) -> str:
    """The answer a generation stands for: its first line, stripped; "" when it abstains."""
    stripped = output.strip()
    first_line = stripped.splitlines()[0].strip() if stripped else ""
    return "" if is_no_answer(first_line) else first_line


def _gold_list(golds: Iterable[str]) -> list[str]:
    """Gold answers that survive normalisation; [""] when none does (the official rule)."""
    kept = [g for g in golds if normalize_squad(g)]
    return kept or [""]


def _f1_one(prediction: str, gold: str) -> float:
    pred_tokens = normalize_squad(prediction).split()
    gold_tokens = normalize_squad(gold).split()
    if not pred_tokens or not gold_tokens:
        return 1.0 if pred_tokens == gold_tokens else 0.0
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token F1, the maximum over gold answers; an abstaining prediction counts as ""."""
    pred = "" if is_no_answer(prediction) else prediction
    return max(_f1_one(pred, gold) for gold in _gold_list(golds))


def squad_exact(prediction: str, golds: Sequence[str]) -> float:
    """Exact match after normalisation, the maximum over gold answers (1.0 or 0.0)."""
    pred = "" if is_no_answer(prediction) else prediction
    pred_norm = normalize_squad(pred)
    return max(1.0 if normalize_squad(g) == pred_norm else 0.0 for g in _gold_list(golds))


# --- generated labels (ARC letters, IMDB sentiment) -------------------------------------------


def extract_choice_label(
    text: str, labels: Sequence[str], choices: Sequence[str] | None = None
) -> str | None:
    """The first choice label the output names, as spelled in ``labels``; None if none.

    Order: "answer is X" / "answer: X" (any case); the whole output being one label
    ("b", "(B)", "3."); the first stand-alone label in upper case ("C) foo", "(B)").
    Lower-case letters count only in the first two forms, so the article "a" is never read
    as "A", nor is "A" before a lower-case word ("A good guess is D"). When ``choices`` is
    given and no label is found, an output that starts with a choice's text (normalised as
    in SQuAD) names that choice.
    """
    if not labels:
        return None
    by_upper = {label.upper(): label for label in labels}
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    edge = r"(?![A-Za-z0-9])"
    start = r"(?<![A-Za-z0-9])"

    def is_article(match: re.Match[str]) -> bool:
        """Whether "A"/"a" is the article: before a lower-case word ("answer is a mammal")."""
        return (
            match.group(1) in ("A", "a") and re.match(r"\s+[a-z]", text[match.end() :]) is not None
        )

    explicit_re = rf"answer\s*(?:is|:)\s*:?\s*[\(\[]?\s*({alternatives}){edge}"
    for match in re.finditer(explicit_re, text, re.IGNORECASE):
        if not is_article(match):
            return by_upper[match.group(1).upper()]

    whole = re.fullmatch(rf"\s*[\(\[]?\s*({alternatives})\s*[\)\]\.:]?\s*", text, re.IGNORECASE)
    if whole:
        return by_upper[whole.group(1).upper()]

    for match in re.finditer(rf"{start}({alternatives}){edge}", text):
        if not is_article(match):
            return by_upper[match.group(1).upper()]

    if choices:
        output = normalize_squad(text)
        if output:
            for label, choice in zip(labels, choices, strict=False):
                choice_norm = normalize_squad(choice)
                if choice_norm and output.startswith(choice_norm):
                    return label
    return None


_SENTIMENT_RE = re.compile(r"\b(positive|negative)\b", re.IGNORECASE)


def extract_sentiment(text: str) -> str | None:
    """The first "positive" or "negative" word in the output (lower case), or None."""
    match = _SENTIMENT_RE.search(text)
    return match.group(1).lower() if match else None


# --- log-likelihood multiple choice -----------------------------------------------------------


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as ``numpy.argmax``)."""
    if not values:
        raise ValueError("argmax of an empty sequence")
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def ending_bytes(continuation: str) -> int:
    """UTF-8 byte length of a continuation without its leading space delimiter (at least 1)."""
    return max(1, len(continuation.removeprefix(" ").encode("utf-8")))


def normalized_logprobs(logprobs: Sequence[float], continuations: Sequence[str]) -> list[float]:
    """Log-probability per byte of each ending: the quantity ``acc_norm`` ranks by."""
    if len(logprobs) != len(continuations):
        raise ValueError(f"{len(logprobs)} log-probabilities for {len(continuations)} choices")
    return [lp / ending_bytes(c) for lp, c in zip(logprobs, continuations, strict=True)]


def acc_from_logprobs(logprobs: Sequence[float], gold: int) -> float:
    """1.0 when the gold choice has the highest summed log-probability, else 0.0."""
    return 1.0 if argmax(logprobs) == gold else 0.0


def acc_norm_from_logprobs(
    logprobs: Sequence[float], continuations: Sequence[str], gold: int
) -> float:
    """1.0 when the gold choice has the highest log-probability per byte of its ending."""
    return 1.0 if argmax(normalized_logprobs(logprobs, continuations)) == gold else 0.0


# --- aggregation ------------------------------------------------------------------------------


def mean_metrics(per_item: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the items that report it (so subset metrics such as SQuAD's
    ``HasAns_f1`` average over their subset only). Empty in, empty out."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in per_item:
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}
