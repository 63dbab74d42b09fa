"""Continuous batching in the fast engine: a finished row's slot takes the next request at once,
and every answer stays token-identical to plain (float32, CPU, batch of one)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slmtui.tasks.base import GenerateRequest
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.plain import PlainEngine

PROMPTS = (
    "Question: what is 2+2?\nAnswer:",
    "The cat sat on the",
    "A",
    "Once upon a time, in a land far away, there lived a",
    "x = 1; y = 2; z =",
    "",
    "Hello world",
    "0123456789",
)


def by_index(completions: Any) -> dict[int, Any]:
    return {c.index: c for c in completions}


def outputs(done: dict[int, Any]) -> list[tuple[str, int, int]]:
    return [(done[i].response.text, done[i].tokens_out, done[i].tokens_in) for i in sorted(done)]


def plain_answers(model: Any, tokenizer: Any, requests: list[GenerateRequest]) -> dict[int, Any]:
    return by_index(PlainEngine(model, tokenizer, batch_size=1).generate(requests))


class Admissions:
    """Records, per prefill forward, which rows took which prompt chunks."""

    def __init__(self, engine: FastEngine) -> None:
        self.calls: list[list[tuple[int, int, int]]] = []
        real = engine.prefill

        def spy(chunks: Any) -> None:
            self.calls.append([(c.row, c.start, len(c.tokens)) for c in chunks])
            real(chunks)

        engine.prefill = spy  # type: ignore[method-assign]


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_more_requests_than_slots_rows_finishing_at_different_steps(
    tiny_model: tuple[Any, Any], concurrency: int
):
    """Twelve requests with budgets 1..23 through 1, 3 and 8 slots: identical to plain."""
    model, tokenizer = tiny_model
    budgets = [3, 23, 1, 9, 17, 2, 12, 5, 20, 7, 4, 14]
    requests = [GenerateRequest(PROMPTS[i % 8] + str(i), n) for i, n in enumerate(budgets)]
    engine = FastEngine(model, tokenizer, batch_size=concurrency, check_every_tokens=3)
    admissions = Admissions(engine)
    fast = by_index(engine.generate(requests))
    assert outputs(fast) == outputs(plain_answers(model, tokenizer, requests))
    assert [fast[i].tokens_out for i in range(12)] == budgets
    rows_used = {row for call in admissions.calls for row, _, _ in call}
    assert rows_used == set(range(concurrency))
    if 1 < concurrency < len(requests):
        # refills: prefills came one after another as slots freed, not one batch at a time
        assert len(admissions.calls) > len(requests) / concurrency
    assert engine.notes == []


def test_a_freed_slot_is_refilled_before_the_longest_row_ends(tiny_model: tuple[Any, Any]):
    """Static batches would wait for the 40-token row; here the short ones' slot is reused."""
    model, tokenizer = tiny_model
    requests = [GenerateRequest("abc", 40), GenerateRequest("de", 2)] + [
        GenerateRequest(f"q{i}", 2) for i in range(4)
    ]
    engine = FastEngine(model, tokenizer, batch_size=2, check_every_tokens=2)
    admissions = Admissions(engine)
    steps: list[int] = []
    real_decode = engine.decode
    engine.decode = lambda rows, n: (steps.append(n), real_decode(rows, n))[1]  # type: ignore[method-assign]
    fast = by_index(engine.generate(requests))
    assert outputs(fast) == outputs(plain_answers(model, tokenizer, requests))
    # all four short requests went through row 1 while row 0 decoded its 40 tokens
    later = [call for call in admissions.calls[1:]]
    assert [row for call in later for row, _, _ in call] == [1, 1, 1, 1]
    assert sum(steps) < 40 + 2 * 5  # one pass of the long row, not one per static batch


