"""Scoring functions against hand-computed values and awkward model outputs."""

from __future__ import annotations

import pytest

from slmtui.scoring import (
    acc_from_logprobs,
    acc_norm_from_logprobs,
    argmax,
    canonical_number,
    ending_bytes,
    extract_choice_label,
    extract_gsm8k_answer,
    extract_sentiment,
    gsm8k_gold,
    is_no_answer,
    mean_metrics,
    normalize_squad,
    normalized_logprobs,
    numbers_equal,
    score_gsm8k,
    squad_exact,
    squad_f1,
    squad_prediction,
)

# --- GSM8K ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("#### 72", "72"),
        ("The answer is $1,234.50.", "1234.5"),
        ("so she has 18.00 apples", "18"),
        ("It costs -5 dollars", "-5"),
        ("\u22123 degrees", "-3"),
        ("3.5 hours.", "3.5"),
        ("The answer is 10%", "10"),
        ("Total: 7,", "7"),
        ("18.", "18"),
        ("The final answer is 12 kg", "12"),
        ("The answer is: (42)", "42"),
        ("We get 0.50.", "0.5"),
        ("no number at all", None),
        ("", None),
    ],
)
def test_gsm8k_answer_ignores_commas_dollars_units_and_trailing_period(
    output: str, expected: str | None
) -> None:
    assert extract_gsm8k_answer(output) == expected


def test_gsm8k_hashes_beat_the_last_number() -> None:
    assert extract_gsm8k_answer("He has 5 apples.\n#### 1,000\nthen 7 more") == "1000"


def test_gsm8k_answer_is_beats_a_trailing_question() -> None:
    output = "10 - 7 = 3. The answer is 3.\n\nQuestion: What is 4 + 4"
    assert extract_gsm8k_answer(output) == "3"


def test_gsm8k_last_number_when_no_marker() -> None:
    assert extract_gsm8k_answer("20 - 12 = 8 so Denny got 8 lollipops") == "8"


def test_gsm8k_subtraction_is_not_a_negative_number() -> None:
    # "20-12" is a subtraction; the last number is 12, not -12
    assert extract_gsm8k_answer("he gave 20-12") == "12"
    assert extract_gsm8k_answer("so 3 - 5") == "5"


def test_canonical_number_and_numeric_equality() -> None:
    assert canonical_number("$1,000.00") == "1000"
    assert canonical_number("-0.0") == "0"
    assert canonical_number("100") == "100"  # no exponent form
    assert numbers_equal("18.00", "18")
    assert not numbers_equal("18.5", "18")
    assert not numbers_equal(None, "18")


def test_gsm8k_gold_is_the_number_after_hashes() -> None:
    assert gsm8k_gold("Step one <<2*3=6>>6\n#### 1,000") == "1000"
    assert gsm8k_gold("blah\n#### -3") == "-3"
    assert gsm8k_gold("no marker 5") is None


def test_score_gsm8k_exact_match_by_value() -> None:
    gold = "6 * 3 = <<6*3=18>>18\n#### 18"
    assert score_gsm8k("So she pays $18.00.", gold) == 1.0
    assert score_gsm8k("The answer is 18 dollars.", gold) == 1.0
    assert score_gsm8k("The answer is 17.", gold) == 0.0
    assert score_gsm8k("I do not know.", gold) == 0.0


# --- SQuAD v2 ---------------------------------------------------------------------------------


def test_squad_normalisation_drops_case_punctuation_and_articles() -> None:
    assert normalize_squad("The  Bayeux, Tapestry!") == "bayeux tapestry"
    assert normalize_squad("An apple a day") == "apple day"
    assert normalize_squad("Theatre") == "theatre"  # "the" only as a whole word
    assert normalize_squad("  ") == ""


def test_squad_exact_is_max_over_golds() -> None:
    assert squad_exact("An Odo.", ["Odo"]) == 1.0
    assert squad_exact("Bishop Odo", ["Odo", "Bishop Odo"]) == 1.0
    assert squad_exact("Odo of Bayeux", ["Odo"]) == 0.0


def test_squad_partial_overlap_f1_by_hand() -> None:
    # pred tokens [bayeux, tapestry, work], gold [bayeux, tapestry]: P=2/3, R=1, F1=0.8
    assert squad_f1("the Bayeux Tapestry work", ["Bayeux Tapestry"]) == pytest.approx(0.8)
    # pred [denmark, and, norway], gold [denmark, iceland, and, norway]: P=1, R=3/4, F1=6/7
    assert squad_f1("Denmark and Norway", ["Denmark, Iceland and Norway"]) == pytest.approx(6 / 7)
    # max over golds: the second gold matches exactly
    assert squad_f1("Norway", ["Denmark, Iceland and Norway", "Norway"]) == 1.0
    # repeated tokens: pred [x, x, y], gold [x, y]; common x:1 y:1 = 2; P=2/3, R=1 -> 0.8
    assert squad_f1("x x y", ["x y"]) == pytest.approx(0.8)
    assert squad_f1("nothing shared", ["Odo"]) == 0.0


