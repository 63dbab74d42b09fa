"""Decode steps captured in CUDA graphs, one per batch-size bucket (1, 2, 4, ..., max_batch).

A bucket's graph runs the step over the first ``rows`` slot rows. Every bucket shares one memory
pool (they never replay at once): without it each graph keeps its own intermediates, ~+40% peak
memory over plain at batch 64.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def buckets(max_batch: int, smallest: int = 1) -> list[int]:
    """``smallest``, twice that, ... below ``max_batch``, and ``max_batch`` itself.

    A compiled step starts at 2 rows: ``torch.compile`` specialises a dimension of size 1, so
    a bucket of 1 would cost a compile of its own (one row runs in the 2-row graph instead).
    """
    smallest = max(1, min(smallest, max_batch))
    sizes = {max_batch}
    size = smallest
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def bucket_for(n: int, max_batch: int, smallest: int = 1) -> int:
    """The smallest bucket holding ``n`` rows."""
    return next(size for size in buckets(max_batch, smallest) if size >= min(n, max_batch))


class DecodeGraphs:
    """The captured graphs and the logits tensor each one writes."""

    def __init__(self) -> None:
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: Any = None
        self.capture_s = 0.0
        """Seconds spent capturing (each bucket's eager warm-up steps included)."""

    def __contains__(self, rows: int) -> bool:
        return rows in self.graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def capture(
        self, rows: int, step: Callable[[int], torch.Tensor], warmup: Callable[[int], None]
    ) -> None:
        """Run ``warmup(rows)`` on a side stream, then capture ``step(rows)``.

        The caller makes both harmless to the sequences in flight (rows not decoding write only
        the trash slot) and restores its small decode buffers afterwards.
        """
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warmup(rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step(rows)
        torch.cuda.synchronize()
        self.graphs[rows] = graph
        self.logits[rows] = logits
        self.capture_s += time.perf_counter() - started

    def replay(self, rows: int) -> torch.Tensor:
        self.graphs[rows].replay()
        return self.logits[rows]

    def clear(self) -> None:
        self.graphs.clear()
        self.logits.clear()
        self.pool = None