def test_eos_and_stop_strings_mid_flight_free_their_slot(tiny_model: tuple[Any, Any]):
    """EOS after a newline and stop strings end rows at different steps while others refill."""
    model, tokenizer = tiny_model
    eos = tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    vocab = model.config.vocab_size
    state: dict[str, torch.Tensor] = {}

    def remember_ids(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        state["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def force(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        ids = state["ids"][:, -out.shape[1] :]
        bias = torch.zeros(vocab)
        bias[eos] = 1e6
        return out + (ids == newline)[..., None] * bias

    plain_engine = PlainEngine(model, tokenizer, batch_size=1)
    free = by_index(plain_engine.generate([GenerateRequest(p, 20) for p in PROMPTS]))
    requests = []
    for i, prompt in enumerate(PROMPTS):
        text = free[i].response.text
        stop = (text[4 + i % 5 : 6 + i % 5],) if i % 2 else ()
        requests.append(GenerateRequest(prompt, 20, stop=stop))
    requests += [GenerateRequest("ab\n", 6), GenerateRequest("Hi\nthere", 8)]
    pre = model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    post = model.lm_head.register_forward_hook(force)
    try:
        fast = by_index(
            FastEngine(model, tokenizer, batch_size=3, check_every_tokens=4).generate(requests)
        )
        plain = by_index(plain_engine.generate(requests))
    finally:
        pre.remove()
        post.remove()
    assert outputs(fast) == outputs(plain)
    assert fast[len(PROMPTS)].tokens_out == 1  # "ab\n": EOS at once
    assert len({fast[i].tokens_out for i in fast}) > 3  # rows really ended at different steps


@pytest.mark.parametrize("chunk", [4, 7])
def test_a_prompt_longer_than_a_prefill_chunk_is_read_in_chunks(
    tiny_model: tuple[Any, Any], chunk: int
):
    """Long prompts take several prefill forwards, interleaved with the others' decode."""
    model, tokenizer = tiny_model
    requests = [
        GenerateRequest("short", 12),
        GenerateRequest("The quick brown fox jumps over the lazy dog", 6),
        GenerateRequest("Once upon a time, in a land far away", 9),
        GenerateRequest("hi", 3),
    ]
    engine = FastEngine(model, tokenizer, batch_size=2, prefill_chunk_tokens=chunk)
    admissions = Admissions(engine)
    fast = by_index(engine.generate(requests))
    assert outputs(fast) == outputs(plain_answers(model, tokenizer, requests))
    starts = [start for call in admissions.calls for _, start, _ in call]
    assert max(starts) > 0 and all(n <= chunk for call in admissions.calls for _, _, n in call)


def test_each_sequence_reports_its_own_first_token_and_inter_token_latency(
    tiny_model: tuple[Any, Any],
):
    model, tokenizer = tiny_model
    requests = [
        GenerateRequest(p, n) for p, n in zip(PROMPTS, [1, 2, 9, 30, 5, 3, 8, 4], strict=True)
    ]
    engine = FastEngine(model, tokenizer, batch_size=3, check_every_tokens=4)
    fast = by_index(engine.generate(requests))
    for i, request in enumerate(requests):
        assert fast[i].ttft_s is not None and fast[i].ttft_s > 0
        if request.max_new_tokens > 1:
            assert fast[i].itl_s is not None and fast[i].itl_s > 0
        else:
            assert fast[i].itl_s is None
    assert engine.live_tokens >= sum(r.max_new_tokens for r in requests)


def test_prepare_sizes_the_cache_so_the_window_never_grows_it(tiny_model: tuple[Any, Any]):
    """The runner prepares every request before warm-up: the longest prompt fits at once."""
    model, tokenizer = tiny_model
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3
    requests = [GenerateRequest("short", 4), GenerateRequest(long_prompt, 10)]
    engine = FastEngine(model, tokenizer, batch_size=2)
    engine.prepare(requests, [])
    engine.warmup(requests[:1], [])
    capacity = engine._cache.capacity if engine._cache is not None else 0
    fast = by_index(engine.generate(requests))
    assert outputs(fast) == outputs(plain_answers(model, tokenizer, requests))
    assert engine._cache is not None and engine._cache.capacity == capacity
    assert not any("grown" in note for note in engine.notes)


def test_auto_batch_size_fills_half_the_free_memory_with_cache_rows(
    tiny_model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    """2 layers x 2 (K, V) x 2 KV heads x 8 dims x 4 bytes = 256 bytes a token; 36 tokens of
    prompt and budget + 64 of headroom = 25,600 bytes a row; half of 4,096,000 bytes holds 80
    rows: 64, the power of two below."""
    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size="auto")
    assert engine.kv_bytes_per_token() == 256
    requests = [GenerateRequest("x" * 25, 10) for _ in range(100)]  # 26 tokens with BOS
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4_096_000, 8_000_000))
    engine.device = torch.device("cuda")  # only the sizing reads it here
    engine.prepare(requests, [])
    assert engine.batch_size == engine.max_batch == 64
    assert any(n.startswith("batch_size auto: 64 sequences in flight") for n in engine.notes)
    engine.device = torch.device("cpu")
    small = FastEngine(model, tokenizer, batch_size="auto")
    small.device = torch.device("cuda")
    small.prepare(requests[:5], [])
    assert small.batch_size == 4  # never more slots than requests
    cpu = FastEngine(model, tokenizer, batch_size="auto")
    cpu.prepare(requests[:3], [])
    assert cpu.batch_size == 8 and "no GPU memory" in cpu.notes[-1]
    answers = by_index(cpu.generate(requests[:3]))
    assert outputs(answers) == outputs(plain_answers(model, tokenizer, requests[:3]))


