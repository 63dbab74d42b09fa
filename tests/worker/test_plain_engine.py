"""The plain engine on the tiny random model, in float32 on the CPU (where token identity holds)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slmtui.tasks.base import GenerateRequest, LoglikelihoodRequest, LoglikelihoodResponse
from slmtui.worker.engines.plain import PlainEngine

PROMPTS = (
    "Question: what is 2+2?\nAnswer:",
    "The cat sat on the",
    "A",
    "Once upon a time, in a land far away, there lived a",
    "x = 1; y = 2; z =",
)


def by_index(completions: Any) -> dict[int, Any]:
    return {c.index: c for c in completions}


def reference_logprob(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """Log P(continuation | context) from one unpadded forward over the whole text."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_loglikelihood_batch_equals_batch_of_one(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    requests = [
        LoglikelihoodRequest(context=p, continuations=(" yes", " no", " maybe not", "\n"))
        for p in PROMPTS
    ]
    batched = by_index(PlainEngine(model, tokenizer, batch_size=6).loglikelihood(requests))
    single = by_index(PlainEngine(model, tokenizer, batch_size=1).loglikelihood(requests))
    assert sorted(batched) == list(range(len(requests)))
    for i, request in enumerate(requests):
        got, one = batched[i].response, single[i].response
        assert isinstance(got, LoglikelihoodResponse)
        assert got.logprobs == pytest.approx(one.logprobs, abs=1e-4)
        assert got.greedy == one.greedy
        for choice, continuation in enumerate(request.continuations):
            expected = reference_logprob(model, tokenizer, request.context, continuation)
            assert got.logprobs[choice] == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_greedy_flag_marks_the_models_own_continuation(
    tiny_model: tuple[Any, Any],
):
    model, tokenizer = tiny_model
    engine = PlainEngine(model, tokenizer, batch_size=4)
    context = "The cat sat on the"
    own = next(engine.generate([GenerateRequest(context, 3)])).response.text
    assert len(own) == 3  # one character per token, no stop, no EOS in 3 steps
    other = "z" if own[0] != "z" else "q"
    [done] = engine.loglikelihood([LoglikelihoodRequest(context, (own, other + own[1:]))])
    assert done.response.greedy == (True, False)
    assert done.response.logprobs[0] > done.response.logprobs[1]


def test_loglikelihood_splits_the_lm_eval_way(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    engine = PlainEngine(model, tokenizer, batch_size=2)
    # Trailing spaces of the context move to the continuation.
    ctx, cont = engine.encode_pair("Answer: ", "yes")
    assert tokenizer.decode(ctx, skip_special_tokens=True) == "Answer:"
    assert tokenizer.decode(cont) == " yes"
    assert ctx[0] == tokenizer.bos_token_id
    # An empty context becomes [BOS]; the continuation is scored from it.
    ctx, cont = engine.encode_pair("", "hi")
    assert ctx == [tokenizer.bos_token_id]
    assert tokenizer.decode(cont) == "hi"
    [done] = engine.loglikelihood([LoglikelihoodRequest("", ("hi",))])
    assert done.response.logprobs[0] == pytest.approx(
        reference_logprob(model, tokenizer, "", "hi"), abs=1e-4
    )
    assert done.tokens_in == 2  # BOS + "h" feed the forward that predicts "h", "i"


def test_generate_batch_equals_batch_of_one(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    requests = [GenerateRequest(p, 12) for p in PROMPTS]
    batched = by_index(PlainEngine(model, tokenizer, batch_size=8).generate(requests))
    single = by_index(PlainEngine(model, tokenizer, batch_size=1).generate(requests))
    for i in range(len(requests)):
        assert batched[i].response.text == single[i].response.text
        assert batched[i].tokens_out == single[i].tokens_out
        assert batched[i].tokens_in == len(tokenizer(PROMPTS[i])["input_ids"])
        assert batched[i].ttft_s is not None and batched[i].ttft_s > 0


def test_stop_strings_cut_outputs_and_count_tokens_to_the_stop(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    engine = PlainEngine(model, tokenizer, batch_size=8)
    free = by_index(engine.generate([GenerateRequest(p, 20) for p in PROMPTS]))
    requests = []
    expected = []
    for i, prompt in enumerate(PROMPTS):
        text = free[i].response.text
        assert free[i].tokens_out == len(text) == 20  # one token per character, no EOS
        stop = text[6:8]  # a two-character stop string that first completes at ...
        cut = text.find(stop)
        requests.append(GenerateRequest(prompt, 20, stop=(stop, "never-seen")))
        expected.append((text[:cut], cut + 2))  # ... token cut + 2
    stopped = by_index(engine.generate(requests))
    for i, (text, tokens) in enumerate(expected):
        assert stopped[i].response.text == text
        assert stopped[i].response.tokens_out == stopped[i].tokens_out == tokens


def test_each_request_keeps_its_own_token_budget(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    engine = PlainEngine(model, tokenizer, batch_size=4)
    done = by_index(
        engine.generate([GenerateRequest(PROMPTS[0], 3), GenerateRequest(PROMPTS[1], 9)])
    )
    assert done[0].tokens_out == len(done[0].response.text) == 3
    assert done[1].tokens_out == len(done[1].response.text) == 9


def test_eos_ends_a_sequence_and_counts_as_generated(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    engine = PlainEngine(model, tokenizer, batch_size=2)
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 1e6  # beats the fixture's penalty: always EOS now
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        [done] = engine.generate([GenerateRequest("Hello", 10)])
    finally:
        handle.remove()
    assert done.response.text == ""
    assert done.tokens_out == 1


def test_out_of_memory_halves_the_batch_and_goes_on(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    engine = PlainEngine(model, tokenizer, batch_size=4)
    real = engine._score_pairs

    def picky(pairs: list[Any]) -> Any:
        if len(pairs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pairs)

    engine._score_pairs = picky  # type: ignore[method-assign]
    requests = [LoglikelihoodRequest(p, (" a", " b")) for p in PROMPTS[:3]]
    done = by_index(engine.loglikelihood(requests))
    assert sorted(done) == [0, 1, 2]
    assert engine.batch_size == 1
    assert engine.notes == [
        "out of memory at batch size 4; went on with 2",
        "out of memory at batch size 2; went on with 1",
    ]


def test_other_errors_are_not_mistaken_for_oom(tiny_model: tuple[Any, Any]):
    model, tokenizer = tiny_model
    engine = PlainEngine(model, tokenizer, batch_size=4)

    def broken(pairs: list[Any]) -> Any:
        raise RuntimeError("shape mismatch")

    engine._score_pairs = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(engine.loglikelihood([LoglikelihoodRequest("a", (" b",))]))
    assert engine.batch_size == 4
