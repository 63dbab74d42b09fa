"""One decoder layer of the native decode step: one token per row, written once for every family.

``make_decode_layer(plan, attend, act)`` returns a function of tensors only (the residual
stream, the layer's weights, its KV cache tensors, the rotary rows and the mask); what differs
between families is fixed in the ``LayerPlan`` and read as constants. So ``torch.compile``
traces it once and every layer of a model replays the same compiled graph (Gemma's sliding and
global layers differ only in arguments: mask and rotary table).

The layer takes the residual stream and the previous layer's output (``delta``) and starts
with their sum, which the norm that follows reads at once (the residual add fused with the
norm); it returns the stream after attention and its MLP's output, for the next layer (or the
final norm) to add. Each operation follows the family's transformers code (cited per function),
in the same dtypes, so that in float32 the result matches transformers' forward to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(query [rows, heads, 1, dim], keys, values [rows, kv_heads, slots, dim], mask [rows, 1, 1,
slots] bool, scaling) -> [rows, 1, heads, dim]."""


@dataclass(frozen=True)
class LayerPlan:
    """What every layer of one model computes, beyond its weights."""

    heads: int
    kv_heads: int
    head_dim: int
    norm: str
    """"scaled": ``weight * normed.to(dtype)`` (Llama's RMSNorm and its copies); "one_plus":
    ``(normed * (1 + weight)).to(dtype)`` in float32 (Gemma; the weight given as 1 + weight)."""
    eps: float
    qk_norm: bool
    """Per-head RMSNorm of queries and keys before the rotary embedding (Qwen3, Gemma 3); the
    weights come as one [heads + kv_heads, head_dim] tensor (``qk_norm``)."""
    sandwich: bool
    """Gemma: a norm after attention, a separate norm before the MLP and one after it."""
    scaling: float
    """Attention scores' factor (Gemma 3: ``query_pre_attn_scalar ** -0.5``)."""
    fused_qkv: bool
    fused_gate_up: bool
    softcap: float | None = None
    """Attention scores soft-capped at this value (Gemma 2's ``attn_logit_softcapping``): the
    step's attention is then ``attention.softcapped_attention``, not SDPA."""

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str, spelled: bool = False
) -> torch.Tensor:
    """LlamaRMSNorm.forward ("scaled": normalised in float32, rounded to ``x``'s dtype, then
    multiplied by the weight in that dtype) and Gemma3RMSNorm.forward ("one_plus": ``weight`` is
    1 + w in float32, multiplied in float32, then rounded), over the last dimension; ``weight``
    may be [..., dim] (queries and keys together).

    Eagerly the normalisation is one ``F.rms_norm`` call (float32 inside whatever the input's
    dtype; one kernel where torch has a fused one); ``spelled`` writes it out as the models do,
    for ``torch.compile`` to fuse with the residual add and the weight (inductor calls a fused
    rms_norm kernel as an opaque op)."""
    if spelled:
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
        if kind == "one_plus":
            return (hidden * weight).type_as(x)
        return weight * hidden.to(x.dtype)
    if kind == "one_plus":
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight).type_as(x)
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb for one of q or k ([rows, heads, dim]; cos, sin [rows, 1, rotary
    dims]); Phi-3's partial rotary leaves the dimensions past the table's width as they are."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    turned, kept = x[..., :width], x[..., width:]
    return torch.cat([(turned * cos) + (rotate_half(turned) * sin), kept], dim=-1)


def make_decode_layer(
    plan: LayerPlan,
    attend: Attend,
    act: Callable[[torch.Tensor], torch.Tensor],
    compiled: bool = False,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The layer function for ``plan`` (module docstring); ``compiled``: for torch.compile (the
    norms spelled out, see ``_rms_norm``)."""
    heads, kv_heads, dim = plan.heads, plan.kv_heads, plan.head_dim
    kind, eps = plan.norm, plan.eps

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
        return _rms_norm(x, weight, eps, kind, compiled)

    def decode_layer(
        residual: torch.Tensor,
        delta: torch.Tensor,
        w: dict[str, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows_index: torch.Tensor,
        write_pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual, delta [rows, hidden]; k_cache, v_cache the layer's whole slot cache
        [max_batch, kv_heads, slots, dim]; rows_index, write_pos [rows]: each row writes its new
        key and value at (row, write_pos) and attends over its row with ``mask``."""
        rows = residual.shape[0]
        residual = residual + delta
        hidden = rms_norm(residual, w["input_norm"], eps, kind)
        if plan.fused_qkv:
            qkv = F.linear(hidden, w["qkv"], w.get("qkv_bias"))
            q, k, v = qkv.split([plan.q_size, plan.kv_size, plan.kv_size], dim=-1)
        else:
            q = F.linear(hidden, w["q"], w.get("q_bias"))
            k = F.linear(hidden, w["k"], w.get("k_bias"))
            v = F.linear(hidden, w["v"], w.get("v_bias"))
        # queries and keys side by side: one norm and one rotation for both
        qk = (
            torch.cat([q, k], dim=-1)
            if not plan.fused_qkv
            else qkv[:, : plan.q_size + plan.kv_size]
        )
        qk = qk.reshape(rows, heads + kv_heads, dim)
        if plan.qk_norm:
            qk = rms_norm(qk, w["qk_norm"], eps, kind)
        q, k = rotate(qk, cos, sin).split([heads, kv_heads], dim=1)
        v = v.reshape(rows, kv_heads, dim)
        k_cache[rows_index, :, write_pos] = k
        v_cache[rows_index, :, write_pos] = v
        out = attend(q[:, :, None, :], k_cache[:rows], v_cache[:rows], mask, plan.scaling)
        out = F.linear(out.reshape(rows, heads * dim), w["o"], w.get("o_bias"))
        if plan.sandwich:
            out = rms_norm(out, w["post_attention_norm"], eps, kind)
        residual = residual + out
        hidden = rms_norm(residual, w["mlp_norm"], eps, kind)
        if plan.fused_gate_up:
            gate, up = F.linear(hidden, w["gate_up"], w.get("gate_up_bias")).chunk(2, dim=-1)
        else:
            gate = F.linear(hidden, w["gate"], w.get("gate_bias"))
            up = F.linear(hidden, w["up"], w.get("up_bias"))
        out = F.linear(act(gate) * up, w["down"], w.get("down_bias"))
        if plan.sandwich:
            out = rms_norm(out, w["post_mlp_norm"], eps, kind)
        return residual, out

    return decode_layer
