"""The fast engine: the same answers as ``plain``, without the per-token Python overhead.

generate
    Requests are sorted longest prompt first and batched ``batch_size`` at a time, exactly as
    ``plain`` batches them (so prompt truncation at the model's window, which both do, cuts the
    same tokens; this engine also records it in ``notes``). Each batch:

    1. prefill: one ordinary forward over the left-padded prompts, writing keys and values into
       a preallocated KV cache (``SlotCache``: per layer [max_batch, kv_heads, capacity, head_dim],
       one allocation for every batch size) with an explicit 4-D mask and position ids;
    2. decode: one step = forward of one token per row + greedy argmax + buffer updates, all on
       the device. On CUDA the step is captured once per batch-size bucket (1, 2, 4, ...,
       batch_size) in a ``torch.cuda.CUDAGraph`` and replayed per token; on the CPU the same
       step runs eagerly (which is how the fp32 identity tests exercise this code).
    3. stopping: every ``CHECK_EVERY_TOKENS`` steps the new tokens come to the host; a row is
       finished on EOS, on a stop string in its text, or at its own ``max_new_tokens``. Tokens
       generated after a row finished are discarded (greedy rows are independent, so they change
       nothing). When the unfinished rows fit a smaller bucket, they are moved to the front of
       every buffer (KV cache included) and the smaller bucket's graph runs on: finished
       sequences stop costing work.

    Outputs are cut and counted with ``plain``'s own rules (``PlainEngine._finish``).
    A batch whose prompt + budget does not fit the cache grows it (graphs recaptured; noted).

loglikelihood
    Tokenised exactly as ``plain`` (lm-evaluation-harness's split). The choices of one request
    that share their context tokens are packed into one row: context once, then each choice,
    with a 4-D mask so that a choice sees the context and its own earlier tokens only, and
    position ids restarting after the context for every choice. Rows are sorted longest first,
    left-padded and batched so that one forward scores about ``batch_size`` continuations
    (plain scores ``batch_size`` pairs per forward), logits only for the continuation
    positions. A request whose packed row would not fit the model's window is scored unpacked
    through ``plain``'s own path (which keeps the last tokens, as lm-eval does).

Attention runs through SDPA wrappers registered with transformers' ``AttentionInterface``
(``slmtui_fast_<decode attention>``) and switched on only inside this engine's forwards.

* Prefill sees only the prompt's slots (``SlotCache.visible``): keys, values and the mask are
  ``width`` long, not the cache's capacity, so its attention work and memory are bounded by the
  prompt. A batch without left padding (and no sliding window shorter than it) drops the mask
  and runs transformers' SDPA call exactly as plain's prefill does (causal, GQA in the kernel).
* Decode (one query token) over the whole static cache with a boolean mask, one of
  ``DECODE_ATTENTIONS``: ``gqa`` (default) is plain's own decode call, one query row per head
  with GQA inside the kernel (no K/V copy), plus the mask; ``grouped`` folds each KV head's query
  heads into query rows (the earlier default: bf16 sequences identical to plain 2/32 on an H100,
  against 11/32 for transformers' static cache: the kernel rounds seven query rows per head
  differently from plain's one); ``expand`` is transformers' static-cache call (one query row
  per head, K/V per head) with K/V repeated by a stride-0 view, not copied; ``sdpa`` is
  transformers' own SDPA path (``repeat_kv`` copies the cache every layer and step in
  transformers 5.17). ``auto`` takes the first of ``gqa``, ``expand``, ``grouped`` that a fused
  kernel accepts on this device (otherwise SDPA would run the math kernel, scores in bf16).

On an out-of-memory error the batch size halves and the batch is retried (down to 1), as plain.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
)
from slmtui.worker.engines.base import Completed
from slmtui.worker.engines.plain import PlainEngine, _first_stop, is_oom, warmup_generations

ATTENTION_NAME = "slmtui_fast"
DECODE_ATTENTIONS = ("gqa", "expand", "grouped", "sdpa")
"""Decode attention variants (module docstring); ``auto`` chooses among the first three."""
CHECK_EVERY_TOKENS = 16
"""Decode steps between host-side stop checks (one device sync each)."""
CAPACITY_STEP = 64
"""The KV cache's capacity (tokens per row) is rounded up to a multiple of this."""


