"""Packed log-likelihood: the choices of one request share their context in one row.

A request's choices that share their context tokens (lm-evaluation-harness's split, as plain
tokenises them) become one row: the context once, then each choice's tokens, with a 4-D mask so a
choice sees the context and its own earlier tokens only, and position ids restarting after the
context for every choice. Rows are sorted longest first and batched; each batch's tensors are
built on the host in one go (two transfers), the mask on the device from segment ids, and the
log-probs gathered and summed per choice on the device: nothing comes back to the host until a
batch's sums and miss counts do, one batch behind the next forward (``PendingScores``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from slmtui.tasks.base import LoglikelihoodRequest

SOFTMAX_BLOCK = 1024
"""Scored positions per float32 log-softmax call in ``sum_logprobs``."""


@dataclass
class PackedGroup:
    """One request's choices that share their context tokens: packed into one row."""

    index: int
    context: list[int]
    choices: list[tuple[int, list[int]]]
    """(choice number, continuation token ids)."""

    def input_length(self) -> int:
        return len(self.context) + sum(max(len(ids) - 1, 0) for _, ids in self.choices)

    def scored_positions(self) -> int:
        """Columns at the row's end whose logits are needed (the last context token onwards)."""
        return 1 + sum(max(len(ids) - 1, 0) for _, ids in self.choices)

    def layout(self) -> tuple[list[int], list[int], list[int], list[tuple[list[int], list[int]]]]:
        """(tokens, position ids, segment ids, per choice (predicting columns, target tokens)).

        A continuation's last token is never an input (nothing is predicted from it).
        """
        tokens = list(self.context)
        positions = list(range(len(self.context)))
        segments = [0] * len(self.context)
        predict = []
        last_context = len(self.context) - 1
        for k, (_, ids) in enumerate(self.choices):
            start = len(tokens)
            fed = ids[:-1]
            tokens += fed
            positions += range(len(self.context), len(self.context) + len(fed))
            segments += [k + 1] * len(fed)
            columns = [last_context, *range(start, start + len(fed))] if ids else []
            predict.append((columns, list(ids)))
        return tokens, positions, segments, predict


@dataclass
class Packed:
    groups: list[PackedGroup]
    """Longest first."""
    unpacked: list[tuple[int, int, list[int], list[int]]]
    """(request, choice, context ids, continuation ids) too long for the window once packed."""
    empty: list[int]
    """Requests without choices."""


def pack_requests(
    requests: Sequence[LoglikelihoodRequest],
    encode_pair: Callable[[str, str], tuple[list[int], list[int]]],
    max_length: int,
) -> Packed:
    groups: list[PackedGroup] = []
    unpacked: list[tuple[int, int, list[int], list[int]]] = []
    empty: list[int] = []
    for index, request in enumerate(requests):
        if not request.continuations:
            empty.append(index)
            continue
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for choice, continuation in enumerate(request.continuations):
            context_ids, continuation_ids = encode_pair(request.context, continuation)
            by_context.setdefault(tuple(context_ids), []).append((choice, continuation_ids))
        for context_ids, choices in by_context.items():
            group = PackedGroup(index, list(context_ids), choices)
            if group.input_length() > max_length:
                unpacked += [(index, c, list(context_ids), ids) for c, ids in choices]
            else:
                groups.append(group)
    groups.sort(key=lambda g: -g.input_length())
    return Packed(groups, unpacked, empty)


