"""Continuous batching: the scheduler loop that keeps every slot row of the cache busy.

Requests wait in the order given (the engine passes them longest prompt first). Each iteration:

1. admit: every free slot row takes the next waiting request at once;
2. prefill: every row still reading its prompt gets one chunk of it (at most ``chunk_tokens``
   tokens; a longer prompt takes several iterations, with the others' decode in between), in
   forwards of at most ``forward_tokens`` padded tokens; a row whose prompt is complete has its
   first token and starts decoding (unless that token used its whole budget);
3. decode: ``check_every`` steps (fewer when every decoding row's budget ends sooner) over the
   first ``rows`` rows, rows not decoding held still on the device;
4. fetch: the new tokens come to the host (one synchronise), each row is checked for EOS, a stop
   string or its budget; a finished row is answered and its slot freed for step 1.

When nothing waits and the rows in flight fit a smaller bucket, they move to the front and the
smaller bucket's decode graph runs on: finished sequences stop costing work.

Timing per sequence (``Completed``): ``ttft_s`` is from taking a slot to its first token (the
prefill synchronises), ``itl_s`` the mean gap between its consecutive tokens up to its last
counted one; a decode token's time is interpolated evenly over the chunk of steps it came from.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from slmtui.tasks.base import GenerateRequest, GenerateResponse
from slmtui.worker.engines.base import Completed


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``tokens`` at positions ``start``.. of slot row ``row``."""

    row: int
    tokens: list[int]
    start: int
    last: bool
    """The prompt's last chunk: its logits give the first generated token."""
    decode: bool
    """After the last chunk, the row decodes on (its budget is more than one token)."""
    new_tokens: int | None = None
    """The request's budget (read with the last chunk): the row stops writing the cache once
    it has it, while rows with more to go decode on in the same chunk of steps. None: no
    limit (teacher forcing, warm-up)."""


class SlotDecoder(Protocol):
    """What the loop needs from the engine (``FastEngine`` implements it)."""

    max_batch: int

    def prefill(self, chunks: Sequence[PrefillChunk]) -> None:
        """Write the chunks into the cache; the last chunks set their row's first token."""

    def decode(self, rows: int, steps: int) -> None:
        """``steps`` decode steps over the first ``rows`` rows (rows not decoding hold still)."""

    def fetch(
        self, rows: int, steps: int, firsts: Sequence[int]
    ) -> tuple[list[int], list[list[int]]]:
        """(first token of each row in ``firsts``, the last ``steps`` tokens of rows 0..rows-1);
        a synchronise. Resets the step counter."""

    def stop_rows(self, rows: Sequence[int]) -> None:
        """These rows decode no more (finished, or out of budget)."""

    def move_rows_to_front(self, rows: Sequence[int]) -> None:
        """Rows ``rows`` (in that order) become rows 0..len-1."""

    def synchronize(self) -> None: ...

    def ready_bucket(self, n: int) -> int:
        """The smallest decode bucket holding ``n`` rows that can run now."""

    def is_finished(self, request: GenerateRequest, tokens: list[int]) -> bool: ...

    def finish(self, request: GenerateRequest, tokens: list[int]) -> tuple[str, int]:
        """The output text and the tokens it took (plain's cutting rules)."""


@dataclass
class _Sequence:
    index: int
    request: GenerateRequest
    prompt: list[int]
    row: int = -1
    prefilled: int = 0
    generated: int = 0
    """Tokens the device has produced for it (fetched or not)."""
    decoding: bool = False
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    admitted_s: float = 0.0
    batch: int = -1
    """The iteration whose prefill gave its first token (its prefill group)."""


@dataclass
class LoopSettings:
    check_every: int = 16
    """Decode steps between host checks (one synchronise each)."""
    chunk_tokens: int = 2048
    """Most prompt tokens of one row in one prefill forward."""
    forward_tokens: int = 16384
    """Most padded tokens (rows x width) in one prefill forward."""


