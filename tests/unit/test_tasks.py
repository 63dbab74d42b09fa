"""Declared tasks: registry, prompts (lm-eval layouts), few-shot draw, scoring, aggregation."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from slmtui.errors import UserError
from slmtui.spec import TaskOptions
from slmtui.tasks import (
    TASK_NAMES,
    FewshotSampler,
    build_requests,
    get_task,
    resolve_settings,
)
from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    Item,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
    Scored,
    Task,
    TaskData,
)
from slmtui.tasks.hellaswag import preprocess


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def data_of(task_name: str, docs: list[dict[str, Any]]) -> TaskData:
    task = get_task(task_name)
    items = [Item(id=task.item_id(doc, i), doc=doc) for i, doc in enumerate(docs)]
    return TaskData(items=items, source="file", location="test", fewshot_pool=items)


ARC_DOC = {
    "id": "arc-1",
    "question": "Which force slows a rolling ball?",
    "choices": {"text": ["friction", "magnetism", "light"], "label": ["A", "B", "C"]},
    "answerKey": "A",
}
HELLASWAG_DOC = {
    "ind": 7,
    "activity_label": "Home and garden",
    "ctx_a": "[header] How to repot a plant [title] Choose a pot.",
    "ctx_b": "then you",
    "endings": [" loosen the plant [step] gently.", "b", "c", "d"],
    "label": "0",
}


# --- registry -----------------------------------------------------------------------------------


def test_the_five_study_tasks_are_registered() -> None:
    assert TASK_NAMES == ("gsm8k", "squad_v2", "hellaswag", "arc_easy", "imdb")
    for name in TASK_NAMES:
        task: Task = get_task(name)  # type-checks against the protocol
        for member in ("build_request", "score", "aggregate"):
            assert callable(getattr(task, member))
        assert task.name == name
        assert task.version
        assert task.default_mode in task.modes
        assert task.default_max_new_tokens >= 1
        assert task.default_num_fewshot >= 0


def test_primary_metrics_match_the_architecture_table() -> None:
    assert {n: get_task(n).primary_metric for n in TASK_NAMES} == {
        "gsm8k": "exact_match",
        "squad_v2": "f1",
        "hellaswag": "acc_norm",
        "arc_easy": "acc",
        "imdb": "acc",
    }


def test_unknown_task_suggests_the_close_name() -> None:
    with pytest.raises(UserError, match=r"unknown task 'gsm8' \(did you mean 'gsm8k'\?\)"):
        get_task("gsm8")
    with pytest.raises(UserError, match="allowed: 'gsm8k', 'squad_v2'"):
        get_task("mmlu")


# --- settings -----------------------------------------------------------------------------------


def test_settings_fill_task_defaults() -> None:
    settings = resolve_settings(get_task("gsm8k"), TaskOptions())
    assert (settings.mode, settings.num_fewshot, settings.max_new_tokens) == ("generate", 5, 256)
    squad = resolve_settings(get_task("squad_v2"), TaskOptions(max_new_tokens=16, seed=3))
    assert (squad.max_new_tokens, squad.seed) == (16, 3)


def test_unsupported_mode_is_a_user_error() -> None:
    with pytest.raises(UserError, match="task hellaswag: mode 'generate' is not supported"):
        resolve_settings(get_task("hellaswag"), TaskOptions(mode="generate"))


def test_gsm8k_has_at_most_eight_fixed_examples() -> None:
    assert resolve_settings(get_task("gsm8k"), TaskOptions(num_fewshot=8)).num_fewshot == 8
    with pytest.raises(UserError, match=r"num_fewshot 9 .* allowed: 0 to 8"):
        resolve_settings(get_task("gsm8k"), TaskOptions(num_fewshot=9))


def test_bad_counts_are_user_errors() -> None:
    with pytest.raises(UserError, match="max_new_tokens 0"):
        resolve_settings(get_task("imdb"), TaskOptions(max_new_tokens=0))
    with pytest.raises(UserError, match="num_fewshot -1"):
        resolve_settings(get_task("imdb"), TaskOptions(num_fewshot=-1))


# --- prompts ------------------------------------------------------------------------------------


def test_gsm8k_prompt_is_five_cot_examples_then_the_question() -> None:
    data = data_of("gsm8k", [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}])
    _, [request] = build_requests(get_task("gsm8k"), data, TaskOptions())
    assert isinstance(request, GenerateRequest)
    assert request.prompt.startswith("Question: There are 15 trees in the grove.")
    assert request.prompt.count("Question: ") == 6
    assert request.prompt.count("The answer is ") == 5
    assert request.prompt.endswith("\n\nQuestion: What is 2 + 2?\nAnswer:")
    assert "Olivia" not in request.prompt  # the 8th exemplar is not among the first five
    assert request.stop == ("Question:", "</s>", "<|im_end|>", "\n\n\n")
    assert request.max_new_tokens == 256


def test_gsm8k_zero_shot() -> None:
    data = data_of("gsm8k", [{"question": "What is 2 + 2?", "answer": "#### 4"}])
    _, [request] = build_requests(get_task("gsm8k"), data, TaskOptions(num_fewshot=0))
    assert isinstance(request, GenerateRequest)
    assert request.prompt == "Question: What is 2 + 2?\nAnswer:"


def test_hellaswag_preprocessing_follows_lm_eval() -> None:
    assert preprocess(" A man [title] Step one [step] goes.  ") == "A man. Step one goes."
    data = data_of("hellaswag", [HELLASWAG_DOC])
    _, [request] = build_requests(get_task("hellaswag"), data, TaskOptions())
    assert isinstance(request, LoglikelihoodRequest)
    # ctx = ctx_a + " " + ctx_b.capitalize(); " [title]" -> ". "; other brackets removed
    assert request.context == "Home and garden: How to repot a plant. Choose a pot. Then you"
    assert request.continuations == (" loosen the plant gently.", " b", " c", " d")


def test_arc_generate_prompt_lists_labelled_choices() -> None:
    data = data_of("arc_easy", [ARC_DOC])
    _, [request] = build_requests(get_task("arc_easy"), data, TaskOptions())
    assert isinstance(request, GenerateRequest)
    assert request.prompt.endswith(
        "Question: Which force slows a rolling ball?\nA. friction\nB. magnetism\nC. light\nAnswer:"
    )
    assert request.prompt.startswith("The following are multiple choice science questions.")
    assert request.stop == ("\n",)
    assert request.max_new_tokens == 5


def test_arc_loglikelihood_prompt_is_lm_eval_arc_easy() -> None:
    data = data_of("arc_easy", [ARC_DOC])
    _, [request] = build_requests(get_task("arc_easy"), data, TaskOptions(mode="loglikelihood"))
    assert isinstance(request, LoglikelihoodRequest)
    assert request.context == "Question: Which force slows a rolling ball?\nAnswer:"
    assert request.continuations == (" friction", " magnetism", " light")


def test_squad_prompt_and_unanswerable_example_target() -> None:
    docs = [
        {
            "id": "q1",
            "title": "Bridge",
            "context": "The bridge opened in 1791.",
            "question": "When did the bridge open?",
            "answers": {"text": ["1791"], "answer_start": [22]},
        },
        {
            "id": "q2",
            "title": "Bridge",
            "context": "The bridge opened in 1791.",
            "question": "Who painted the bridge?",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    data = data_of("squad_v2", docs)
    _, requests = build_requests(get_task("squad_v2"), data, TaskOptions(num_fewshot=1))
    first, second = requests
    assert isinstance(first, GenerateRequest) and isinstance(second, GenerateRequest)
    assert first.prompt.endswith(
        "Question: Who painted the bridge?\n\nAnswer: unanswerable\n\n"
        "Title: Bridge\n\nBackground: The bridge opened in 1791.\n\n"
        "Question: When did the bridge open?\n\nAnswer:"
    )
    assert "Answer: 1791\n\n" in second.prompt
    assert first.stop == ("\n",)
    assert first.max_new_tokens == 32


def test_imdb_prompt_turns_br_tags_into_newlines() -> None:
    data = data_of("imdb", [{"text": "Great.<br /><br />Loved it.", "label": 1}])
    _, [request] = build_requests(get_task("imdb"), data, TaskOptions(mode="loglikelihood"))
    assert isinstance(request, LoglikelihoodRequest)
    assert request.context == (
        "Great.\n\nLoved it.\nQuestion: Is this review positive or negative?\nAnswer:"
    )
    assert request.continuations == (" negative", " positive")


# --- few-shot -----------------------------------------------------------------------------------


def _numbered_imdb(n: int) -> TaskData:
    return data_of("imdb", [{"text": f"review {i}", "label": i % 2} for i in range(n)])


@pytest.mark.parametrize("k", [1, 3, 9])
def test_fewshot_never_includes_the_item(k: int) -> None:
    data = _numbered_imdb(10)
    sampler = FewshotSampler(get_task("imdb"), data.items, k, seed=0)
    for item in data.items:
        shots = sampler.for_item(item)
        assert len(shots) == k
        assert item.id not in {s.id for s in shots}
        assert len({s.id for s in shots}) == k


def test_fewshot_is_seeded_shared_and_stable_under_limit() -> None:
    task = get_task("imdb")
    data = _numbered_imdb(10)
    a = FewshotSampler(task, data.items, 2, seed=0)
    b = FewshotSampler(task, data.items, 2, seed=0)
    other_seed = [FewshotSampler(task, data.items, 2, seed=s) for s in range(1, 6)]
    probe = data.items[0]
    assert [s.id for s in a.for_item(probe)] == [s.id for s in b.for_item(probe)]
    assert any(
        [s.id for s in o.for_item(probe)] != [s.id for s in a.for_item(probe)] for o in other_seed
    )
    # the pool, not the limited items, feeds the draw
    limited = TaskData(items=data.items[:2], source="file", location="t", fewshot_pool=data.items)
    _, full_requests = build_requests(task, data, TaskOptions(num_fewshot=2))
    _, limited_requests = build_requests(task, limited, TaskOptions(num_fewshot=2))
    assert limited_requests == full_requests[:2]


def test_too_many_fewshot_for_the_data_is_a_user_error() -> None:
    with pytest.raises(UserError, match="num_fewshot 5 needs 6 items but the data has 3"):
        build_requests(get_task("imdb"), _numbered_imdb(3), TaskOptions(num_fewshot=5))


def test_build_request_refuses_the_item_as_its_own_example() -> None:
    task = get_task("imdb")
    item = _numbered_imdb(1).items[0]
    with pytest.raises(ValueError, match="include the item"):
        task.build_request(item, [item], "generate", 5)


# --- scoring through the tasks ------------------------------------------------------------------


def test_gsm8k_scores_the_final_number() -> None:
    task = get_task("gsm8k")
    item = Item("g", {"question": "q", "answer": "3 * 6 = <<3*6=18>>18\n#### 18"})
    right = task.score(item, GenerateResponse("3 x 6 = 18. The answer is $18.00.", 12), "generate")
    assert (right.score, right.prediction, right.gold) == (1.0, "18", "18")
    wrong = task.score(item, GenerateResponse("I am not sure.", 4), "generate")
    assert (wrong.score, wrong.metrics["answer_found"]) == (0.0, 0.0)


def test_squad_scores_answerable_and_unanswerable() -> None:
    task = get_task("squad_v2")
    answerable = Item("a", {"answers": {"text": ["Bayeux Tapestry"], "answer_start": [0]}})
    scored = task.score(answerable, GenerateResponse(" the Bayeux Tapestry work", 5), "generate")
    assert scored.score == pytest.approx(0.8)
    assert scored.metrics["exact_match"] == 0.0
    assert scored.metrics["HasAns_f1"] == pytest.approx(0.8)
    assert "NoAns_f1" not in scored.metrics

    unanswerable = Item("u", {"answers": {"text": [], "answer_start": []}})
    right = task.score(unanswerable, GenerateResponse(" unanswerable", 2), "generate")
    assert (right.score, right.metrics["NoAns_exact"], right.gold) == (1.0, 1.0, "unanswerable")
    wrong = task.score(unanswerable, GenerateResponse(" Odo", 2), "generate")
    assert (wrong.score, wrong.prediction) == (0.0, "Odo")


def test_hellaswag_scores_acc_and_acc_norm() -> None:
    task = get_task("hellaswag")
    doc = dict(HELLASWAG_DOC, endings=["go", "run far away", "sit", "x"], label="1")
    item = Item("h", doc)
    # raw: -2 (" go") beats -4 (" run far away"); per byte: -2/2 = -1 < -4/12 = -0.33
    response = LoglikelihoodResponse(logprobs=(-2.0, -4.0, -9.0, -9.0))
    scored = task.score(item, response, "loglikelihood")
    assert scored.metrics == {"acc": 0.0, "acc_norm": 1.0}
    assert (scored.score, scored.prediction, scored.gold) == (1.0, "B", "B")


def test_arc_scores_generated_labels_and_loglikelihood() -> None:
    task = get_task("arc_easy")
    item = Item("arc-1", ARC_DOC)
    assert task.score(item, GenerateResponse(" A", 1), "generate").score == 1.0
    assert task.score(item, GenerateResponse(" (B)", 2), "generate").score == 0.0
    assert task.score(item, GenerateResponse(" friction", 2), "generate").prediction == "A"
    ll = task.score(item, LoglikelihoodResponse(logprobs=(-9.0, -6.0, -5.0)), "loglikelihood")
    # raw picks C (-5); per byte: -9/8 = -1.125, -6/9 = -0.67, -5/5 = -1 -> B; gold A
    assert (ll.score, ll.prediction, ll.metrics["acc_norm"]) == (0.0, "C", 0.0)


def test_arc_numeric_labels() -> None:
    doc = {
        "question": "Which unit measures mass?",
        "choices": {
            "text": ["liters", "grams", "meters", "degrees"],
            "label": ["1", "2", "3", "4"],
        },
        "answerKey": "2",
    }
    task = get_task("arc_easy")
    data = data_of("arc_easy", [doc])
    _, [request] = build_requests(task, data, TaskOptions())
    assert isinstance(request, GenerateRequest)
    assert "\n1. liters\n2. grams\n" in request.prompt
    assert task.score(data.items[0], GenerateResponse(" 2", 1), "generate").score == 1.0


def test_imdb_scores_words_and_loglikelihood() -> None:
    task = get_task("imdb")
    item = Item("i", {"text": "Loved it", "label": 1})
    assert task.score(item, GenerateResponse(" Positive.", 2), "generate").score == 1.0
    missing = task.score(item, GenerateResponse(" meh", 1), "generate")
    assert (missing.score, missing.metrics["answer_found"]) == (0.0, 0.0)
    ll = task.score(item, LoglikelihoodResponse(logprobs=(-3.0, -1.0)), "loglikelihood")
    assert (ll.score, ll.prediction, ll.gold) == (1.0, "positive", "positive")


def test_wrong_response_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        get_task("hellaswag").score(
            Item("h", HELLASWAG_DOC), GenerateResponse("A", 1), "loglikelihood"
        )


# --- aggregation --------------------------------------------------------------------------------


def test_aggregate_is_the_mean_of_item_metrics_with_the_primary_metric() -> None:
    task = get_task("squad_v2")
    scored = [
        Scored(1.0, "x", "x", {"f1": 1.0, "exact_match": 1.0, "HasAns_f1": 1.0}),
        Scored(0.5, "x", "x", {"f1": 0.5, "exact_match": 0.0, "HasAns_f1": 0.5}),
        Scored(0.0, "x", "", {"f1": 0.0, "exact_match": 0.0, "NoAns_f1": 0.0}),
        Scored(1.0, "", "", {"f1": 1.0, "exact_match": 1.0, "NoAns_f1": 1.0}),
    ]
    metrics = task.aggregate(scored)
    assert metrics["f1"] == pytest.approx(0.625)
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert metrics["HasAns_f1"] == pytest.approx(0.75)
    assert metrics["NoAns_f1"] == pytest.approx(0.5)


def test_aggregate_adds_the_primary_metric_from_score() -> None:
    metrics = get_task("imdb").aggregate([Scored(1.0, "", ""), Scored(0.0, "", "")])
    assert metrics == {"acc": 0.5}


def test_tasks_and_scoring_load_no_heavy_modules() -> None:
    """The UI process imports tasks and scoring: no torch, transformers, datasets or Textual."""
    code = (
        "import sys\n"
        "from slmtui.spec import TaskOptions\n"
        "from slmtui.tasks import TASK_NAMES, build_requests, get_task, load_task_data\n"
        "import slmtui.scoring\n"
        "for name in TASK_NAMES:\n"
        "    data = load_task_data(name, TaskOptions(), None)\n"
        "    build_requests(get_task(name), data, TaskOptions())\n"
        "heavy = ('torch', 'transformers', 'accelerate', 'datasets', 'textual')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]"