@dataclass
class WarmupReport:
    """Where the warm-up time went (seconds), reported apart from the measured window."""

    capture_s: float = 0.0
    """CUDA-graph capture (including each bucket's eager warm-up steps)."""
    compile_s: float = 0.0
    """torch.compile of the decode step (first traced call), when ``compile_step``."""
    run_s: float = 0.0
    """Running the warm-up requests."""
    graphs: int = 0


class SlotCache:
    """Preallocated KV cache written in place at the slots in ``write_pos``.

    Duck-types what transformers' attention layers call (``update``); tensors are allocated on the
    first write (shapes from the key states, so any head layout works) for ``max_batch`` rows,
    and ``rows`` selects how many the current forward uses (a view of the first rows: every
    batch-size bucket shares one allocation, and compaction moves rows to the front).
    """

    is_compileable = True

    def __init__(self, max_batch: int, capacity: int) -> None:
        self.max_batch = max_batch
        self.capacity = capacity
        self.rows = max_batch
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write_pos: torch.Tensor | None = None
        self.visible: int | None = None
        """Slots ``update`` returns (the first ``visible``); None: the whole capacity (decode)."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys and values at ``write_pos``; return the visible slots.

        Takes whatever else the attention layer passes (``cache_kwargs`` positionally in
        transformers 5.17, ``kwargs=`` in 5.24): nothing in it changes where the states go.
        """
        if layer_idx == len(self.keys):
            heads, device = key_states.shape[1], key_states.device
            self.keys.append(
                torch.zeros(
                    (self.max_batch, heads, self.capacity, key_states.shape[-1]),
                    dtype=key_states.dtype,
                    device=device,
                )
            )
            self.values.append(
                torch.zeros(
                    (self.max_batch, heads, self.capacity, value_states.shape[-1]),
                    dtype=value_states.dtype,
                    device=device,
                )
            )
        keys = self.keys[layer_idx][: self.rows]
        values = self.values[layer_idx][: self.rows]
        assert self.write_pos is not None
        slots = self.write_pos
        if slots.device != key_states.device:  # layer-sharded over several GPUs
            slots = slots.to(key_states.device)
        keys.index_copy_(2, slots, key_states)
        values.index_copy_(2, slots, value_states)
        if self.visible is not None:
            return keys[:, :, : self.visible], values[:, :, : self.visible]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # unused: every forward passes cache_position / position_ids explicitly

    def move_rows_to_front(self, rows: torch.Tensor) -> None:
        """Rows ``rows`` (in that order) become rows 0..len-1 of every layer."""
        n = rows.numel()
        for tensor in (*self.keys, *self.values):
            tensor[:n] = tensor.index_select(0, rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


_causal_prefill = False
"""Set by the engine around a prefill without left padding: attention drops the mask and runs
transformers' SDPA call as plain's prefill does (causal)."""


def _prefill_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """More than one query token: transformers' SDPA (prefill, packed log-likelihood)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _causal_prefill and query.shape[2] == key.shape[2]:
        attention_mask = None  # plain's prefill call: is_causal, GQA in the kernel
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _decode_mask(attention_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    return attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None


def _gqa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Decode as plain's decode call (one query row per head, GQA in the kernel) + the mask."""
    if query.shape[2] != 1 or key.shape[-1] != value.shape[-1]:
        return _prefill_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=_decode_mask(attention_mask, key),
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # [batch, heads, 1, dim]
    return out.transpose(1, 2).contiguous(), None


def _grouped_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Decode with each KV head's query heads folded into query rows (no K/V copy)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or kv_heads == heads or key.shape[-1] != value.shape[-1]:
        return _prefill_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=_decode_mask(attention_mask, key), scale=scaling
    )  # [batch, kv_heads, group, dim]
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2), None