@pytest.mark.parametrize(
    "prediction", ["", "unanswerable", "Unanswerable.", "No answer", "It cannot be answered."]
)
def test_unanswerable_right_when_model_abstains(prediction: str) -> None:
    assert is_no_answer(prediction)
    assert squad_f1(prediction, []) == 1.0
    assert squad_exact(prediction, []) == 1.0


def test_unanswerable_wrong_when_model_answers() -> None:
    assert squad_f1("Odo", []) == 0.0
    assert squad_exact("Odo", []) == 0.0


def test_abstaining_on_an_answerable_question_scores_zero() -> None:
    assert squad_f1("unanswerable", ["Odo"]) == 0.0
    assert squad_f1("", ["Odo"]) == 0.0


def test_gold_answers_that_normalise_to_empty_count_as_unanswerable() -> None:
    assert squad_f1("", ["the", "."]) == 1.0


def test_squad_prediction_takes_first_line_and_maps_abstention_to_empty() -> None:
    assert squad_prediction("  Odo \nQuestion: next") == "Odo"
    assert squad_prediction(" The question cannot be answered.\nfoo") == ""
    assert squad_prediction("") == ""


# --- choice labels and sentiment ----------------------------------------------------------------

ABCD = ["A", "B", "C", "D"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("The answer is (B).", "B"),
        ("b", "B"),
        (" (d)\n", "D"),
        ("Answer: C) foo", "C"),
        ("the answer is c", "C"),
        ("C. gravity", "C"),
        ("A good guess is D", "D"),  # the article "A" is not a label
        ("The answer is a mammal, so B", "B"),
        ("A", "A"),
        ("A. soil", "A"),
        ("E", None),
        ("none of these", None),
        ("", None),
    ],
)
def test_choice_letter_extraction(output: str, expected: str | None) -> None:
    assert extract_choice_label(output, ABCD) == expected


def test_numeric_labels() -> None:
    labels = ["1", "2", "3", "4"]
    assert extract_choice_label("3", labels) == "3"
    assert extract_choice_label("The answer is 2.", labels) == "2"
    assert extract_choice_label("I pick (4)", labels) == "4"
    assert extract_choice_label("12", labels) is None  # not a stand-alone label


def test_five_choices_and_three_choices() -> None:
    assert extract_choice_label("E)", ["A", "B", "C", "D", "E"]) == "E"
    assert extract_choice_label("D", ["A", "B", "C"]) is None


def test_choice_text_fallback() -> None:
    choices = ["electricity", "gravity", "magnetism", "tension"]
    assert extract_choice_label("Gravity.", ABCD, choices) == "B"
    assert extract_choice_label("friction", ABCD, choices) is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (" positive", "positive"),
        (" Positive.", "positive"),
        ("NEGATIVE", "negative"),
        ("It is negative, not positive", "negative"),  # the first one named
        ("neutral", None),
        ("positively", None),
    ],
)
def test_sentiment_extraction(output: str, expected: str | None) -> None:
    assert extract_sentiment(output) == expected


# --- log-likelihood -----------------------------------------------------------------------------


def test_acc_and_acc_norm_disagree_on_a_hand_example() -> None:
    continuations = [" cat", " elephant"]
    logprobs = [-4.0, -6.0]
    # acc: -4 > -6 picks 0; acc_norm: -4/3 = -1.33 < -6/8 = -0.75 picks 1
    assert normalized_logprobs(logprobs, continuations) == pytest.approx([-4 / 3, -0.75])
    assert acc_from_logprobs(logprobs, 0) == 1.0
    assert acc_from_logprobs(logprobs, 1) == 0.0
    assert acc_norm_from_logprobs(logprobs, continuations, 1) == 1.0
    assert acc_norm_from_logprobs(logprobs, continuations, 0) == 0.0


def test_ending_length_is_utf8_bytes_without_the_leading_space() -> None:
    assert ending_bytes(" cat") == 3
    assert ending_bytes(" caf\u00e9") == 5  # é is two bytes
    assert ending_bytes(" ") == 1  # never zero


def test_argmax_ties_go_to_the_first() -> None:
    assert argmax([-1.0, -1.0, -2.0]) == 0
    with pytest.raises(ValueError):
        argmax([])


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        normalized_logprobs([-1.0], [" a", " b"])


def test_mean_metrics_averages_each_key_over_the_items_reporting_it() -> None:
    result = mean_metrics(
        [
            {"f1": 1.0, "HasAns_f1": 1.0},
            {"f1": 0.5, "HasAns_f1": 0.5},
            {"f1": 0.0, "NoAns_f1": 0.0},
        ]
    )
    assert result == pytest.approx({"f1": 0.5, "HasAns_f1": 0.75, "NoAns_f1": 0.0})
    assert mean_metrics([]) == {}
