"""Attention for the fast engine: SDPA calls registered with transformers' ``AttentionInterface``
(``slmtui_fast_<decode attention>``) and switched on only inside the engine's forwards.

* More than one query token (prefill, packed log-likelihood): transformers' own SDPA call over
  the keys the slot cache returns. Inside ``causal_prefill()`` a call whose keys are exactly its
  queries drops the mask and runs plain's prefill call (causal, GQA in the kernel).
* One query token (decode) over the whole slot cache with a boolean mask, one of
  ``DECODE_ATTENTIONS``: ``gqa`` (default) is plain's own decode call, one query row per head
  with GQA inside the kernel (no K/V copy), plus the mask; ``grouped`` folds each KV head's query
  heads into query rows (bf16 sequences identical to plain 2/32 on an H100, against 11/32 for
  transformers' static cache: the kernel rounds seven query rows per head differently from
  plain's one); ``expand`` is transformers' static-cache call (one query row per head, K/V per
  head) with K/V repeated by a stride-0 view, not copied; ``sdpa`` is transformers' own SDPA
  path (``repeat_kv`` copies the cache every layer and step in transformers 5.17).

A model whose attention soft-caps its scores (Gemma 2: ``softcap`` in the call's arguments) gets
``softcapped_attention`` for every call instead, transformers' eager computation op for op (SDPA
has no soft-cap; plain runs Gemma 2 eagerly too).

``variable_shape_kernels()`` keeps the cuDNN SDPA backend out of forwards whose shapes change
from call to call (prefill chunks, log-likelihood batches): cuDNN builds an execution plan per
new shape on the host (hundreds of ms each), which left the GPU 5% busy on bf16 log-likelihood.
A prefill that is plain's own call (every prompt whole from position 0, no mask) runs cuDNN
when it carries two or more rows (``SLMTUI_PREFILL_CUDNN=batched``, the default): on the H200
plain's causal prefill runs cuDNN, and the same call on flash rounds differently in about a
third of the rows, which makes greedy text leave plain's at the first near-tie
(``bench/fidelity_probe.py``: 7/64 sequences identical to plain's on random weights with flash,
24-29/64 with cuDNN, transformers' static cache 24-26). cuDNN's first call at each new shape
costs 70-80 ms on the H200 (a plan per batch and prompt length): a batched call pays it once
for all its rows, while one-row prefills (a run's refills, every prompt of a batch-1 run) come
in every prompt length and would pay it inside the measured window, hitting small models'
speed hardest, so they stay on flash (``plain`` lets them have cuDNN too; ``never`` keeps it out
of every prefill). A one-row refill cannot be plain's call anyway: plain prefills its batches
left-padded under a mask. Accuracy on real items was within sampling noise of plain's either
way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

ATTENTION_NAME = "slmtui_fast"
DECODE_ATTENTIONS = ("gqa", "expand", "grouped", "sdpa")
"""Decode attention variants (module docstring); ``auto`` chooses among the first three."""

_state = {"causal": False}


@contextlib.contextmanager
def causal_prefill(enabled: bool = True) -> Iterator[None]:
    """Within: a call whose keys are its own queries runs causal, without the mask."""
    previous = _state["causal"]
    _state["causal"] = enabled
    try:
        yield
    finally:
        _state["causal"] = previous


PREFILL_CUDNN_SETTINGS = ("batched", "plain", "never")


def prefill_cudnn_setting() -> str:
    """``SLMTUI_PREFILL_CUDNN``: ``batched`` (default: plain's own prefill call may take cuDNN,
    as plain's does, when it carries two or more rows), ``plain`` (one-row calls too) or
    ``never``; anything else is a ValueError naming the variable and what is allowed."""
    value = os.environ.get("SLMTUI_PREFILL_CUDNN", "batched").strip().lower() or "batched"
    if value not in PREFILL_CUDNN_SETTINGS:
        raise ValueError(
            f"SLMTUI_PREFILL_CUDNN='{value}': allowed {', '.join(PREFILL_CUDNN_SETTINGS)}"
        )
    return value


def cudnn_for_prefill(plain_call: bool, rows: int) -> bool:
    """Whether a prefill of ``rows`` rows may run cuDNN (the module docstring says why)."""
    setting = prefill_cudnn_setting()
    return plain_call and (setting == "plain" or (setting == "batched" and rows >= 2))


@contextlib.contextmanager
def variable_shape_kernels(
    device: torch.device, plain_call: bool = False, rows: int = 1
) -> Iterator[None]:
    """SDPA without the cuDNN backend on CUDA (see the module docstring); a no-op elsewhere and
    for plain's own prefill call (``plain_call``) of ``rows`` rows where ``cudnn_for_prefill``
    allows it."""
    if device.type != "cuda" or cudnn_for_prefill(plain_call, rows):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [
        getattr(SDPBackend, name)
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
        if hasattr(SDPBackend, name)
    ]
    with sdpa_kernel(backends):
        yield


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

    if _state["causal"] and query.shape[2] == key.shape[2]:
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


def softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float,
) -> torch.Tensor:
    """Gemma 2's ``eager_attention_forward`` (transformers), op for op: scores scaled, then
    ``tanh(scores / softcap) * softcap``, the mask (boolean: blocked scores take the dtype's
    minimum, which is what plain's additive mask gives them; additive: added), softmax in
    float32 rounded back, times the values. No mask and more than one query: causal (the
    prefill's own call). Returns [batch, queries, heads, dim]."""
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores / softcap
    scores = torch.tanh(scores)
    scores = scores * softcap
    if attention_mask is None and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones((q_len, k_len), dtype=torch.bool, device=query.device).tril(
            k_len - q_len
        )
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def _softcap_aware(
    function: Callable[..., tuple[torch.Tensor, None]],
) -> Callable[..., tuple[torch.Tensor, None]]:
    """``function``, except for a call that brings ``softcap``: ``softcapped_attention``."""

    def call(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        softcap = kwargs.get("softcap")
        if softcap:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            if attention_mask is not None and attention_mask.dim() == 4 and query.shape[2] == 1:
                attention_mask = _decode_mask(attention_mask, key)
            return softcapped_attention(query, key, value, attention_mask, scale, softcap), None
        return function(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    return call


ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, None]]] = {
    "gqa": _gqa_attention,
    "grouped": _grouped_attention,
    "expand": _expand_attention,
    "sdpa": _prefill_attention,  # transformers' own SDPA for the decode step too
}


def register_attention() -> None:
    """Register every variant as ``slmtui_fast_<variant>`` (idempotent)."""
    from transformers import AttentionInterface

    for variant, function in ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(f"{ATTENTION_NAME}_{variant}", _softcap_aware(function))


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
