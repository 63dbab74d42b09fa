"""``NativeDecoder``: the fast engine's decode step without transformers' forward.

One call computes the logits of one token per row over the engine's slot cache: the model's own
embedding module, every layer through one layer function (``layer.make_decode_layer``), the
model's own final norm and output head (and Gemma's final soft-cap). It honours the engine's
step semantics (``FastEngine._step``): a decoding row writes its key and value at its position
and attends to its slots up to it (and within its layer's sliding window); any other row writes
the trash slot and attends to it alone. The engine takes the greedy token and updates its
buffers around it, all inside the same CUDA graph.

The rotary table is the model's own: its rotary module computes cos and sin for every slot once
(``set_capacity``), each layer type its own (Gemma 3's local and global), and a row picks its
position's entry. With ``compile`` the layer function goes through ``torch.compile`` (one graph
that every layer replays; the fused residual add, norms, rotary and cache write become a few
kernels); the engine then captures the whole step, compiled layers included, in one CUDA graph.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from slmtui.worker.engines.base import text_config
from slmtui.worker.engines.fast.attention import ATTENTION_FUNCTIONS, softcapped_attention
from slmtui.worker.engines.fast.native.layer import Attend, LayerPlan, make_decode_layer
from slmtui.worker.engines.fast.native.layout import NativeLayout, read_layout, rope_limit
from slmtui.worker.engines.fast.slot_cache import SlotCache


def attention_for(
    variant: str, heads: int, kv_heads: int, softcap: float | None = None
) -> tuple[str, Attend]:
    """The engine's decode attention call (``attention.ATTENTION_FUNCTIONS``) as the layer
    calls it; ``sdpa`` (transformers' own call, which needs its module) and the GQA variants of a
    model without grouped heads are ``gqa`` here. With ``softcap`` (Gemma 2) it is
    ``attention.softcapped_attention``, named "softcap"."""
    if softcap:
        return "softcap", functools.partial(softcapped_attention, softcap=softcap)
    if variant not in ATTENTION_FUNCTIONS or variant == "sdpa" or kv_heads == heads:
        variant = "gqa"
    function = ATTENTION_FUNCTIONS[variant]

    def attend(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        return function(None, query, key, value, mask, scaling=scale)[0]

    return variant, attend


RECOMPILE_LIMIT = 64
"""torch.compile's graphs per function before it silently runs it uncompiled (torch's default
is 8): every model, step shape and weight format in one worker process adds one or two."""
_COMPILED: dict[tuple[Any, ...], Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
"""Compiled layer functions by what they compute: a second engine for the same model (a worker
serving a group of runs, each with its own engine) reuses the graphs of the first."""


def compiled_layer(
    plan: LayerPlan, attention: str, attend: Attend, act: Any, backend: Any
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The compiled layer function for ``plan`` (one per kind of layer, shared by engines)."""
    state = tuple(sorted((k, repr(v)) for k, v in vars(act).items() if not k.startswith("_")))
    exact = exact_casts() and backend == "inductor"
    key = (
        plan,
        attention,
        type(act),
        state,
        backend if isinstance(backend, str) else id(backend),
        exact,
    )
    if key not in _COMPILED:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        layer = make_decode_layer(plan, attend, act, compiled=True)
        # static shapes but the rows (``NativeDecoder.logits`` marks them): one graph for every
        # bucket of 2 rows or more, a new one only for other widths (another model)
        options = {"emulate_precision_casts": True} if exact else None
        _COMPILED[key] = torch.compile(
            layer, fullgraph=True, backend=backend, dynamic=False, options=options
        )
    return _COMPILED[key]


def exact_casts() -> bool:
    """Inductor rounds every intermediate to the dtype eager torch would (its
    ``emulate_precision_casts``) unless ``SLMTUI_COMPILE_EXACT_CASTS=0``: a fused kernel then
    computes what the model's own eager code computes, op by op, instead of keeping float32
    between ops (which moved teacher-forced log-probs 100x further from transformers')."""
    return os.environ.get("SLMTUI_COMPILE_EXACT_CASTS", "1").strip() != "0"