def _expand_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Decode as transformers' static-cache call (one query row per head, K/V per head, mask),
    with each KV head's K/V repeated by a stride-0 view instead of ``repeat_kv``'s copy."""
    batch, heads, q_len, dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    if q_len != 1 or kv_heads == heads or key.shape[-1] != value.shape[-1]:
        return _prefill_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    group = heads // kv_heads
    rows = batch * kv_heads
    folded_q = query.reshape(rows, group, 1, dim)
    folded_k = key.reshape(rows, 1, capacity, dim).expand(rows, group, capacity, dim)
    folded_v = value.reshape(rows, 1, capacity, dim).expand(rows, group, capacity, dim)
    mask = _decode_mask(attention_mask, key)
    if mask is not None and mask.shape[0] != 1:
        mask = mask.repeat_interleave(kv_heads, dim=0)  # [batch * kv_heads, 1, 1, capacity]
    out = torch.nn.functional.scaled_dot_product_attention(
        folded_q, folded_k, folded_v, attn_mask=mask, scale=scaling
    )  # [batch * kv_heads, group, 1, dim]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


_ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, None]]] = {
    "gqa": _gqa_attention,
    "grouped": _grouped_attention,
    "expand": _expand_attention,
    "sdpa": _prefill_attention,  # transformers' own SDPA for the decode step too
}


def decode_backend(
    variant: str, heads: int, kv_heads: int, head_dim: int, capacity: int, dtype: Any, device: Any
) -> str:
    """The SDPA backend this device picks for ``variant``'s decode call (e.g. CUDNN_ATTENTION).

    ``gqa`` and ``expand`` are the calls to check: with a mask, only some fused kernels take
    GQA or stride-0 heads, and the math kernel (bf16 scores) is the fallback.
    """
    from torch.nn.attention import SDPBackend

    group = heads // kv_heads
    mask = torch.ones((1, 1, 1, capacity), dtype=torch.bool, device=device)
    key = torch.zeros((1, kv_heads, capacity, head_dim), dtype=dtype, device=device)
    if variant == "gqa":
        query = torch.zeros((1, heads, 1, head_dim), dtype=dtype, device=device)
        gqa = kv_heads != heads
    elif variant == "expand":
        query = torch.zeros((kv_heads, group, 1, head_dim), dtype=dtype, device=device)
        key = key.reshape(kv_heads, 1, capacity, head_dim).expand(-1, group, -1, -1)
        gqa = False
    elif variant == "grouped":
        query = torch.zeros((1, kv_heads, group, head_dim), dtype=dtype, device=device)
        gqa = False
    else:  # sdpa: repeat_kv
        query = torch.zeros((1, heads, 1, head_dim), dtype=dtype, device=device)
        key = torch.zeros((1, heads, capacity, head_dim), dtype=dtype, device=device)
        gqa = False
    choice = int(
        torch._fused_sdp_choice(
            query, key, key, attn_mask=mask, dropout_p=0.0, is_causal=False, enable_gqa=gqa
        )
    )
    for name in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is not None and backend.value == choice:
            return name
    return f"backend {choice}"


def _spread(model: Any) -> bool:
    """Parameters on several devices (layer-sharded), or one rank of a multi-process job (tp).

    A graph captured on one device cannot hold another device's kernels or a collective safely.
    """
    if len({p.device for p in model.parameters()}) > 1:
        return True
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cache_argument(parameters: Any) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` (transformers 5.24 on;
    ``past_key_values`` still accepted with a deprecation warning) or ``past_key_values``.

    Read from the signature, not guessed from a version number.
    """
    return "cache" if "cache" in parameters else "past_key_values"


def _register_attention() -> None:
    from transformers import AttentionInterface

    for variant, function in _ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(f"{ATTENTION_NAME}_{variant}", function)


