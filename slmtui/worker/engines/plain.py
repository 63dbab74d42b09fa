"""The reference engine: transformers ``generate`` and one plain forward per log-likelihood batch.

Slow on a GPU (Python overhead per token, see DESIGN.md) but simple and exact; the fast engine is
judged against it.

generate
    Requests are sorted longest prompt first (an OOM shows at once, the ETA over-estimates),
    batched ``batch_size`` at a time, left-padded, decoded greedily. A StoppingCriteria marks a
    sequence finished when its text holds one of its stop strings (checked on the last few
    tokens, as lm-evaluation-harness does) or when it used its own ``max_new_tokens``; the batch
    ends when every sequence has finished. Outputs are cut at the first stop string.
    ``tokens_out`` counts the tokens a sequence generated up to and including the token that
    completed its stop string or its EOS: the work done for it, not the padding steps it waited
    through while the rest of its batch finished.
    TTFT: a streamer records when ``generate`` hands out the first generated tokens of a batch
    (after the prefill and the first sampling step, on the host); every request of the batch
    gets that time since the batch started.

loglikelihood
    Every (context, continuation) pair is tokenised the lm-eval way: trailing spaces of the
    context move to the continuation, context + continuation is encoded whole and split at the
    context's token length; an empty context becomes [BOS] (else [EOS]). Pairs are sorted longest
    first and scored ``batch_size`` pairs per forward, left-padded with explicit position ids
    (positions match a batch of one); logits are computed only for the continuation positions.
    Inputs longer than the model's window keep their last tokens.

On an out-of-memory error the batch size halves and the batch is retried (down to 1).

load (``PlainEngine.load``, inherited by fast): ``worker.loading.load_model``. The rules that make
answers comparable across engines are functions here that every engine calls:
``finish_generation`` (cutting and counting an output), ``stop_window`` (how many tokens a stop
check decodes), ``split_pair`` (the lm-eval tokenisation of a log-likelihood pair).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
)
from slmtui.worker.engines.base import Completed, Engine, LoadedModel, Step, text_config

if TYPE_CHECKING:
    from slmtui.spec import RunSpec

AUTO_BATCH_SIZE_CPU = 8
AUTO_BATCH_SIZE_GPU = 32
"""``batch_size = "auto"`` where nothing better is known (plain; the fast engine's start)."""
R = TypeVar("R")

WARMUP_MAX_NEW_TOKENS = 8
"""Warm-up generations stop here: enough to touch every kernel of prefill and decode."""


def warmup_generations(requests: Sequence[GenerateRequest]) -> list[GenerateRequest]:
    """The requests capped at ``WARMUP_MAX_NEW_TOKENS``: warm-up touches every path, briefly."""
    return [
        GenerateRequest(r.prompt, min(r.max_new_tokens, WARMUP_MAX_NEW_TOKENS), r.stop)
        for r in requests
    ]


def is_oom(exc: BaseException) -> bool:
    """A CUDA (or allocator) out-of-memory error, whatever class it arrived in."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class PlainEngine(Engine):
    name = "plain"

    @classmethod
    def load(
        cls, spec: RunSpec, *, ctx: Any | None = None, on_step: Step | None = None
    ) -> LoadedModel | None:
        """The transformers model and tokenizer (``worker.loading.load_model``: hub, local
        directory or converted GGUF; several GPUs; quantised), shared with the fast engine."""
        from slmtui.worker.loading import load_model

        return load_model(
            spec.model,
            dtype=spec.dtype,
            gpus=spec.gpus,
            parallel=spec.parallel,
            ctx=ctx,
            quantize=spec.quantize,
            on_step=on_step,
        )

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int | str) -> None:
        device = next(model.parameters()).device
        auto = batch_size == "auto"
        if auto:
            batch_size = AUTO_BATCH_SIZE_GPU if device.type == "cuda" else AUTO_BATCH_SIZE_CPU
        super().__init__(model, tokenizer, batch_size=max(1, int(batch_size)))
        self.device = device
        self.notes: list[str] = []
        """Facts for the result (e.g. a batch size halved after an OOM)."""
        if auto and type(self) is PlainEngine:
            self.notes.append(f"batch_size auto: the plain engine used {self.batch_size}")
        self.max_length = _model_max_length(model)
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_ids: list[int] = sorted(set(eos_ids))
        self._encoded: dict[tuple[str, bool], list[int]] = {}
        """Token ids by (text, special tokens): ``prepare`` fills it before the window."""

    def prepare(
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Tokenise every prompt and (context, continuation) pair now, outside the window, in
        one batched tokenizer call per kind (the same ids as one call per text)."""
        texts: dict[bool, set[str]] = {True: {r.prompt for r in generate}, False: set()}
        for ll in loglikelihood:
            for continuation in ll.continuations:
                for text, special in pair_texts(ll.context, continuation):
                    texts[special].add(text)
        for special, wanted in texts.items():
            todo = sorted(t for t in wanted if (t, special) not in self._encoded)
            if todo:
                ids = self.tokenizer(todo, add_special_tokens=special)["input_ids"]
                for text, row in zip(todo, ids, strict=True):
                    self._encoded[(text, special)] = list(row)

    # -- warm-up --------------------------------------------------------------------------------

    def warmup(
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Run the given requests once (generation capped at a few tokens)."""
        for _ in self.generate(warmup_generations(generate)):
            pass
        for _ in self.loglikelihood(loglikelihood):
            pass

    # -- generate -------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> Iterator[Completed]:
        if not requests:
            return
        encoded = [self._encode(r.prompt) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        yield from self._in_batches(
            order,
            lambda batch: enumerate(
                self._generate_batch([requests[i] for i in batch], [encoded[i] for i in batch])
            ),
        )

    def _in_batches(
        self,
        order: list[int],
        answer: Callable[[list[int]], Iterable[tuple[int, Completed]]],
    ) -> Iterator[Completed]:
        """Answer the requests ``order`` lists, ``batch_size`` at a time, halving the batch
        size after an out-of-memory error. ``answer(batch)`` gives (row in batch, Completed)."""
        for start, _size, done in self._halving(
            len(order),
            lambda at: self.batch_size,
            lambda at, n: list(answer(order[at : at + n])),
        ):
            for row, completed in done:
                yield replace(completed, index=order[start + row], batch=start)

    def _halving(
        self, total: int, size_at: Callable[[int], int], answer: Callable[[int, int], R]
    ) -> Iterator[tuple[int, int, R]]:
        """The one batching loop: (start, size, ``answer(start, size)``) over items 0..total-1,
        ``size_at(start)`` items at a time; after an out-of-memory error the batch size halves
        (``size_at`` reads it) and the same items are tried again, down to 1."""
        start = 0
        while start < total:
            size = max(1, min(size_at(start), total - start))
            try:
                result = answer(start, size)
            except Exception as exc:
                if not is_oom(exc) or self.batch_size == 1:
                    raise
                self._halve_batch(exc)
                continue
            yield start, size, result
            start += size

    def _generate_batch(
        self, requests: list[GenerateRequest], encoded: list[list[int]]
    ) -> list[Completed]:
        budget = max(r.max_new_tokens for r in requests)
        room = self.max_length - budget
        encoded = [ids[-room:] if room > 0 and len(ids) > room else ids for ids in encoded]
        input_ids, attention_mask = _pad(encoded, self.tokenizer.pad_token_id, left=True)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        stopper = _StopCriteria(self.tokenizer, requests)
        streamer = _FirstTokenStreamer(self._count_generated)
        started = time.perf_counter()
        streamer.started = started
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=budget,
                do_sample=False,
                num_beams=1,
                stopping_criteria=[stopper],
                streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos_ids or None,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        ttft_s = streamer.first_token_s
        elapsed_s = time.perf_counter() - started
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        steps = len(new_tokens[0]) if new_tokens else 0
        # every row gets one token per step of the batch: the step time is each row's ITL
        itl_s = (elapsed_s - ttft_s) / (steps - 1) if ttft_s is not None and steps > 1 else None
        done = []
        for row, (request, ids) in enumerate(zip(requests, new_tokens, strict=True)):
            text, tokens_out = self._finish(request, ids, stopper.stopped_at[row])
            done.append(
                Completed(
                    index=row,
                    response=GenerateResponse(text=text, tokens_out=tokens_out),
                    tokens_in=len(encoded[row]),
                    tokens_out=tokens_out,
                    ttft_s=ttft_s,
                    itl_s=itl_s if tokens_out > 1 else None,
                )
            )
        return done

    def _count_generated(self, n: int) -> None:
        self.live_tokens += n

    def _finish(
        self, request: GenerateRequest, ids: list[int], stopped_at: int | None
    ) -> tuple[str, int]:
        """The output text cut at the first stop string, and the tokens it took."""
        return finish_generation(
            request,
            ids,
            stopped_at,
            is_end=self.eos_ids.__contains__,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
        )

    # -- loglikelihood --------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> Iterator[Completed]:
        pairs: list[tuple[int, int, list[int], list[int]]] = []
        for index, request in enumerate(requests):
            for choice, continuation in enumerate(request.continuations):
                context_ids, continuation_ids = self.encode_pair(request.context, continuation)
                pairs.append((index, choice, context_ids, continuation_ids))
        pairs.sort(key=lambda p: -(len(p[2]) + len(p[3])))
        logprobs: dict[int, dict[int, tuple[float, bool]]] = {i: {} for i in range(len(requests))}
        tokens_in: dict[int, int] = dict.fromkeys(range(len(requests)), 0)
        pending = {i: len(r.continuations) for i, r in enumerate(requests)}
        for index, request in enumerate(requests):
            if not request.continuations:
                yield Completed(index, LoglikelihoodResponse((), ()), 0, 0)
        for start, size, scored in self._halving(
            len(pairs),
            lambda at: self.batch_size,
            lambda at, n: self._score_pairs([(p[2], p[3]) for p in pairs[at : at + n]]),
        ):
            batch = pairs[start : start + size]
            for (index, choice, _, _), (logprob, greedy, n_in) in zip(batch, scored, strict=True):
                logprobs[index][choice] = (logprob, greedy)
                tokens_in[index] += n_in
                pending[index] -= 1
                if pending[index] == 0:
                    n = len(requests[index].continuations)
                    values = [logprobs[index][c] for c in range(n)]
                    yield Completed(
                        index=index,
                        response=LoglikelihoodResponse(
                            logprobs=tuple(v[0] for v in values),
                            greedy=tuple(v[1] for v in values),
                        ),
                        tokens_in=tokens_in[index],
                        tokens_out=0,
                    )

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as lm-evaluation-harness splits them."""
        prefix = self.tokenizer.bos_token_id
        if prefix is None:
            prefix = self.tokenizer.eos_token_id
        return split_pair(
            context, continuation, lambda text, special: self._encode(text, special=special), prefix
        )

    def _score_pairs(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool, int]]:
        """(summed log-prob, greedy, tokens fed) of each continuation, in one forward.

        Left padding with explicit position ids (so positions match a batch of one) puts every
        continuation at the end, so only the last ``max(len(continuation))`` positions need logits.
        """
        inputs = []
        spans = []
        for context_ids, continuation_ids in pairs:
            whole = (context_ids + continuation_ids)[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
            spans.append(min(len(continuation_ids), len(whole) - 1))
        input_ids, attention_mask = _pad(inputs, self.tokenizer.pad_token_id, left=True)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        keep = max(max(spans), 1)
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                position_ids=position_ids.to(self.device),
                logits_to_keep=keep,
            ).logits
        results = []
        for row, ((_, continuation_ids), n_cont, seq) in enumerate(
            zip(pairs, spans, inputs, strict=True)
        ):
            rows = logits[row, logits.shape[1] - n_cont :].float()
            logp = torch.log_softmax(rows, dim=-1)
            target = torch.tensor(
                continuation_ids[len(continuation_ids) - n_cont :], device=logp.device
            )
            picked = logp.gather(1, target[:, None]).squeeze(1)
            greedy = bool((logp.argmax(dim=-1) == target).all())
            results.append((float(picked.sum()), greedy, len(seq)))
        return results

    # -- shared ---------------------------------------------------------------------------------

    def _encode(self, text: str, *, special: bool = True) -> list[int]:
        key = (text, special)
        ids = self._encoded.get(key)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
            self._encoded[key] = ids
        return list(ids)

    def _halve_batch(self, exc: BaseException) -> None:
        old = self.batch_size
        self.batch_size = max(1, old // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.notes.append(f"out of memory at batch size {old}; went on with {self.batch_size}")


class _StopCriteria:
    """Per-sequence stop: a stop string in the last few tokens' text, or its own token budget.

    Records, per row, how many new tokens it took to finish (``stopped_at``).
    """

    def __init__(self, tokenizer: Any, requests: Sequence[GenerateRequest]) -> None:
        self.tokenizer = tokenizer
        self.requests = list(requests)
        self.prompt_len: int | None = None
        self.stopped_at: list[int | None] = [None] * len(requests)
        self.windows = [
            stop_window(r, lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]))
            for r in requests
        ]

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1] - 1
        generated = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tails = None
        for row, request in enumerate(self.requests):
            if self.stopped_at[row] is not None:
                done[row] = True
                continue
            if generated >= request.max_new_tokens:
                done[row] = True
                continue
            if not request.stop:
                continue
            if tails is None:
                width = min(max(self.windows), generated)
                tails = input_ids[:, -width:].tolist()
            text = self.tokenizer.decode(tails[row][-min(self.windows[row], generated) :])
            if first_stop(text, request.stop) is not None:
                self.stopped_at[row] = generated
                done[row] = True
        return done