def take_batch(
    groups: Sequence[PackedGroup],
    start: int,
    rows: int,
    tokens: int,
    logit_positions: int | None = None,
) -> int:
    """How many groups from ``start`` make the next forward: at most ``rows`` rows,
    ``tokens`` padded tokens (rows x the first, longest, row) and, when given,
    ``logit_positions`` kept logits (rows x the batch's ``keep``: with a 262k-token vocabulary
    the logits, not the activations, are what fills the GPU); never fewer than one."""
    width = groups[start].input_length()
    fit = min(max(1, min(rows, tokens // max(width, 1))), len(groups) - start)
    if logit_positions is None:
        return fit
    keep = 1
    for n in range(fit):
        keep = max(keep, groups[start + n].scored_positions())
        if n and (n + 1) * keep > logit_positions:
            return n
    return fit


@dataclass
class PackedBatch:
    """One forward's inputs, on the host until ``to``."""

    rows_in: torch.Tensor
    """[3, rows, width]: token ids, position ids, segment ids (-1 padding, 0 context, k+1
    choice k), left-padded."""
    picks: torch.Tensor
    """[4, scored tokens]: row, column among the last ``keep``, target token, flat choice."""
    keep: int
    choices: int

    def to(self, device: torch.device) -> PackedBatch:
        if device.type == "cpu":
            return self
        return PackedBatch(
            self.rows_in.pin_memory().to(device, non_blocking=True),
            self.picks.pin_memory().to(device, non_blocking=True),
            self.keep,
            self.choices,
        )


def build_batch(groups: Sequence[PackedGroup], pad_id: int) -> PackedBatch:
    width = max(g.input_length() for g in groups)
    keep = max(max(g.scored_positions(), 1) for g in groups)
    ids: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    picks: list[list[int]] = [[], [], [], []]
    flat = 0
    for r, group in enumerate(groups):
        tokens, pos, seg, predict = group.layout()
        offset = width - len(tokens)
        ids += [pad_id] * offset + tokens
        positions += [0] * offset + pos
        segments += [-1] * offset + seg
        shift = offset - (width - keep)
        for k, (columns, targets) in enumerate(predict):
            picks[0] += [r] * len(columns)
            picks[1] += [c + shift for c in columns]
            picks[2] += targets
            picks[3] += [flat + k] * len(columns)
        flat += len(group.choices)
    rows_in = torch.tensor([ids, positions, segments], dtype=torch.long).view(3, len(groups), width)
    return PackedBatch(rows_in, torch.tensor(picks, dtype=torch.long), keep, flat)


def packed_mask(segment: torch.Tensor) -> torch.Tensor:
    """[rows, 1, width, width] boolean: causal, a choice sees the context and itself, padding
    only itself."""
    width = segment.shape[1]
    query_seg = segment[:, :, None]
    key_seg = segment[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool, device=segment.device).tril()
    allowed = causal[None] & ((key_seg == 0) | (key_seg == query_seg)) & (key_seg >= 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)[None]
    return allowed[:, None]


def sum_logprobs(logits: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, missed greedy tokens) per flat choice, on the device.

    Only the scored positions' logits are read; log-softmax in float32 as plain does.
    """
    rows, cols, targets, owners = batch.picks
    picked_logits = logits[rows, cols]
    # float32 log-softmax a block of positions at a time: the same values as one call, without
    # a float32 copy of every scored position's logits (4 bytes x the vocabulary each)
    picked = torch.cat(
        [
            torch.log_softmax(block, dim=-1, dtype=torch.float32).gather(1, t[:, None]).squeeze(1)
            for block, t in zip(
                picked_logits.split(SOFTMAX_BLOCK), targets.split(SOFTMAX_BLOCK), strict=True
            )
        ]
    )
    miss = (picked_logits.argmax(dim=-1) != targets).to(torch.int32)
    sums = torch.zeros(batch.choices, dtype=torch.float32, device=logits.device)
    misses = torch.zeros(batch.choices, dtype=torch.int32, device=logits.device)
    return sums.index_add_(0, owners, picked), misses.index_add_(0, owners, miss)


class PendingScores:
    """A batch's sums on their way to the host: copied without blocking, read when needed."""

    def __init__(self, sums: torch.Tensor, misses: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if sums.device.type == "cuda":
            self.sums = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            self.misses = torch.empty(misses.shape, dtype=misses.dtype, pin_memory=True)
            self.sums.copy_(sums, non_blocking=True)
            self.misses.copy_(misses, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.sums, self.misses = sums, misses

    def read(self) -> list[tuple[float, bool]]:
        if self.event is not None:
            self.event.synchronize()
        return [(s, m == 0) for s, m in zip(self.sums.tolist(), self.misses.tolist(), strict=True)]
