"""``FastEngine``: the same answers as ``plain``, without the per-token Python overhead.

generate
    Continuous batching (``batching.run_continuous``) over a slot KV cache (``SlotCache``):
    ``batch_size`` is the most sequences in flight; a finished row's slot takes the next
    waiting request at once, its prefill (chunked when long) between the others' decode steps.
    One decode step = forward of one token per row + greedy argmax + buffer updates, all on the
    device, each row at its own position; rows not decoding (free, still reading their prompt)
    write only the trash slot and keep their state. On CUDA the step is captured once per
    batch-size bucket (``graphs.DecodeGraphs``) and replayed per token; on the CPU the same step
    runs eagerly (which is how the fp32 identity tests exercise this code). Requests are taken
    longest prompt first; a prompt longer than the model's window less its own budget keeps its
    last tokens, as plain does at batch size 1 (noted). Outputs are cut and counted with
    ``plain``'s own rules.

loglikelihood
    ``loglik``: packed shared-context rows, at most ``batch_size`` rows and
    ``FORWARD_TOKENS`` padded tokens a forward, log-probs gathered on the device, each
    batch's results read one forward later. A request whose packed row would not fit the model's
    window is scored unpacked through ``plain``'s own path.

Forwards whose shapes change from call to call (prefill, log-likelihood) run SDPA without the
cuDNN backend (``attention.variable_shape_kernels``), except a prefill of two or more rows that is
plain's own call, which takes it as plain's does (``SLMTUI_PREFILL_CUDNN``: ``batched``, the
default; ``plain`` for one-row calls too; ``never``). On an out-of-memory error the batch size
halves and the unanswered requests start again (down to 1), as plain.
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
    LoglikelihoodRequest,
    LoglikelihoodResponse,
)
from slmtui.worker.engines.base import Completed, LoadedModel, text_config
from slmtui.worker.engines.fast.attention import (
    ATTENTION_NAME,
    DECODE_ATTENTIONS,
    causal_prefill,
    decode_backend,
    prefill_cudnn_setting,
    register_attention,
    variable_shape_kernels,
)
from slmtui.worker.engines.fast.batching import LoopSettings, PrefillChunk, run_continuous
from slmtui.worker.engines.fast.compiling import (
    compile_setting,
    decode_step_setting,
    use_compile_cache,
)
from slmtui.worker.engines.fast.graphs import DecodeGraphs, bucket_for, buckets
from slmtui.worker.engines.fast.loglik import (
    PendingScores,
    build_batch,
    pack_requests,
    packed_mask,
    sum_logprobs,
    take_batch,
)
from slmtui.worker.engines.fast.native import NativeDecoder, native_refusal
from slmtui.worker.engines.fast.slot_cache import SlotCache
from slmtui.worker.engines.plain import PlainEngine, first_stop, is_oom, warmup_generations
from slmtui.worker.engines.support import sliding_windows

CHECK_EVERY_TOKENS = 16
"""Decode steps between host-side stop checks (one device sync each)."""
NO_LIMIT = 2**62
"""A row's cache position limit when it has none (``FastEngine._limit``)."""
CAPACITY_STEP = 16
"""The KV cache's capacity (tokens per row, the trash slot included) is rounded up to a multiple
of this (64 before the native step: up to 63 slots per row of rounding)."""
COMPILE_NATIVE_BY_DEFAULT = True
"""On CUDA, compile the native step's layer function unless told otherwise (its cold warm-up
must stay within the console's 20 s; ``bench/native.py`` measures it)."""
NATIVE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}
"""At warm-up the native step's logits must match transformers' step on the same state within
this share of the largest logit, else transformers' step runs (noted). Wide enough for 16-bit
rounding through every layer, far below what a wrong layer gives."""
PREFILL_CHUNK_TOKENS = 2048
"""Most prompt tokens of one row in one prefill forward; a longer prompt takes several."""
FORWARD_TOKENS = 16384
"""Most padded tokens in one prefill or log-likelihood forward (activation memory)."""
LOGITS_BYTES = 2 << 30
"""Most bytes of kept logits in one log-likelihood forward (besides ``FORWARD_TOKENS``): on the
H200, Gemma-3-270M's HellaSwag at 32 rows reserved 51 GB without it."""
AUTO_CACHE_SHARE = 0.5
"""``batch_size = "auto"``: the share of free GPU memory the KV cache may take."""
AUTO_MAX_ROWS = 256
"""``batch_size = "auto"``: never more sequences in flight than this."""


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
    check_s: float = 0.0
    """The native step's check against transformers' step (its first call: compiles, if
    compiled)."""
    native_max_abs_diff: float | None = None
    """The check's largest |native - transformers| logit, over the largest |logit|."""
    cache_bytes: int = 0
    """The slot KV cache as allocated (every layer, keys and values)."""