class _FirstTokenStreamer:
    """Notes when ``generate`` hands out its first generated tokens (the second ``put``), and
    counts every step's tokens as they come (``on_tokens``; rows already stopped included)."""

    def __init__(self, on_tokens: Callable[[int], None] | None = None) -> None:
        self.started = time.perf_counter()
        self.puts = 0
        self.first_token_s: float | None = None
        self.on_tokens = on_tokens

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_s = time.perf_counter() - self.started
        if self.puts >= 2 and self.on_tokens is not None:
            self.on_tokens(int(value.shape[0]) if hasattr(value, "shape") else 1)

    def end(self) -> None:
        pass


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stop_window(request: GenerateRequest, count_tokens: Callable[[str], int]) -> int:
    """How many of the last generated tokens a stop check decodes: the longest stop string's
    token count (``count_tokens``, without special tokens) plus 2."""
    return max((count_tokens(s) for s in request.stop), default=0) + 2


def finish_generation(
    request: GenerateRequest,
    ids: list[int],
    stopped_at: int | None,
    *,
    is_end: Callable[[int], bool],
    decode: Callable[[list[int]], str],
) -> tuple[str, int]:
    """The output text of generated ``ids`` cut at the first stop string, and the tokens it took
    (every engine's rule, see the module docstring).

    ``ids`` are cut at ``request.max_new_tokens`` and after the first end-of-sequence token
    (``is_end``: it counts, its text does not; ``decode`` skips special tokens). ``stopped_at``
    is how many tokens the stop check took to see a stop string, when it saw one; otherwise the
    fewest leading tokens whose text holds it are found by binary search.
    """
    ids = ids[: request.max_new_tokens]
    end = len(ids)
    for pos, token in enumerate(ids):
        if is_end(token):
            end = pos + 1  # the EOS was generated: it counts, its text does not
            break
    text = decode(ids[:end])
    cut = first_stop(text, request.stop)
    if cut is None:
        return text, end
    tokens_out = stopped_at if stopped_at is not None else _tokens_to_stop(ids, request, decode)
    return text[:cut], min(tokens_out, end)