class NativeDecoder:
    """The native decode step of one model (module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        attention: str = "gqa",
        compile_layers: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        self.layout: NativeLayout = read_layout(model)
        self.config = text_config(model.config)
        plan = self.layout.plan
        self.attention, attend = attention_for(attention, plan.heads, plan.kv_heads, plan.softcap)
        self.compiled = compile_layers
        self.layer: Callable[..., tuple[torch.Tensor, torch.Tensor]] = make_decode_layer(
            plan, attend, self.layout.act
        )
        if compile_layers:
            self.layer = compiled_layer(
                plan, self.attention, attend, self.layout.act, compile_backend
            )
        self.notes = list(self.layout.notes)
        self.capacity = 0
        self._tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows_index: torch.Tensor | None = None

    def set_capacity(self, capacity: int, max_batch: int, device: torch.device) -> str | None:
        """Rotary tables for ``capacity`` slots; why the step cannot cover them, or None."""
        limit = rope_limit(self.layout, self.config)
        if limit is not None and capacity > limit:
            return (
                f"its rotary embedding changes past {limit} positions and the cache holds "
                f"{capacity}"
            )
        positions = torch.arange(capacity, device=device)[None, :]
        probe = torch.zeros((1, 1), dtype=self.layout.dtype, device=device)
        rotary = self.layout.rotary
        tables = {}
        with torch.inference_mode():
            for kind in dict.fromkeys(self.layout.rope_kinds):
                args = (probe, positions) if kind is None else (probe, positions, kind)
                cos, sin = rotary(*args)
                tables[kind] = (cos[0].contiguous(), sin[0].contiguous())
            self._rows_index = torch.arange(max_batch, device=device)
        self._tables = tables
        self.capacity = capacity
        return None

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """[rows, 1, 1, slots]: 0 where allowed, -inf elsewhere, in the model's dtype: what SDPA
        makes of a boolean mask, made once per step instead of once per layer."""
        blocked = torch.full(
            allowed.shape, float("-inf"), dtype=self.layout.dtype, device=allowed.device
        )
        return blocked.masked_fill_(allowed, 0.0)[:, None, None, :]  # no host tensor: capturable

    def logits(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        active: torch.Tensor,
        cache: SlotCache,
        trash: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """[rows, vocab] logits of the next token of each row (ids, pos, active: [rows, 1];
        trash [1, 1]; slots: arange(capacity)). Capturable: no host sync, no allocation that
        depends on values."""
        layout = self.layout
        assert self._rows_index is not None
        rows = ids.shape[0]
        write = torch.where(active, pos, trash)[:, 0]
        allowed = torch.where(active, slots[None, :] <= pos, slots[None, :] == trash)
        masks: dict[int | None, torch.Tensor] = {None: self._additive(allowed)}
        for window in {w for w in layout.windows if w is not None}:
            slide = torch.where(active, allowed & (slots[None, :] > pos - window), allowed)
            masks[window] = self._additive(slide)
        where = pos[:, 0].clamp(max=self.capacity - 1)
        rotary = {
            kind: (cos[where][:, None, :], sin[where][:, None, :])
            for kind, (cos, sin) in self._tables.items()
        }
        residual = layout.embed(ids)[:, 0]  # the modules at either end see transformers' shapes
        delta = torch.zeros_like(residual)
        rows_index = self._rows_index[:rows]
        by_row = self.compiled and rows > 1
        if by_row:
            for tensor in (
                rows_index,
                write,
                *masks.values(),
                *(t for p in rotary.values() for t in p),
            ):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        for index, weights in enumerate(layout.weights):
            cos, sin = rotary[layout.rope_kinds[index]]
            if by_row:
                torch._dynamo.maybe_mark_dynamic(residual, 0)
                torch._dynamo.maybe_mark_dynamic(delta, 0)
            residual, delta = self.layer(
                residual,
                delta,
                weights,
                cache.keys[index],
                cache.values[index],
                cos,
                sin,
                rows_index,
                write,
                masks[layout.windows[index]],
            )
        logits = layout.lm_head(layout.final_norm((residual + delta)[:, None]))[:, 0]
        if layout.final_softcap is not None:
            logits = torch.tanh(logits / layout.final_softcap) * layout.final_softcap
        return logits