def test_loglikelihood_out_of_memory_halves_the_rows_and_goes_on(tiny_model: tuple[Any, Any]):
    """The one batching loop (shared with plain): an OOM halves the batch, nothing is lost."""
    from slmtui.tasks.base import LoglikelihoodRequest

    model, tokenizer = tiny_model
    requests = [LoglikelihoodRequest(p, (" yes", " no")) for p in PROMPTS]
    engine = FastEngine(model, tokenizer, batch_size=8)
    real = engine._score_groups
    sizes: list[int] = []

    def flaky(groups: Any) -> Any:
        sizes.append(len(groups))
        if len(groups) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(groups)

    engine._score_groups = flaky  # type: ignore[method-assign]
    fast = by_index(engine.loglikelihood(requests))
    plain = by_index(PlainEngine(model, tokenizer, batch_size=1).loglikelihood(requests))
    assert sizes[:3] == [8, 4, 2] and engine.batch_size == 2
    assert any("out of memory at batch size 8" in n for n in engine.notes)
    for i in range(len(requests)):
        assert fast[i].response.logprobs == pytest.approx(plain[i].response.logprobs, abs=1e-4)


def test_prepare_tokenises_in_batches_to_the_same_ids(tiny_model: tuple[Any, Any]):
    """Ids from the batched tokenizer call in prepare equal one call per text."""
    from slmtui.tasks.base import LoglikelihoodRequest

    model, tokenizer = tiny_model
    generate = [GenerateRequest(p, 3) for p in PROMPTS]
    ll = [LoglikelihoodRequest("Answer: ", (" A", "B")), LoglikelihoodRequest("", ("Hi", " x"))]
    prepared = PlainEngine(model, tokenizer, batch_size=2)
    prepared.prepare(generate, ll)
    calls: list[Any] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return tokenizer(*args, **kwargs)

    prepared.tokenizer = Counting()
    fresh = PlainEngine(model, tokenizer, batch_size=2)
    for request in generate:
        assert prepared._encode(request.prompt) == fresh._encode(request.prompt)
    for request in ll:
        for continuation in request.continuations:
            got = prepared.encode_pair(request.context, continuation)
            assert got == fresh.encode_pair(request.context, continuation)
    assert calls == []  # everything came from prepare


def test_a_row_at_its_budget_stops_writing_while_longer_rows_decode_on(
    tiny_model: tuple[Any, Any],
):
    """The cache holds the longest request (prompt + budget) and no more. A row whose prompt
    nearly fills it and whose budget ends early in a 16-step chunk used to decode the whole
    chunk on, writing past the last slot (an IndexError here, a device-side assert on a GPU);
    now each row stops writing at its own budget and every answer is plain's."""
    model, tokenizer = tiny_model
    engine = FastEngine(model, tokenizer, batch_size=2, check_every_tokens=16)
    prompt_tokens = len(engine._encode("a"))
    long_prompt = "a" * (45 - prompt_tokens + 1)  # 45 tokens: + 2 new + the trash slot = 48
    requests = [GenerateRequest(long_prompt, 2), GenerateRequest("ab", 20)]
    engine.prepare(requests, [])
    done = by_index(engine.generate(requests))
    assert engine._cache is not None
    assert engine._cache.capacity == 48  # no slot to spare past the long row's budget
    assert outputs(done) == outputs(plain_answers(model, tokenizer, requests))