def _tokens_to_stop(
    ids: list[int], request: GenerateRequest, decode: Callable[[list[int]], str]
) -> int:
    """Fewest leading tokens whose text holds a stop string (binary search)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if first_stop(decode(ids[:mid]), request.stop) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def pair_texts(context: str, continuation: str) -> list[tuple[str, bool]]:
    """The texts ``split_pair`` tokenises, with their special-tokens flag: the continuation
    alone for an empty context, else context + continuation and the context, after the
    context's trailing spaces moved to the continuation (lm-eval)."""
    if not context:
        return [(continuation, False)]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    return [(context + continuation, True), (context, True)]


def split_pair(
    context: str,
    continuation: str,
    encode: Callable[[str, bool], list[int]],
    empty_context: int,
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness splits them: context +
    continuation encoded whole (``encode(text, special_tokens)``) and split at the context's
    own token length; an empty context is ``[empty_context]`` (BOS, else EOS)."""
    if not context:
        return [empty_context], encode(continuation, False)
    (whole_text, _), (context_text, _) = pair_texts(context, continuation)
    whole = encode(whole_text, True)
    context_ids = encode(context_text, True)
    return whole[: len(context_ids)], whole[len(context_ids) :]


def _pad(rows: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if left:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        else:
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
    return ids, mask


def _model_max_length(model: Any) -> int:
    """The model's context window (positions it was trained on); 2048 when it does not say."""
    decoder = text_config(model.config)
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(decoder, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