def cache_argument(parameters: Any) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` (transformers 5.24 on;
    ``past_key_values`` still accepted with a deprecation warning) or ``past_key_values``.

    Read from the signature, not guessed from a version number.
    """
    return "cache" if "cache" in parameters else "past_key_values"


def spread(model: Any) -> bool:
    """Parameters on several devices (layer-sharded), or one rank of a multi-process job (tp).

    A graph captured on one device cannot hold another device's kernels or a collective safely.
    """
    if len({p.device for p in model.parameters()}) > 1:
        return True
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FastEngine(PlainEngine):
    """Slot KV cache + continuous batching + CUDA-graph decode + packed log-likelihood.

    ``decode_step``: "native" computes the decode step with ``native.NativeDecoder`` (fused
    weights, one layer function, the model's own modules at either end); "transformers" calls the
    model's forward; "auto" (default) is native where ``native_refusal`` allows, checked at
    warm-up against transformers' step on the same state (``NATIVE_TOLERANCE``), else
    transformers, with a note. ``compile_step`` runs the step's layers (native) or the whole step
    (transformers) through ``torch.compile`` before capture; None (default) compiles the native
    step on CUDA when ``COMPILE_NATIVE_BY_DEFAULT``. A compiled native step that fails falls back
    to the eager one, and that to transformers', each with a note. The bench measures all four.
    Defaults come from ``compiling.decode_step_setting`` / ``compile_setting`` (environment).
    """

    name = "fast"
    fallback = "plain"

    @classmethod
    def refusal(cls, loaded: LoadedModel) -> str | None:
        from slmtui.worker.engines.support import fast_refusal

        return fast_refusal(loaded.model)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int | str,
        compile_step: bool | str | None = None,
        decode_step: str | None = None,
        check_every_tokens: int = CHECK_EVERY_TOKENS,
        decode_attention: str = "auto",
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        forward_tokens: int = FORWARD_TOKENS,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size)
        self.auto_batch = batch_size == "auto"
        """Size ``batch_size`` in ``prepare`` from free memory and the longest request."""
        register_attention()
        prefill_cudnn_setting()  # a bad SLMTUI_PREFILL_CUDNN fails here, before any forward
        requested_step = decode_step_setting(decode_step)
        compile_choice = compile_setting(compile_step)
        self.loop = LoopSettings(
            check_every=max(1, check_every_tokens),
            chunk_tokens=max(1, prefill_chunk_tokens),
            forward_tokens=max(1, forward_tokens),
        )
        self.use_graphs = self.device.type == "cuda"
        if self.use_graphs and spread(model):
            self.use_graphs = False
            self.notes.append(
                "fast engine: the model is spread over several GPUs or processes; decode steps "
                "run eagerly on the static cache (no CUDA graphs)"
            )
        self.warmup_report = WarmupReport()
        self.max_batch = self.batch_size
        self._planned_tokens = 0
        """Prompt + budget of the longest request ``prepare`` saw (0: none)."""
        self._cache: SlotCache | None = None
        self._graphs = DecodeGraphs()
        decoder = text_config(model.config)
        self.decode_attention = self._choose_decode_attention(decode_attention, decoder)
        windows = sliding_windows(decoder)
        self.sliding_window: int | None = next((w for w in windows if w is not None), None)
        """The sliding window of the layers that slide (None: none does)."""
        self._all_slide = all(w is not None for w in windows)
        self.layer_types = sorted(set(getattr(decoder, "layer_types", None) or []))
        params = inspect.signature(model.forward).parameters
        self._pass_cache_position = "cache_position" in params
        self._cache_argument = cache_argument(params)
        self.compile_backend = compile_backend
        self._native: NativeDecoder | None = None
        self._native_checked = False
        self._touched = 1
        self.compile_step = False
        """The decode step goes through ``torch.compile`` (native: its layers)."""
        self._step_fn: Callable[[int], torch.Tensor] = self._step
        if requested_step != "transformers":
            refusal = native_refusal(model)
            if refusal is None:
                compile_native = (
                    compile_choice
                    if compile_choice is not None
                    else self.device.type == "cuda" and COMPILE_NATIVE_BY_DEFAULT
                )
                refusal = self._build_native(compile_native)
            if refusal is not None:
                self.notes.append(f"fast engine: transformers' decode step ({refusal})")
        if self._native is None:
            self.compile_step = bool(compile_choice)
            if self.compile_step:
                use_compile_cache()
                self._step_fn = torch.compile(self._step, dynamic=False, backend=compile_backend)

    @property
    def decode_step(self) -> str:
        """The decode step that runs: "native" or "transformers", and " compiled" if it is."""
        step = "native" if self._native is not None else "transformers"
        return f"{step} compiled" if self.compile_step else step

    def _build_native(self, compiled: bool) -> str | None:
        """Use a native decode step (compiled layers or not); why not, or None."""
        if compiled:
            use_compile_cache()
        try:
            native = NativeDecoder(
                self.model,
                attention=self.decode_attention,
                compile_layers=compiled,
                compile_backend=self.compile_backend,
            )
        except Exception as exc:
            if is_oom(exc):
                raise
            return f"the native step could not be built: {type(exc).__name__}: {str(exc)[:160]}"
        for note in native.notes:
            if note not in self.notes:
                self.notes.append(note)
        if self._cache is not None:
            refusal = native.set_capacity(self._cache.capacity, self.max_batch, self.device)
            if refusal is not None:
                return refusal
        self._native, self.compile_step = native, compiled
        self._step_fn = self._step
        self._graphs.clear()
        self._native_checked = False
        return None

    def _drop_native(self, reason: str) -> None:
        """Decode with transformers' step from now on (noted)."""
        self._native = None
        self.compile_step = False
        self._step_fn = self._step
        self._graphs.clear()
        self.notes.append(f"fast engine: transformers' decode step ({reason})")

    @property
    def check_every_tokens(self) -> int:
        return self.loop.check_every

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
        """A cache (and decode buffers) holding ``tokens`` per row (plus the trash slot) for
        ``max_batch`` rows."""
        if self._cache is not None and self._cache.capacity - 1 >= tokens:
            return
        capacity = math.ceil((tokens + 1) / CAPACITY_STEP) * CAPACITY_STEP
        capacity = min(capacity, max(self.max_length, tokens) + 1)
        if self._native is not None:
            refusal = self._native.set_capacity(capacity, self.max_batch, self.device)
            if refusal is not None:
                self._drop_native(refusal)
        if self._cache is not None:
            self.notes.append(
                f"fast engine: KV cache grown from {self._cache.capacity - 1} to {capacity - 1} "
                "tokens per row (decode graphs recaptured)"
            )
        self._drop_buffers()
        b, dev = self.max_batch, self.device
        self._cache = SlotCache(b, capacity)
        self._ids = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self._pos = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self._active = torch.zeros((b, 1), dtype=torch.bool, device=dev)
        self._limit = torch.full((b, 1), NO_LIMIT, dtype=torch.long, device=dev)
        self._first = torch.zeros((b,), dtype=torch.long, device=dev)
        self._step_idx = torch.zeros((1,), dtype=torch.long, device=dev)
        self._out = torch.zeros((b, self.loop.check_every), dtype=torch.long, device=dev)
        self._slots = torch.arange(capacity, device=dev)
        self._trash = torch.full((1, 1), capacity - 1, dtype=torch.long, device=dev)

    def _drop_buffers(self) -> None:
        self._graphs.clear()
        self._cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
        """The 4-D boolean mask as the model wants it: the sliding one if every layer slides
        (Mistral, Phi-3 with a window), a dict by layer type if some do."""
        if self.sliding_window is None:
            return allowed
        if self._all_slide:
            return slide
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
        """One decode step for the first ``rows`` rows, entirely on the device (capturable).

        A decoding row writes its token at its own position and attends to its slots up to it;
        any other row writes the trash slot, attends to it alone, and keeps its state. A row
        that has its budget stops decoding here (``_limit``): the steps between host checks
        would otherwise carry it past its last slot. The logits come from the native step or
        transformers' forward; the greedy token and the buffer updates are the same for both.
        """
        self._active[:rows].logical_and_(self._pos[:rows] < self._limit[:rows])
        if self._native is not None:
            assert self._cache is not None
            logits = self._native.logits(
                self._ids[:rows],
                self._pos[:rows],
                self._active[:rows],
                self._cache,
                self._trash,
                self._slots,
            )
        else:
            logits = self._transformers_logits(rows)
        active = self._active[:rows]
        next_ids = logits.argmax(dim=-1)
        self._out[:rows].index_copy_(1, self._step_idx, next_ids[:, None])
        self._ids[:rows].copy_(torch.where(active, next_ids[:, None], self._ids[:rows]))
        self._pos[:rows].add_(active.long())
        self._step_idx.add_(1)
        return logits

    def _transformers_logits(self, rows: int) -> torch.Tensor:
        """[rows, vocab]: transformers' forward of one token per row over the slot cache."""
        cache = self._cache
        assert cache is not None
        pos = self._pos[:rows]
        active = self._active[:rows]
        cache.rows, cache.row_index, cache.visible = rows, None, None
        cache.write_pos = torch.where(active, pos, self._trash)
        slots = self._slots[None, :]
        mask = torch.where(active, slots <= pos, slots == self._trash)
        slide = None
        if self.sliding_window is not None:
            slide = torch.where(active, mask & (slots > pos - self.sliding_window), mask)
            slide = slide[:, None, None, :]
        logits = self._forward(
            self._ids[:rows],
            pos,
            self._mask_argument(mask[:, None, None, :], slide),
            pos[0],
            cache,
            1,
        )[:, -1]
        return logits

    def _decode_step(self, rows: int) -> torch.Tensor:
        """Replay the bucket's graph, or run the step eagerly."""
        if not self.use_graphs:
            with torch.inference_mode(), self._attention():
                return self._step_fn(rows)
        if rows not in self._graphs:
            self._capture(rows)
        return self._graphs.replay(rows)

    def _capture(self, rows: int) -> None:
        """Capture the decode step for ``rows`` rows, safely at any time: every row is held
        still (writes go to the trash slot) and the small decode buffers are restored."""
        state = (self._ids, self._pos, self._active, self._step_idx, self._out)
        saved = [t.clone() for t in state]
        self._active.zero_()
        self._step_idx.zero_()

        def step(n: int) -> torch.Tensor:
            with torch.inference_mode(), self._attention():
                return self._step_fn(n)

        try:
            self._graphs.capture(rows, step, self._eager_warmup_steps)
        except Exception as exc:
            for tensor, value in zip(state, saved, strict=True):
                tensor.copy_(value)
            if is_oom(exc) or not self._native_failed(exc):
                raise
            self._capture(rows)  # the next step down the chain
            return
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        self.warmup_report.capture_s = self._graphs.capture_s
        self.warmup_report.graphs = len(self._graphs)

    def _native_failed(self, exc: BaseException) -> bool:
        """The native step raised: a compiled one gives way to the eager one, an eager one to
        transformers' step (noted). False when the step was not native."""
        if self._native is None:
            return False
        what = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        if self.compile_step:
            self.notes.append(f"fast engine: the compiled native step failed ({what})")
            refusal = self._build_native(False)
            if refusal is not None:
                self._drop_native(refusal)
            return True
        self._drop_native(f"the native step failed: {what}")
        return True

    def _check_native(self) -> None:
        """Compare the native step with transformers' step on one state (every row decoding
        after the short prompt ``_touch_buffers`` wrote): a step that raises or differs by more
        than ``NATIVE_TOLERANCE`` gives way (``_native_failed``, ``_drop_native``)."""
        cache = self._cache
        assert cache is not None
        while self._native is not None and not self._native_checked:
            started = time.perf_counter()
            state = (self._ids, self._pos, self._active, self._step_idx, self._out)
            saved = [t.clone() for t in state]
            rows = self.max_batch
            try:
                with torch.inference_mode(), self._attention():
                    self._active.fill_(True)
                    self._pos.fill_(self._touched)
                    self._ids.fill_(self._fallback_token())
                    want = self._transformers_logits(rows).float()
                    got = self._native.logits(
                        self._ids, self._pos, self._active, cache, self._trash, self._slots
                    ).float()
                    diff = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
            except Exception as exc:
                if is_oom(exc) or not self._native_failed(exc):
                    raise
                continue
            finally:
                with torch.inference_mode():
                    for tensor, value in zip(state, saved, strict=True):
                        tensor.copy_(value)
                self.warmup_report.check_s += time.perf_counter() - started
            self.warmup_report.native_max_abs_diff = diff
            tolerance = NATIVE_TOLERANCE.get(want.dtype, 0.1)
            tolerance = NATIVE_TOLERANCE.get(self._native.layout.dtype, tolerance)
            if diff > tolerance:
                self._drop_native(
                    f"at warm-up the native step's logits differed from transformers' by "
                    f"{diff:.2g} of the largest (tolerance {tolerance:g})"
                )
                return
            self._native_checked = True
            self.notes.append(
                f"fast engine: native decode step checked against transformers' at warm-up "
                f"(largest logit difference {diff:.2g} of the largest logit)"
            )

    def _eager_warmup_steps(self, rows: int) -> None:
        """The eager steps before a capture (two before the first, one before the others: the
        kernels are warm by then). A decode attention whose kernel this device refuses (an error
        here, before any capture) falls back to ``grouped``, noted."""
        steps = 3 if self.compile_step else (2 if not self._graphs else 1)
        try:
            with torch.inference_mode(), self._attention():
                for _ in range(steps):
                    self._step_fn(rows)
                    self._step_idx.zero_()
        except Exception as exc:
            if is_oom(exc) or self._native is not None or self.decode_attention == "grouped":
                raise  # a native step's failure: ``_capture`` steps down its chain
            self.notes.append(
                f"fast engine: decode attention {self.decode_attention!r} failed on this device "
                f"({type(exc).__name__}: {str(exc)[:120]}); using 'grouped'"
            )
            self.decode_attention = "grouped"
            with torch.inference_mode(), self._attention():
                for _ in range(3 if self.compile_step else 2):
                    self._step_fn(rows)
                    self._step_idx.zero_()

    # -- the slot decoder (batching.SlotDecoder) ------------------------------------------------

    def prefill(self, chunks: Sequence[PrefillChunk]) -> None:
        """Chunks (left-padded to the longest) into their rows, each token in the slot of its
        position; padding writes the trash slot. A last chunk sets its row's first token."""
        self._prefill_logits(chunks)

    def _prefill_logits(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor:
        cache = self._cache
        assert cache is not None
        dev, n = self.device, len(chunks)
        width = max(len(c.tokens) for c in chunks)
        pad_id = self.tokenizer.pad_token_id or 0
        ids, starts, pads = [], [], []
        for chunk in chunks:
            pad = width - len(chunk.tokens)
            ids.append([pad_id] * pad + chunk.tokens)
            starts.append(chunk.start)
            pads.append(pad)
        host = torch.tensor([pads, starts, [c.row for c in chunks]], dtype=torch.long)
        host = host.to(dev, non_blocking=True) if dev.type == "cuda" else host
        pad_t, start_t, rows_t = host[0][:, None], host[1][:, None], host[2]
        column = torch.arange(width, device=dev)[None, :]
        real = column >= pad_t  # [n, width]
        positions = (start_t + column - pad_t).clamp(min=0)
        visible = max(c.start + len(c.tokens) for c in chunks)
        write = torch.where(real, positions, self._trash)
        slots = self._slots[None, None, :visible]
        query = positions[:, :, None]
        allowed = torch.where(real[:, :, None], slots <= query, slots == 0)
        slide = None
        if self.sliding_window is not None:
            slide = (allowed & (slots > query - self.sliding_window))[:, None]
        cache.rows, cache.row_index, cache.write_pos, cache.visible = n, rows_t, write, visible
        plain_call = all(c.start == 0 and len(c.tokens) == width for c in chunks) and (
            self.sliding_window is None or width <= self.sliding_window
        )
        try:
            with (
                torch.inference_mode(),
                self._attention(),
                causal_prefill(plain_call),
                variable_shape_kernels(dev, plain_call, n),
            ):
                logits = self._forward(
                    torch.tensor(ids, dtype=torch.long).to(dev),
                    positions,
                    self._mask_argument(allowed[:, None], slide),
                    torch.arange(width, device=dev),
                    cache,
                    1,
                )[:, -1]
        finally:
            cache.row_index, cache.visible = None, None
        last = [k for k, c in enumerate(chunks) if c.last]
        if last:
            with torch.inference_mode():
                pick = torch.tensor(last, device=dev)
                rows = rows_t.index_select(0, pick)
                first = logits.index_select(0, pick).argmax(dim=-1)
                end_at = [chunks[k].start + len(chunks[k].tokens) for k in last]
                ends = torch.tensor(end_at, device=dev)
                decode = torch.tensor([chunks[k].decode for k in last], device=dev)
                # the position of the budget's last token, never written: N-1 decode steps
                limits = torch.tensor(
                    [
                        NO_LIMIT if (n := chunks[k].new_tokens) is None else end + n - 1
                        for k, end in zip(last, end_at, strict=True)
                    ],
                    device=dev,
                )
                self._first.index_copy_(0, rows, first)
                self._ids.index_copy_(0, rows, first[:, None])
                self._pos.index_copy_(0, rows, ends[:, None])
                self._active.index_copy_(0, rows, decode[:, None])
                self._limit.index_copy_(0, rows, limits[:, None])
        return logits

    def decode(self, rows: int, steps: int) -> None:
        self._step_idx.zero_()
        for _ in range(steps):
            self._decode_step(rows)

    def fetch(
        self, rows: int, steps: int, firsts: Sequence[int]
    ) -> tuple[list[int], list[list[int]]]:
        first = self._first[list(firsts)].tolist() if firsts else []
        new = self._out[:rows, :steps].tolist() if steps else []
        return first, new

    def stop_rows(self, rows: Sequence[int]) -> None:
        self._active[list(rows)] = False

    def move_rows_to_front(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows), device=self.device)
        assert self._cache is not None
        with torch.inference_mode():
            self._cache.move_rows_to_front(index)
            for tensor in (self._ids, self._pos, self._active, self._first, self._limit):
                tensor[: len(rows)] = tensor.index_select(0, index)
            self._active[len(rows) :] = False

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ready_bucket(self, n: int) -> int:
        return bucket_for(n, self.max_batch, self._smallest_bucket)

    @property
    def _smallest_bucket(self) -> int:
        """2 for a compiled native step (``graphs.buckets``), else 1."""
        return 2 if self._native is not None and self.compile_step else 1

    def is_finished(self, request: GenerateRequest, tokens: list[int]) -> bool:
        if len(tokens) >= request.max_new_tokens:
            return True
        if any(token in self.eos_ids for token in tokens):
            return True
        if request.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return first_stop(text, request.stop) is not None
        return False

    def finish(self, request: GenerateRequest, tokens: list[int]) -> tuple[str, int]:
        return self._finish(request, tokens, None)

    # -- generate -------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> Iterator[Completed]:
        if not requests:
            return
        prompts = [
            self._cut(r, self._encode(r.prompt) or [self._fallback_token()]) for r in requests
        ]
        todo = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        longest = max(len(prompts[i]) + requests[i].max_new_tokens for i in todo)
        while True:
            self._ensure_capacity(min(self.max_length, longest))
            done: set[int] = set()
            try:
                for index, completed in run_continuous(
                    self, requests, prompts, todo, self.loop, self._count_tokens
                ):
                    done.add(index)
                    yield completed
                return
            except Exception as exc:
                if not is_oom(exc) or self.max_batch == 1:
                    raise
                todo = [i for i in todo if i not in done]
                self._halve_batch(exc)
                self.max_batch = self.batch_size
                self._drop_buffers()

    def _cut(self, request: GenerateRequest, ids: list[int]) -> list[int]:
        """The prompt's last tokens when it and its budget exceed the model's window (noted)."""
        room = self.max_length - request.max_new_tokens
        if room <= 0 or len(ids) <= room:
            return ids
        note = (
            f"fast engine: prompts longer than the model's window ({self.max_length} tokens "
            f"with their new tokens) kept their last tokens, as plain does"
        )
        if note not in self.notes:
            self.notes.append(note)
        return ids[-room:]

    def _count_tokens(self, n: int) -> None:
        self.live_tokens += n

    def _fallback_token(self) -> int:
        token = self.tokenizer.bos_token_id
        return token if token is not None else (self.eos_ids[0] if self.eos_ids else 0)

    # -- loglikelihood --------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> Iterator[Completed]:
        packed = pack_requests(requests, self.encode_pair, self.max_length)
        for index in packed.empty:
            yield Completed(index, LoglikelihoodResponse((), ()), 0, 0)
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

        def answer(groups: Sequence[Any], scores: PendingScores) -> Iterator[Completed]:
            values = scores.read()
            flat = 0
            for group in groups:
                n_in = group.input_length()
                for k, (choice, _) in enumerate(group.choices):
                    done = finish(group.index, choice, values[flat + k], n_in if k == 0 else 0)
                    if done is not None:
                        yield done
                flat += len(group.choices)

        groups = packed.groups
        behind: tuple[Sequence[Any], PendingScores] | None = None
        for start, count, scores in self._halving(
            len(groups),
            lambda at: take_batch(
                groups, at, self.batch_size, self.loop.forward_tokens, self._logit_positions()
            ),
            lambda at, n: self._score_groups(groups[at : at + n]),
        ):
            if behind is not None:
                yield from answer(*behind)
            behind = (groups[start : start + count], scores)
        if behind is not None:
            yield from answer(*behind)
        for at in range(0, len(packed.unpacked), self.batch_size):
            chunk = packed.unpacked[at : at + self.batch_size]
            scored_pairs = self._score_pairs([(p[2], p[3]) for p in chunk])
            for (index, choice, _, _), (logprob, greedy, n_in) in zip(
                chunk, scored_pairs, strict=True
            ):
                done = finish(index, choice, (logprob, greedy), n_in)
                if done is not None:
                    yield done

    def _logit_positions(self) -> int:
        """Most kept logits positions in one log-likelihood forward: ``LOGITS_BYTES`` of logits
        in the model's dtype (Gemma 3's 262,144-token vocabulary in bf16: 4,096 positions)."""
        head = self.model.get_output_embeddings()
        vocab = (
            int(head.weight.shape[0])
            if head is not None
            else int(text_config(self.model.config).vocab_size)
        )
        size = torch.finfo(self.model.dtype).bits // 8 if self.model.dtype.is_floating_point else 4
        return max(1, LOGITS_BYTES // (vocab * size))

    def _score_groups(self, groups: Sequence[Any]) -> PendingScores:
        """Every choice of every group in one forward; the sums stay on the device."""
        dev = self.device
        batch = build_batch(groups, self.tokenizer.pad_token_id or 0).to(dev)
        ids, positions, segment = batch.rows_in
        width = ids.shape[1]
        with torch.inference_mode(), self._attention(), variable_shape_kernels(dev):
            allowed = packed_mask(segment)
            slide = None
            if self.sliding_window is not None:
                distance = positions[:, :, None] - positions[:, None, :]
                slide = allowed & (distance < self.sliding_window)[:, None]
            logits = self._forward(
                ids,
                positions,
                self._mask_argument(allowed, slide),
                torch.arange(width, device=dev),
                None,
                batch.keep,
            )
            return PendingScores(*sum_logprobs(logits, batch))

    # -- before the window ----------------------------------------------------------------------

    def prepare(
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Tokenise everything and size the KV cache for the longest request, so that no
        cache growth (and graph recapture) happens inside the measured window."""
        super().prepare(generate, loglikelihood)
        if generate:
            self._planned_tokens = max(
                len(self._cut(r, self._encode(r.prompt) or [0])) + r.max_new_tokens
                for r in generate
            )
        if self.auto_batch:
            self._size_batch(len(generate))

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one sequence needs per token (every layer keeps a full slot row)."""
        text = text_config(self.model.config)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        size = next(self.model.parameters()).element_size()
        return int(text.num_hidden_layers) * 2 * kv_heads * head_dim * size

    def _size_batch(self, sequences: int) -> None:
        """``batch_size = "auto"``: as many slot rows as ``AUTO_CACHE_SHARE`` of free GPU memory
        holds for the longest request (a power of two, at most ``AUTO_MAX_ROWS`` and no more
        than there are requests); noted. On the CPU, and for log-likelihood, the default."""
        if self.device.type != "cuda" or not sequences or not self._planned_tokens:
            self.notes.append(f"batch_size auto: {self.batch_size} (no GPU memory to size from)")
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        row_bytes = self.kv_bytes_per_token() * (self._planned_tokens + CAPACITY_STEP)
        fit = max(1, int(free * AUTO_CACHE_SHARE // row_bytes))
        rows = 1
        while rows * 2 <= min(fit, AUTO_MAX_ROWS, max(sequences, 1)):
            rows *= 2
        self.batch_size = self.max_batch = rows
        self._drop_buffers()
        mib = 2**20
        self.notes.append(
            f"batch_size auto: {rows} sequences in flight (KV cache {row_bytes / mib:.1f} MiB "
            f"per sequence for {self._planned_tokens} tokens; {free / mib:,.0f} MiB free, "
            f"{AUTO_CACHE_SHARE:.0%} of it for the cache)"
        )

    # -- warm-up --------------------------------------------------------------------------------

    def warmup(
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Size the KV cache from the given requests, check a native step against transformers'
        one, capture every batch-size bucket, run them.

        The cache gets room for the longest request ``prepare`` saw (the runner prepares every
        request first), else for prompts a quarter longer than the longest given; a longer
        request later grows it (noted).
        """
        started = time.perf_counter()
        if generate:
            longest = max(len(self._encode(r.prompt)) for r in generate)
            budget = max(r.max_new_tokens for r in generate)
            # the run's real need when prepare saw every request, else a margin for longer ones
            if self._planned_tokens:
                tokens = max(self._planned_tokens, longest + budget)
            else:
                tokens = int(longest * 1.25) + budget
            self._ensure_capacity(min(self.max_length, tokens))
            self._touch_buffers(max(1, longest))
            self.warmup_report.cache_bytes = self._cache.nbytes() if self._cache else 0
            self._check_native()
            if self.use_graphs:
                for rows in reversed(buckets(self.max_batch, self._smallest_bucket)):  # one pool
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
        self.live_tokens = 0

    def _touch_buffers(self, width: int) -> None:
        """A prefill over every row allocates the cache before any capture."""
        prompt = [self.eos_ids[0] if self.eos_ids else 0] * min(width, 8)
        self._touched = len(prompt)
        """Slots of every row the last touch wrote (the native check decodes after them)."""
        self._prefill_logits(
            [PrefillChunk(r, prompt, 0, False, False) for r in range(self.max_batch)]
        )

    # -- verification ---------------------------------------------------------------------------

    def teacher_forced_logprobs(
        self, prompt_ids: list[list[int]], forced: list[list[int]]
    ) -> torch.Tensor:
        """Log-probs (float32, [rows, steps]) the decode path (graphs on CUDA) gives ``forced``.

        Every row's prompt is prefilled, then the forced tokens are fed one per decode step
        instead of the argmax: a check of the decode path against a plain forward. All rows of
        ``forced`` must have the same length; rows <= ``batch_size``.
        """
        logits = self.teacher_forced_logits(prompt_ids, forced)
        forced_t = torch.tensor(forced, device=logits.device)
        return torch.log_softmax(logits, -1).gather(2, forced_t[:, :, None]).squeeze(2)

    def teacher_forced_logits(
        self, prompt_ids: list[list[int]], forced: list[list[int]]
    ) -> torch.Tensor:
        """Logits (float32, [rows, steps, vocab]) before each forced token: the prefill's for
        the first, then one decode step (graph replay on CUDA) per forced token."""
        n, steps = len(prompt_ids), len(forced[0])
        self._ensure_capacity(max(len(p) for p in prompt_ids) + steps)
        rows_now = bucket_for(n, self.max_batch, self._smallest_bucket)
        forced_t = torch.tensor(forced, device=self.device)
        self._active.zero_()
        logits = self._prefill_logits(
            [PrefillChunk(r, list(p), 0, True, True) for r, p in enumerate(prompt_ids)]
        )
        with torch.inference_mode():
            out = [logits.float()]
            for step in range(1, steps):
                self._ids[:n, 0] = forced_t[:, step - 1]
                self._step_idx.zero_()
                out.append(self._decode_step(rows_now)[:n].float())
        self._active.zero_()
        return torch.stack(out, dim=1)