class FastEngine(PlainEngine):
    """Static KV cache + CUDA-graph decode + packed log-likelihood (see the module docstring).

    ``compile_step`` also runs the decode step through ``torch.compile`` (fused kernels) before
    capture: faster steps, longer warm-up. The bench measures both.
    """

    name = "fast"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int,
        compile_step: bool = False,
        check_every_tokens: int = CHECK_EVERY_TOKENS,
        decode_attention: str = "auto",
    ) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size)
        _register_attention()
        self.compile_step = compile_step
        self.check_every_tokens = max(1, check_every_tokens)
        self.use_graphs = self.device.type == "cuda"
        if self.use_graphs and _spread(model):
            self.use_graphs = False
            self.notes.append(
                "fast engine: the model is spread over several GPUs or processes; decode steps "
                "run eagerly on the static cache (no CUDA graphs)"
            )
        self.warmup_report = WarmupReport()
        self.max_batch = self.batch_size
        self._cache: SlotCache | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[int, torch.Tensor] = {}
        self._graph_pool: Any = None
        """One memory pool for every bucket's graph (they never replay at once): without it each
        graph keeps its own intermediates, ~+40% peak memory over plain at batch 64."""
        self._step_fn: Callable[[int], torch.Tensor] = self._step
        if compile_step:
            self._step_fn = torch.compile(self._step, dynamic=False)
        text_config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.decode_attention = self._choose_decode_attention(decode_attention, text_config)
        layer_types = list(getattr(text_config, "layer_types", None) or [])
        self.sliding_window: int | None = None
        if "sliding_attention" in layer_types:
            self.sliding_window = int(text_config.sliding_window)
        self.layer_types = sorted(set(layer_types))
        params = inspect.signature(model.forward).parameters
        self._pass_cache_position = "cache_position" in params
        self._cache_argument = cache_argument(params)

    def _choose_decode_attention(self, requested: str, text_config: Any) -> str:
        """``requested``, or for ``auto`` the first of gqa, expand, grouped that a fused
        kernel takes here (CPU: gqa)."""
        if requested not in (*DECODE_ATTENTIONS, "auto"):
            raise ValueError(
                f"decode_attention {requested!r}: one of {', '.join(DECODE_ATTENTIONS)} or auto"
            )
        self.decode_backends: dict[str, str] = {}
        """The SDPA backend of each decode call checked by ``auto`` (CUDA only)."""
        if requested != "auto":
            return requested
        if self.device.type != "cuda":
            return "gqa"
        heads = int(text_config.num_attention_heads)
        kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
        dtype = next(self.model.parameters()).dtype
        for variant in ("gqa", "expand"):
            backend = decode_backend(
                variant, heads, kv_heads, head_dim, CAPACITY_STEP * 4, dtype, self.device
            )
            self.decode_backends[variant] = backend
            if backend != "MATH" or kv_heads == heads:
                return variant
        self.notes.append(
            "fast engine: no fused attention kernel takes GQA or stride-0 heads with a mask on "
            "this device; decode attention 'grouped' (query heads folded per KV head)"
        )
        return "grouped"

    # -- buffers --------------------------------------------------------------------------------

    def _ensure_capacity(self, tokens: int) -> None:
        """A cache (and decode buffers) holding ``tokens`` per row for ``max_batch`` rows."""
        capacity = math.ceil(tokens / CAPACITY_STEP) * CAPACITY_STEP
        capacity = min(capacity, max(self.max_length, tokens))
        if self._cache is not None and self._cache.capacity >= tokens:
            return
        if self._cache is not None:
            self.notes.append(
                f"fast engine: KV cache grown from {self._cache.capacity} to {capacity} tokens "
                "per row (decode graphs recaptured)"
            )
        self._drop_buffers()
        b, dev = self.max_batch, self.device
        self._cache = SlotCache(b, capacity)
        self._ids = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self._pos = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self._mask = torch.zeros((b, 1, 1, capacity), dtype=torch.bool, device=dev)
        self._write_pos = torch.zeros((1,), dtype=torch.long, device=dev)
        self._step_idx = torch.zeros((1,), dtype=torch.long, device=dev)
        self._out = torch.zeros((b, capacity), dtype=torch.long, device=dev)
        self._slots = torch.arange(capacity, device=dev)

    def _drop_buffers(self) -> None:
        self._graphs.clear()
        self._graph_logits.clear()
        self._graph_pool = None
        self._cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ready(self, rows: int) -> None:
        """Capture the bucket's decode graph if missing (call before a batch's prefill)."""
        if self.use_graphs and rows not in self._graphs:
            self._capture(rows)

    def _smallest_ready_bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` rows whose graph exists (any, on the CPU)."""
        for rows in self._buckets():
            if rows >= n and (not self.use_graphs or rows in self._graphs):
                return rows
        return self.max_batch

    def _bucket(self, n: int) -> int:
        """The smallest captured batch size holding ``n`` rows."""
        size = 1
        while size < n:
            size *= 2
        return min(size, self.max_batch)

    def _buckets(self) -> list[int]:
        sizes = {self.max_batch}
        size = 1
        while size < self.max_batch:
            sizes.add(size)
            size *= 2
        return sorted(sizes)

    # -- forwards -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _attention(self) -> Iterator[None]:
        """Route attention through ``slmtui_fast`` for the duration of this engine's forwards."""
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = f"{ATTENTION_NAME}_{self.decode_attention}"
        try:
            yield
        finally:
            config._attn_implementation = previous

    def _mask_argument(self, allowed: torch.Tensor, slide: torch.Tensor | None) -> Any:
        """The 4-D boolean mask as the model wants it: a dict by layer type if some slide."""
        if self.sliding_window is None:
            return allowed
        return {
            kind: (slide if kind == "sliding_attention" else allowed) for kind in self.layer_types
        }

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: Any,
        cache_position: torch.Tensor,
        cache: SlotCache | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self._pass_cache_position:
            kwargs["cache_position"] = cache_position
        return self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
            **{self._cache_argument: cache},
            **kwargs,
        ).logits

    def _step(self, rows: int) -> torch.Tensor:
        """One decode step for the first ``rows`` rows, entirely on the device (capturable)."""
        cache = self._cache
        assert cache is not None
        cache.rows = rows
        cache.write_pos = self._write_pos
        cache.visible = None
        mask = self._mask[:rows]
        mask.index_fill_(3, self._write_pos, True)
        slide = None
        if self.sliding_window is not None:
            slide = mask & (self._slots > self._write_pos - self.sliding_window)
        logits = self._forward(
            self._ids[:rows],
            self._pos[:rows],
            self._mask_argument(mask, slide),
            self._write_pos,
            cache,
            1,
        )[:, -1]
        next_ids = logits.argmax(dim=-1)
        self._out[:rows].index_copy_(1, self._step_idx, next_ids[:, None])
        self._ids[:rows].copy_(next_ids[:, None])
        self._pos[:rows].add_(1)
        self._write_pos.add_(1)
        self._step_idx.add_(1)
        return logits

    def _decode_step(self, rows: int) -> torch.Tensor:
        """Replay the bucket's graph (``_ready`` captured it), or run the step eagerly."""
        if not self.use_graphs:
            with torch.inference_mode(), self._attention():
                return self._step_fn(rows)
        self._graphs[rows].replay()
        return self._graph_logits[rows]

    def _capture(self, rows: int) -> None:
        """Capture the decode step for ``rows`` rows. Only between batches: the warm-up steps
        write cache slots 0..2 (the small decode buffers are restored afterwards)."""
        started = time.perf_counter()
        state = (self._ids, self._pos, self._mask, self._write_pos, self._step_idx)
        saved = [t.clone() for t in state]
        self._write_pos.zero_()  # the warm-up steps write slots 0..2, never past the cache
        self._step_idx.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._eager_warmup_steps(rows)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.inference_mode(), self._attention():
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                logits = self._step_fn(rows)
        torch.cuda.synchronize()
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        self._graphs[rows] = graph
        self._graph_logits[rows] = logits
        self.warmup_report.capture_s += time.perf_counter() - started
        self.warmup_report.graphs += 1

    def _eager_warmup_steps(self, rows: int) -> None:
        """The eager steps before a capture. A decode attention whose kernel this device
        refuses (an error here, before any capture) falls back to ``grouped``, noted."""
        try:
            with torch.inference_mode(), self._attention():
                for _ in range(3 if self.compile_step else 2):
                    self._step_fn(rows)
        except Exception as exc:
            if is_oom(exc) or self.decode_attention == "grouped":
                raise
            self.notes.append(
                f"fast engine: decode attention {self.decode_attention!r} failed on this device "
                f"({type(exc).__name__}: {str(exc)[:120]}); using 'grouped'"
            )
            self.decode_attention = "grouped"
            self._write_pos.zero_()
            self._step_idx.zero_()
            with torch.inference_mode(), self._attention():
                for _ in range(3 if self.compile_step else 2):
                    self._step_fn(rows)

    def _prefill(self, rows: list[list[int]], width: int) -> torch.Tensor:
        """Prompts (left-padded to ``width``) into cache rows 0..len-1; decode state set up.

        Returns the last position's logits of each row (the first token is their argmax).
        """
        cache = self._cache
        assert cache is not None
        n, dev = len(rows), self.device
        ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(row) for row in rows], device=dev)
        pad = (width - lengths)[:, None, None]
        # keys are the prompt's slots 0..width-1 only (cache.visible), never the whole capacity
        query = torch.arange(width, device=dev)[None, :, None]
        slots = self._slots[None, None, :width]
        allowed = ((slots <= query) & (slots >= pad)) | (slots == query)  # pad rows: self only
        slide = None
        if self.sliding_window is not None:
            slide = allowed & (slots > query - self.sliding_window)
            slide = slide[:, None]
        positions = (torch.arange(width, device=dev)[None, :] - pad[:, :, 0]).clamp(min=0)
        write_pos = torch.arange(width, device=dev)
        cache.rows = n
        cache.write_pos = write_pos
        cache.visible = width
        unpadded = all(len(row) == width for row in rows) and (
            self.sliding_window is None or width <= self.sliding_window
        )
        global _causal_prefill
        _causal_prefill = unpadded
        try:
            with torch.inference_mode(), self._attention():
                logits = self._forward(
                    ids.to(dev),
                    positions,
                    self._mask_argument(allowed[:, None], slide),
                    write_pos,
                    cache,
                    1,
                )[:, -1]
        finally:
            _causal_prefill = False
            cache.visible = None
        with torch.inference_mode():
            first = logits.argmax(dim=-1)
            self._mask[:n] = (
                (self._slots[None, :] >= pad[:, :, 0]) & (self._slots[None, :] < width)
            )[:, None, None, :]
            self._ids[:n, 0] = first
            self._pos[:n, 0] = lengths
            self._write_pos.fill_(width)
            self._step_idx.fill_(1)
            self._out[:n, 0] = first
        return logits

    def _move_rows_to_front(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.device)
        assert self._cache is not None
        with torch.inference_mode():
            self._cache.move_rows_to_front(index)
            for tensor in (self._ids, self._pos, self._mask, self._out):
                tensor[: len(rows)] = tensor.index_select(0, index)

    # -- warm-up --------------------------------------------------------------------------------

    def warmup(
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Size the KV cache from the given requests, capture every batch-size bucket, run them.

        The cache gets room for prompts a quarter longer than the longest given (the runner
        warms up on a few requests only); a longer batch later grows it (noted).
        """
        started = time.perf_counter()
        if generate:
            longest = max(len(self._encode(r.prompt)) for r in generate)
            budget = max(r.max_new_tokens for r in generate)
            self._ensure_capacity(min(self.max_length, int(longest * 1.25) + budget))
            self._touch_buffers(max(1, longest))
            if self.use_graphs:
                for rows in reversed(self._buckets()):  # largest first: the rest reuse its pool
                    if rows not in self._graphs:
                        self._capture(rows)
            for _ in self.generate(warmup_generations(generate)):
                pass
        for _ in self.loglikelihood(loglikelihood):
            pass
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - started
        self.warmup_report.run_s = total - self.warmup_report.capture_s

    def _touch_buffers(self, width: int) -> None:
        """A prefill over every row allocates the cache before any capture."""
        prompt = [self.eos_ids[0] if self.eos_ids else 0] * min(width, 8)
        self._prefill([prompt] * self.max_batch, len(prompt))

    # -- generate -------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> Iterator[Completed]:
        if not requests:
            return
        encoded = [self._encode(r.prompt) or [self._fallback_token()] for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        longest = max(len(e) for e in encoded)
        budget = max(r.max_new_tokens for r in requests)
        self._ensure_capacity(min(self.max_length, longest + budget))
        yield from self._in_batches(
            order,
            lambda batch: self._generate_batch(
                [requests[i] for i in batch], [encoded[i] for i in batch]
            ),
        )

    def _fallback_token(self) -> int:
        token = self.tokenizer.bos_token_id
        return token if token is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def _generate_batch(
        self, requests: list[GenerateRequest], encoded: list[list[int]]
    ) -> Iterator[tuple[int, Completed]]:
        """Yields (row in ``requests``, Completed) as rows finish."""
        started = time.perf_counter()
        budget = max(r.max_new_tokens for r in requests)
        room = self.max_length - budget
        cut = [ids[-room:] if room > 0 and len(ids) > room else ids for ids in encoded]
        if any(len(a) != len(b) for a, b in zip(cut, encoded, strict=True)):
            self.notes.append(
                f"fast engine: prompts longer than the model's window ({self.max_length} tokens "
                f"with {budget} new) kept their last tokens, as plain does"
            )
        if budget <= 0:
            for row, ids in enumerate(cut):
                yield row, Completed(row, GenerateResponse("", 0), len(ids), 0, 0.0)
            return
        width = max(len(ids) for ids in cut)
        self._ensure_capacity(width + budget)
        assert self._cache is not None
        n = len(requests)
        rows_now = self._bucket(n)
        padded = cut + [cut[0]] * (rows_now - n)
        self._ready(rows_now)
        self._prefill(padded, width)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ttft_s = time.perf_counter() - started

        tokens: list[list[int]] = [[] for _ in range(n)]
        row_of: list[int] = list(range(n)) + [-1] * (rows_now - n)
        """Buffer row -> request row (-1: a padding row)."""
        pending = set(range(n))
        fetched = 0
        generated = 1
        while True:
            new = self._out[:rows_now, fetched:generated].tolist()
            fetched = generated
            for buffer_row, request_row in enumerate(row_of):
                if request_row in pending:
                    tokens[request_row].extend(new[buffer_row])
            for request_row in sorted(pending):
                if self._is_finished(requests[request_row], tokens[request_row]):
                    pending.discard(request_row)
                    text, tokens_out = self._finish(
                        requests[request_row], tokens[request_row], None
                    )
                    yield (
                        request_row,
                        Completed(
                            request_row,
                            GenerateResponse(text=text, tokens_out=tokens_out),
                            len(cut[request_row]),
                            tokens_out,
                            ttft_s,
                        ),
                    )
            if not pending:
                return
            live = [b for b, r in enumerate(row_of) if r in pending]
            smaller = self._smallest_ready_bucket(len(live))
            if smaller < rows_now:
                self._move_rows_to_front(live)
                row_of = [row_of[b] for b in live] + [-1] * (smaller - len(live))
                rows_now = smaller
            left = max(requests[r].max_new_tokens - len(tokens[r]) for r in pending)
            for _ in range(min(self.check_every_tokens, left)):
                self._decode_step(rows_now)
            generated += min(self.check_every_tokens, left)

    def _is_finished(self, request: GenerateRequest, ids: list[int]) -> bool:
        if len(ids) >= request.max_new_tokens:
            return True
        if any(token in self.eos_ids for token in ids):
            return True
        if request.stop:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            return _first_stop(text, request.stop) is not None
        return False

    # -- loglikelihood --------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> Iterator[Completed]:
        groups: list[_Group] = []
        unpacked: list[tuple[int, int, list[int], list[int]]] = []
        for index, request in enumerate(requests):
            if not request.continuations:
                yield Completed(index, LoglikelihoodResponse((), ()), 0, 0)
                continue
            by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
            for choice, continuation in enumerate(request.continuations):
                context_ids, continuation_ids = self.encode_pair(request.context, continuation)
                by_context.setdefault(tuple(context_ids), []).append((choice, continuation_ids))
            for context_ids, choices in by_context.items():
                group = _Group(index, list(context_ids), choices)
                if group.input_length() > self.max_length:
                    unpacked += [(index, c, list(context_ids), ids) for c, ids in choices]
                else:
                    groups.append(group)
        groups.sort(key=lambda g: -g.input_length())
        pending = {i: len(r.continuations) for i, r in enumerate(requests)}
        results: dict[int, dict[int, tuple[float, bool]]] = {i: {} for i in range(len(requests))}
        tokens_in: dict[int, int] = dict.fromkeys(range(len(requests)), 0)

        def finish(
            index: int, choice: int, value: tuple[float, bool], n_in: int
        ) -> Completed | None:
            results[index][choice] = value
            tokens_in[index] += n_in
            pending[index] -= 1
            if pending[index]:
                return None
            values = [results[index][c] for c in range(len(requests[index].continuations))]
            return Completed(
                index,
                LoglikelihoodResponse(tuple(v[0] for v in values), tuple(v[1] for v in values)),
                tokens_in[index],
                0,
            )

        start = 0
        while start < len(groups):
            batch: list[_Group] = []
            pairs = 0
            while start + len(batch) < len(groups) and (not batch or pairs < self.batch_size):
                group = groups[start + len(batch)]
                batch.append(group)
                pairs += len(group.choices)
            try:
                scored = self._score_groups(batch)
            except Exception as exc:
                if not is_oom(exc) or self.batch_size == 1:
                    raise
                self._halve_batch(exc)
                continue
            start += len(batch)
            for group, values in zip(batch, scored, strict=True):
                n_in = group.input_length()
                for k, ((choice, _), value) in enumerate(zip(group.choices, values, strict=True)):
                    done = finish(group.index, choice, value, n_in if k == 0 else 0)
                    if done is not None:
                        yield done
        for at in range(0, len(unpacked), self.batch_size):
            chunk = unpacked[at : at + self.batch_size]
            scored_pairs = self._score_pairs([(p[2], p[3]) for p in chunk])
            for (index, choice, _, _), (logprob, greedy, n_in) in zip(
                chunk, scored_pairs, strict=True
            ):
                done = finish(index, choice, (logprob, greedy), n_in)
                if done is not None:
                    yield done

    def _score_groups(self, groups: list[_Group]) -> list[list[tuple[float, bool]]]:
        """(summed log-prob, greedy) of every choice of every group, in one forward."""
        dev = self.device
        width = max(g.input_length() for g in groups)
        keep = max(max(g.scored_positions(), 1) for g in groups)
        n = len(groups)
        ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        # segment id per column: -1 padding, 0 context, k+1 choice k
        segment = torch.full((n, width), -1, dtype=torch.long)
        rows_idx: list[int] = []
        cols_idx: list[int] = []
        targets: list[int] = []
        owner: list[int] = []  # flat choice number
        flat = 0
        for r, group in enumerate(groups):
            tokens, pos, seg, predict = group.layout()
            offset = width - len(tokens)
            ids[r, offset:] = torch.tensor(tokens, dtype=torch.long)
            positions[r, offset:] = torch.tensor(pos, dtype=torch.long)
            segment[r, offset:] = torch.tensor(seg, dtype=torch.long)
            for k, (column, target) in enumerate(predict):
                for col, tok in zip(column, target, strict=True):
                    rows_idx.append(r)
                    cols_idx.append(offset + col - (width - keep))
                    targets.append(tok)
                    owner.append(flat + k)
            flat += len(group.choices)
        segment = segment.to(dev)
        query_seg = segment[:, :, None]
        key_seg = segment[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool, device=dev).tril()
        allowed = causal[None] & ((key_seg == 0) | (key_seg == query_seg)) & (key_seg >= 0)
        allowed |= torch.eye(width, dtype=torch.bool, device=dev)[None]  # padding: self only
        slide = None
        positions = positions.to(dev)
        if self.sliding_window is not None:
            distance = positions[:, :, None] - positions[:, None, :]
            slide = (allowed & (distance < self.sliding_window))[:, None]
        with torch.inference_mode(), self._attention():
            logits = self._forward(
                ids.to(dev),
                positions,
                self._mask_argument(allowed[:, None], slide),
                torch.arange(width, device=dev),
                None,
                keep,
            )
            rows = logits[torch.tensor(rows_idx, device=dev), torch.tensor(cols_idx, device=dev)]
            logp = torch.log_softmax(rows.float(), dim=-1)
            target = torch.tensor(targets, device=dev)
            picked = logp.gather(1, target[:, None]).squeeze(1)
            hit = logp.argmax(dim=-1) == target
            owners = torch.tensor(owner, device=dev, dtype=torch.long)
            sums = torch.zeros(flat, dtype=torch.float32, device=dev).index_add_(0, owners, picked)
            misses = torch.zeros(flat, dtype=torch.long, device=dev).index_add_(
                0, owners, (~hit).long()
            )
        sums_list, misses_list = sums.tolist(), misses.tolist()
        out: list[list[tuple[float, bool]]] = []
        flat = 0
        for group in groups:
            out.append(
                [
                    (sums_list[flat + k], misses_list[flat + k] == 0)
                    for k in range(len(group.choices))
                ]
            )
            flat += len(group.choices)
        return out

    # -- verification ---------------------------------------------------------------------------

    def teacher_forced_logprobs(
        self, prompt_ids: list[list[int]], forced: list[list[int]]
    ) -> torch.Tensor:
        """Log-probs (float32, [rows, steps]) the decode path (graphs on CUDA) gives ``forced``.

        Every row's prompt is prefilled, then the forced tokens are fed one per decode step
        instead of the argmax: a check of the decode path against a plain forward. All rows of
        ``forced`` must have the same length; rows <= ``batch_size``.
        """
        n, steps = len(prompt_ids), len(forced[0])
        width = max(len(p) for p in prompt_ids)
        self._ensure_capacity(width + steps)
        rows_now = self._bucket(n)
        padded = prompt_ids + [prompt_ids[0]] * (rows_now - n)
        forced_t = torch.tensor(forced + [forced[0]] * (rows_now - n), device=self.device)
        self._ready(rows_now)
        cache = self._cache
        assert cache is not None
        # the prefill's own logits give the first forced token's log-prob
        with torch.inference_mode(), self._attention():
            out = []
            first_logits = self._prefill(padded, width)
            out.append(torch.log_softmax(first_logits.float(), -1).gather(1, forced_t[:, :1]))
            for step in range(1, steps):
                self._ids[:rows_now, 0] = forced_t[:, step - 1]
                logits = self._decode_step(rows_now)
                out.append(
                    torch.log_softmax(logits.float(), -1).gather(1, forced_t[:, step : step + 1])
                )
        return torch.cat(out, dim=1)[:n]


@dataclass
class _Group:
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
