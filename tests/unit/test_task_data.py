"""Loading task data: source order, schema errors with file/line/field, limit, ids, samples."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from slmtui.errors import UserError
from slmtui.spec import TaskOptions
from slmtui.tasks import TASK_NAMES, build_requests, get_task, load_task_data
from slmtui.tasks import data as task_data
from slmtui.tasks.base import GenerateResponse, LoglikelihoodResponse

SHARED_DATA = next(
    (
        p
        for p in (Path("/work/shared/data"), Path(__file__).parents[3] / "shared" / "data")
        if p.is_dir()
    ),
    None,
)

GSM8K_DOC = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
SQUAD_DOC = {
    "id": "q1",
    "title": "T",
    "context": "Odo commissioned it.",
    "question": "Who commissioned it?",
    "answers": {"text": ["Odo"], "answer_start": [0]},
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach for the network; the hub tests opt back in explicitly."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(task_data, "_hub_reachable_cache", {})


def write_jsonl(path: Path, docs: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


# --- source order ---------------------------------------------------------------------------


def test_explicit_file_beats_data_dir(tmp_path: Path) -> None:
    data_file = write_jsonl(tmp_path / "mine.jsonl", [GSM8K_DOC])
    write_jsonl(tmp_path / "dir" / "gsm8k" / "dev.jsonl", [GSM8K_DOC, GSM8K_DOC])
    data = load_task_data("gsm8k", TaskOptions(data_file=str(data_file)), str(tmp_path / "dir"))
    assert (data.source, data.location, len(data.items)) == ("file", str(data_file), 1)


def test_data_dir_beats_hub_and_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_data, "_hub_rows", lambda task: pytest.fail("hub consulted"))
    write_jsonl(tmp_path / "gsm8k" / "b.jsonl", [dict(GSM8K_DOC, question="second file")])
    write_jsonl(tmp_path / "gsm8k" / "a.jsonl", [dict(GSM8K_DOC, question="first file")])
    data = load_task_data("gsm8k", TaskOptions(), str(tmp_path))
    assert data.source == "data_dir"
    assert data.location == str(tmp_path / "gsm8k")
    assert [i.doc["question"] for i in data.items] == ["first file", "second file"]  # name order
    assert [i.id for i in data.items] == ["gsm8k-0", "gsm8k-1"]


def test_data_dir_without_the_task_falls_through_to_sample(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "imdb" / "dev.jsonl", [{"text": "ok", "label": 1}])
    data = load_task_data("gsm8k", TaskOptions(), str(tmp_path))
    assert data.source == "sample"
    assert data.location == "slmtui/tasks/samples/gsm8k.jsonl"


def test_missing_data_dir_and_file_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data_dir '.*nope' is not a directory"):
        load_task_data("gsm8k", TaskOptions(), str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"data_file '.*missing.jsonl' is not a file"):
        load_task_data("gsm8k", TaskOptions(data_file=str(tmp_path / "missing.jsonl")), None)


def test_offline_skips_the_hub_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_data, "hub_reachable", lambda: pytest.fail("probed while offline"))
    start = time.perf_counter()
    data = load_task_data("imdb", TaskOptions(), None)
    assert data.source == "sample"
    assert time.perf_counter() - start < 1.0


def test_unreachable_hub_is_detected_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("network is unreachable")

    monkeypatch.setattr(task_data.socket, "create_connection", refuse)
    start = time.perf_counter()
    assert task_data.hub_reachable() is False
    assert load_task_data("gsm8k", TaskOptions(limit=2), None).source == "sample"
    assert time.perf_counter() - start < 1.0


def test_hub_probe_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(*args: object, **kwargs: object) -> socket.socket:
        time.sleep(5)
        raise OSError("too late")

    monkeypatch.setattr(task_data.socket, "create_connection", hang)
    start = time.perf_counter()
    assert task_data.hub_reachable(timeout_s=0.2) is False
    assert time.perf_counter() - start < 1.0


def _fake_hub(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> None:
    monkeypatch.setattr(task_data, "hub_disabled", lambda: False)
    monkeypatch.setattr(task_data, "hub_reachable", lambda: True)
    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_hub_rows_are_validated_and_imdb_shuffled_with_the_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        # the hub's imdb test split is sorted by label
        return [{"text": f"r{i}", "label": 0 if i < 10 else 1} for i in range(20)]

    _fake_hub(monkeypatch, load_dataset)
    data = load_task_data("imdb", TaskOptions(limit=6, seed=0), None)
    assert calls == [("stanfordnlp/imdb", None, "test")]
    assert data.source == "hub"
    assert data.location == "stanfordnlp/imdb split test"
    assert len(data.items) == 6
    assert len(data.fewshot_pool) == 20
    assert {i.doc["label"] for i in data.items} == {0, 1}  # shuffled, not all negative
    again = load_task_data("imdb", TaskOptions(limit=6, seed=0), None)
    assert [i.doc["text"] for i in again.items] == [i.doc["text"] for i in data.items]


def test_bad_hub_row_names_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, lambda *a, **k: [GSM8K_DOC, {"question": "q", "answer": "no marker"}])
    with pytest.raises(
        UserError, match=r"hub openai/gsm8k \(main\) split test row 2: field 'answer'"
    ):
        load_task_data("gsm8k", TaskOptions(), None)


def test_any_hub_failure_falls_back_to_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ConnectionError("hub down")

    _fake_hub(monkeypatch, broken)
    assert load_task_data("squad_v2", TaskOptions(), None).source == "sample"


# --- schema errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "bad_doc", "message"),
    [
        ("gsm8k", {"question": "q", "answer": "4"}, "field 'answer' must end with '#### <number>'"),
        ("gsm8k", {"answer": "#### 4"}, "field 'question' must be a non-empty string"),
        (
            "squad_v2",
            dict(SQUAD_DOC, answers=["Odo"]),
            "field 'answers' must be an object with 'text' and 'answer_start' lists",
        ),
        (
            "squad_v2",
            dict(SQUAD_DOC, answers={"text": ["Odo"], "answer_start": []}),
            "field 'answers' must have as many 'answer_start' entries as 'text' entries",
        ),
        (
            "hellaswag",
            {
                "activity_label": "a",
                "ctx_a": "b",
                "ctx_b": "c",
                "endings": ["1", "2", "3"],
                "label": "0",
            },
            "field 'endings' must hold 4 to 4 strings, not 3",
        ),
        (
            "hellaswag",
            {
                "activity_label": "a",
                "ctx_a": "b",
                "ctx_b": "c",
                "endings": list("wxyz"),
                "label": "4",
            },
            "field 'label' must be '0' to '3'",
        ),
        (
            "arc_easy",
            {
                "question": "q",
                "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                "answerKey": "C",
            },
            "field 'answerKey' must be one of the choice labels",
        ),
        (
            "arc_easy",
            {"question": "q", "choices": {"text": ["x", "y"], "label": ["A"]}, "answerKey": "A"},
            "field 'choices.label' must hold 2 to 8 strings, not 1",
        ),
        ("imdb", {"text": "fine", "label": "positive"}, "field 'label' must be 0 .negative. or 1"),
        ("imdb", {"text": "fine", "label": True}, "field 'label' must be 0"),
    ],
)
def test_bad_line_names_file_line_and_field(
    tmp_path: Path, task: str, bad_doc: dict[str, Any], message: str
) -> None:
    good = json.loads(
        (Path(task_data.__file__).parent / "samples" / f"{task}.jsonl").read_text().splitlines()[0]
    )
    path = tmp_path / task / "dev.jsonl"
    path.parent.mkdir()
    # line 1 good, line 2 blank (skipped, still counted), line 3 bad
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad_doc) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{re.escape(str(path))} line 3: {message}"):
        load_task_data(task, TaskOptions(), str(tmp_path))


def test_invalid_json_and_non_objects_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GSM8K_DOC) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl line 2: not valid JSON"):
        load_task_data("gsm8k", TaskOptions(data_file=str(path)), None)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl line 1: must be a JSON object, not list"):
        load_task_data("gsm8k", TaskOptions(data_file=str(path)), None)


def test_empty_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no items"):
        load_task_data("gsm8k", TaskOptions(data_file=str(path)), None)


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "multi\nline", "answer": "x"}])
    with pytest.raises(UserError) as info:
        load_task_data("gsm8k", TaskOptions(data_file=str(path)), None)
    assert "\n" not in str(info.value)


# --- limit and ids --------------------------------------------------------------------------


def test_limit_keeps_the_first_items_in_file_order(tmp_path: Path) -> None:
    docs = [dict(GSM8K_DOC, question=f"q{i}") for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    data = load_task_data("gsm8k", TaskOptions(data_file=str(path), limit=3), None)
    assert [i.doc["question"] for i in data.items] == ["q0", "q1", "q2"]
    assert len(data.fewshot_pool) == 5
    more = load_task_data("gsm8k", TaskOptions(data_file=str(path), limit=50), None)
    assert len(more.items) == 5
    with pytest.raises(UserError, match="limit 0 must be 1 or more"):
        load_task_data("gsm8k", TaskOptions(data_file=str(path), limit=0), None)


def test_ids_come_from_the_data_and_stay_unique(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [SQUAD_DOC, SQUAD_DOC, dict(SQUAD_DOC, id="q9")])
    data = load_task_data("squad_v2", TaskOptions(data_file=str(path)), None)
    assert [i.id for i in data.items] == ["q1", "q1#2", "q9"]


# --- the embedded sample sets -----------------------------------------------------------------


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_sample_sets_validate_and_a_perfect_model_scores_one(task_name: str) -> None:
    task = get_task(task_name)
    data = load_task_data(task_name, TaskOptions(), None)
    assert data.source == "sample"
    assert 12 <= len(data.items) <= 20
    for mode in task.modes:
        _, requests = build_requests(task, data, TaskOptions(mode=mode))
        assert len(requests) == len(data.items)
        scored = [
            task.score(item, _perfect(task_name, item.doc, mode), mode) for item in data.items
        ]
        assert task.aggregate(scored)[task.primary_metric] == 1.0, mode


def _perfect(
    task_name: str, doc: dict[str, Any], mode: str
) -> GenerateResponse | LoglikelihoodResponse:
    """The response of a model that always knows the answer."""
    if task_name == "gsm8k":
        return GenerateResponse(doc["answer"], 10)
    if task_name == "squad_v2":
        texts = doc["answers"]["text"]
        return GenerateResponse(" " + (texts[0] if texts else "unanswerable"), 3)
    if task_name == "arc_easy" and mode == "generate":
        return GenerateResponse(" " + doc["answerKey"], 1)
    if task_name == "imdb" and mode == "generate":
        return GenerateResponse(" " + ("negative", "positive")[doc["label"]], 1)
    n = {"hellaswag": 4, "imdb": 2}.get(task_name) or len(doc["choices"]["label"])
    gold = {"hellaswag": lambda: int(doc["label"]), "imdb": lambda: doc["label"]}.get(
        task_name, lambda: doc["choices"]["label"].index(doc["answerKey"])
    )()
    return LoglikelihoodResponse(logprobs=tuple(-0.001 if i == gold else -100.0 for i in range(n)))


def test_sample_sets_cover_the_awkward_cases() -> None:
    squad = load_task_data("squad_v2", TaskOptions(), None).items
    assert sum(1 for i in squad if not i.doc["answers"]["text"]) >= 3
    for item in squad:  # answer_start points at the answer
        for text, start in zip(
            item.doc["answers"]["text"], item.doc["answers"]["answer_start"], strict=True
        ):
            assert item.doc["context"][start : start + len(text)] == text
    arc = load_task_data("arc_easy", TaskOptions(), None).items
    assert any(i.doc["choices"]["label"][0] == "1" for i in arc)
    assert {len(i.doc["choices"]["label"]) for i in arc} >= {3, 4, 5}
    imdb = load_task_data("imdb", TaskOptions(), None).items
    assert Counter(i.doc["label"] for i in imdb) == {0: 6, 1: 6}
    hellaswag = load_task_data("hellaswag", TaskOptions(), None).items
    assert Counter(i.doc["label"] for i in hellaswag) == {"0": 3, "1": 3, "2": 3, "3": 3}


# --- the real benchmark files -----------------------------------------------------------------


@pytest.mark.skipif(SHARED_DATA is None, reason="shared benchmark data not present")
@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_real_data_validates_and_builds_requests(task_name: str) -> None:
    task = get_task(task_name)
    data = load_task_data(task_name, TaskOptions(), str(SHARED_DATA))
    assert data.source == "data_dir"
    assert len(data.items) >= 100
    assert len({i.id for i in data.items}) == len(data.items)
    for mode in task.modes:
        options = TaskOptions(mode=mode, num_fewshot=None if task_name == "gsm8k" else 2)
        _, requests = build_requests(task, data, options)
        assert len(requests) == len(data.items)
        scored = [
            task.score(item, _perfect(task_name, item.doc, mode), mode) for item in data.items
        ]
        assert task.aggregate(scored)[task.primary_metric] == 1.0, mode