def run_continuous(
    decoder: SlotDecoder,
    requests: Sequence[GenerateRequest],
    prompts: Sequence[list[int]],
    order: Sequence[int],
    settings: LoopSettings,
    on_tokens: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[tuple[int, Completed]]:
    """Answer ``requests`` (``prompts`` already tokenised and cut to fit); yields
    (request index, Completed) as each finishes. ``on_tokens(n)``: n more tokens generated."""
    waiting = deque(
        _Sequence(i, requests[i], list(prompts[i])) for i in order if requests[i].max_new_tokens > 0
    )
    for i in order:
        if requests[i].max_new_tokens <= 0:
            yield i, Completed(i, GenerateResponse("", 0), len(prompts[i]), 0, 0.0)
    rows: list[_Sequence | None] = [None] * decoder.max_batch
    iteration = 0
    while waiting or any(s is not None for s in rows):
        iteration += 1
        now = clock()
        for r in range(decoder.max_batch):
            if rows[r] is None and waiting:
                seq = waiting.popleft()
                seq.row, seq.admitted_s = r, now
                rows[r] = seq
        firsts = _prefill(decoder, rows, settings, iteration)
        decode_started = clock()
        for r in firsts:
            seq = rows[r]
            assert seq is not None
            seq.times.append(decode_started)
        decoding = [s for s in rows if s is not None and s.decoding]
        highest = max((s.row for s in rows if s is not None), default=-1)
        bucket = decoder.ready_bucket(highest + 1) if highest >= 0 else 0
        steps = 0
        if decoding:
            steps = min(
                settings.check_every,
                max(s.request.max_new_tokens - s.generated for s in decoding),
            )
            decoder.decode(bucket, steps)
        if not firsts and not steps:
            continue  # only prompt chunks this time
        first_tokens, new = decoder.fetch(bucket, steps, firsts)
        fetched = clock()
        counted = len(firsts)
        for r, token in zip(firsts, first_tokens, strict=True):
            seq = rows[r]
            assert seq is not None
            seq.tokens.append(token)
        span = (fetched - decode_started) / steps if steps else 0.0
        for seq in decoding:
            seq.tokens += new[seq.row][:steps]
            seq.times += [decode_started + span * (k + 1) for k in range(steps)]
            seq.generated += steps
            counted += steps
        if on_tokens is not None:
            on_tokens(counted)
        done: list[int] = []
        for seq in (s for s in rows if s is not None and s.tokens):
            # a row at its budget is finished here (plain's rule), so no row decodes past it
            # for more than the chunk it reached its budget in
            if decoder.is_finished(seq.request, seq.tokens):
                done.append(seq.row)
                yield seq.index, _completed(decoder, seq)
        if done:
            decoder.stop_rows(done)
        for r in done:
            rows[r] = None
        if not waiting:
            _compact(decoder, rows)


def _prefill(
    decoder: SlotDecoder, rows: list[_Sequence | None], settings: LoopSettings, iteration: int
) -> list[int]:
    """One chunk for every row still reading its prompt; returns the rows that completed it."""
    chunks: list[PrefillChunk] = []
    for seq in rows:
        if seq is None or seq.prefilled >= len(seq.prompt):
            continue
        end = min(len(seq.prompt), seq.prefilled + settings.chunk_tokens)
        last = end == len(seq.prompt)
        chunks.append(
            PrefillChunk(
                seq.row,
                seq.prompt[seq.prefilled : end],
                seq.prefilled,
                last,
                last and seq.request.max_new_tokens > 1,
                seq.request.max_new_tokens,
            )
        )
        seq.prefilled = end
    if not chunks:
        return []
    chunks.sort(key=lambda c: -len(c.tokens))
    group: list[PrefillChunk] = []
    for chunk in chunks:
        if group and (len(group) + 1) * len(group[0].tokens) > settings.forward_tokens:
            decoder.prefill(group)
            group = []
        group.append(chunk)
    decoder.prefill(group)
    decoder.synchronize()  # the first tokens exist now: TTFT is exact
    firsts = []
    for chunk in chunks:
        if chunk.last:
            seq = rows[chunk.row]
            assert seq is not None
            seq.generated, seq.decoding, seq.batch = 1, chunk.decode, iteration
            firsts.append(chunk.row)
    return sorted(firsts)


def _completed(decoder: SlotDecoder, seq: _Sequence) -> Completed:
    text, tokens_out = decoder.finish(seq.request, seq.tokens)
    ttft_s = seq.times[0] - seq.admitted_s if seq.times else None
    itl_s = None
    if tokens_out > 1:
        itl_s = (seq.times[tokens_out - 1] - seq.times[0]) / (tokens_out - 1)
    return Completed(
        seq.index,
        GenerateResponse(text=text, tokens_out=tokens_out),
        len(seq.prompt),
        tokens_out,
        ttft_s,
        batch=seq.batch,
        itl_s=itl_s,
    )


def _compact(decoder: SlotDecoder, rows: list[_Sequence | None]) -> None:
    """Live rows to the front when they fit a smaller bucket than the one they span."""
    live = [r for r, s in enumerate(rows) if s is not None]
    if not live:
        return
    target = decoder.ready_bucket(len(live))
    if target >= decoder.ready_bucket(live[-1] + 1):
        return
    decoder.move_rows_to_front(live)
    moved = [rows[r] for r in live]
    for r in range(len(rows)):
        rows[r] = moved[r] if r < len(moved) else None
    for r, seq in enumerate(moved):
        assert seq is not None
        seq.row = r
