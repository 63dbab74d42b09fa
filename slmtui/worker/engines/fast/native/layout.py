"""What the native decode step reads from a loaded transformers model, per family.

``native_refusal(model)`` says why the step will not run a model (one line), without touching
it; ``read_layout(model)`` takes the weights into the step's layout: query/key/value and gate/up
fused into one matrix each (``worker.fusion``: the model's own layers keep using row views of
the same memory, so nothing is copied and transformers' forward is unchanged; Phi-3 is fused
already), Gemma's norm weights as ``1 + w`` in float32, and the model's own embedding, final
norm, output head and rotary-embedding modules as they are.

A model is taken only when every module is the class its family's transformers code defines
(``Qwen2DecoderLayer``, ``Qwen2Attention``, ``Qwen2MLP``, ``Qwen2RMSNorm``, ...) and no config
feature the step does not implement is on: anything else is refused, and the engine runs
transformers' forward for its decode step instead. Quantised (torchao) projections are read
fused when ``worker.quantize`` quantised them fused, else one by one; either way the step calls
the same tensors the model's own layers call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slmtui.worker.engines.base import text_config
from slmtui.worker.engines.fast.native.layer import LayerPlan
from slmtui.worker.engines.support import NATIVE_FAMILIES, sliding_windows
from slmtui.worker.fusion import fuse_projections, fused_group, is_plain

ONE_PLUS_NORM = frozenset({"gemma2", "gemma3_text"})
"""Families whose RMSNorm scales by ``1 + weight`` in float32 (Gemma)."""
QK_NORM = frozenset({"qwen3", "gemma3_text"})
SANDWICH = frozenset({"gemma2", "gemma3_text"})
FUSED_IN_MODEL = frozenset({"phi3"})
"""Families whose model stores ``qkv_proj`` and ``gate_up_proj`` fused."""
DYNAMIC_ROPE = ("dynamic", "longrope")
"""Rotary types whose frequencies change with the longest position of a call: the step's table
is the model's only while every position stays below the threshold (``rope_limit``)."""


@dataclass
class NativeLayout:
    """One model's decode step: static facts, per-layer weights, the model's own modules."""

    plan: LayerPlan
    weights: list[dict[str, torch.Tensor]]
    windows: list[int | None]
    """Each layer's sliding window (None: full causal)."""
    rope_kinds: list[str | None]
    """Each layer's rotary table (Gemma 3: its layer type; None: the model's single table)."""
    embed: Any
    final_norm: Any
    lm_head: Any
    rotary: Any
    act: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype
    final_softcap: float | None
    notes: list[str] = field(default_factory=list)


def _names(model_type: str) -> dict[str, str]:
    prefix = NATIVE_FAMILIES[model_type]
    base = "Gemma3TextModel" if model_type == "gemma3_text" else f"{prefix}Model"
    return {
        "causal": f"{prefix}ForCausalLM",
        "base": base,
        "layer": f"{prefix}DecoderLayer",
        "attention": f"{prefix}Attention",
        "mlp": f"{prefix}MLP",
        "norm": f"{prefix}RMSNorm",
    }


def _norm_names(model_type: str) -> tuple[str, ...]:
    if model_type in SANDWICH:
        return (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
    return ("input_layernorm", "post_attention_layernorm")


def _class(module: Any) -> str:
    return type(module).__name__


def _act(mlp: Any) -> Any:
    return getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)


def native_refusal(model: Any) -> str | None:
    """Why the native decode step will not run ``model`` (one line), or None."""
    config = text_config(model.config)
    model_type = str(getattr(config, "model_type", None) or "unknown")
    if model_type not in NATIVE_FAMILIES:
        return f"architecture '{model_type}' has no native decode step"
    if len({p.device for p in model.parameters()}) > 1:
        return "the model is spread over several devices"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "the model is one rank of a multi-process job"
    if model.training:
        return "the model is in training mode (dropout)"
    names = _names(model_type)
    base = getattr(model, "model", None)
    if _class(model) != names["causal"] or _class(base) != names["base"]:
        return f"{_class(model)} is not the {names['causal']} it knows"
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if getattr(base, part, None) is None:
            return f"{names['base']} has no '{part}'"
    if getattr(model, "lm_head", None) is None:
        return f"{names['causal']} has no lm_head"
    if _class(base.norm) != names["norm"]:
        return f"final norm {_class(base.norm)} is not {names['norm']}"
    for feature in ("use_bidirectional_attention",):
        if getattr(config, feature, None):
            return f"config '{feature}' is set ({getattr(config, feature)})"
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        return f"{heads} query heads do not group over {kv_heads} key/value heads"
    if len(base.layers) != int(config.num_hidden_layers):
        return f"{len(base.layers)} layers built, the config runs {config.num_hidden_layers}"
    acts = set()
    for index, layer in enumerate(base.layers):
        problem = _layer_refusal(layer, model_type, names)
        if problem:
            return f"layer {index}: {problem}"
        acts.add(type(_act(layer.mlp)))
    if len(acts) != 1:
        return "layers use different activations"
    hooked = _hooked(model)
    if hooked:
        return f"{hooked} has forward hooks, which the native step would not call"
    kinds = _rope_types(base.rotary_emb)
    if any(not isinstance(t, str) for t in kinds.values()):
        return "rotary embedding without a rope type"
    return None


def _hooked(model: Any) -> str | None:
    """The first module whose hooks the step would skip (it calls the embedding, final norm and
    output head as modules, so their hooks run); "torch" for global module hooks."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "torch"
    base = model.model
    called = {
        id(m) for part in (base.embed_tokens, base.norm, model.lm_head) for m in part.modules()
    }
    for name, module in model.named_modules():
        if id(module) in called:
            continue
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return name or type(model).__name__
    return None


def _layer_refusal(layer: Any, model_type: str, names: dict[str, str]) -> str | None:
    if _class(layer) != names["layer"]:
        return f"{_class(layer)} is not {names['layer']}"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if _class(attn) != names["attention"] or _class(mlp) != names["mlp"]:
        return f"{_class(attn)} / {_class(mlp)} are not {names['attention']} / {names['mlp']}"
    for norm in _norm_names(model_type):
        if _class(getattr(layer, norm, None)) != names["norm"]:
            return f"{norm} is not {names['norm']}"
    if model_type in QK_NORM and not (
        _class(getattr(attn, "q_norm", None)) == names["norm"]
        and _class(getattr(attn, "k_norm", None)) == names["norm"]
    ):
        return "query/key norms are not the family's"
    projections = ("qkv_proj",) if model_type in FUSED_IN_MODEL else ("q_proj", "k_proj", "v_proj")
    mlp_projections = (
        ("gate_up_proj", "down_proj")
        if model_type in FUSED_IN_MODEL
        else ("gate_proj", "up_proj", "down_proj")
    )
    for owner, parts in ((attn, (*projections, "o_proj")), (mlp, mlp_projections)):
        for part in parts:
            if not isinstance(getattr(owner, part, None), torch.nn.Linear):
                return f"{part} is not a Linear"
    if _act(mlp) is None:
        return "its MLP has no activation module"
    if not isinstance(getattr(attn, "scaling", None), float | int):
        return "its attention has no scaling"
    return None


def _rope_types(rotary: Any) -> dict[str | None, Any]:
    """The rotary module's rope type per table (None: one table)."""
    types = getattr(rotary, "rope_type", None)
    if isinstance(types, dict):
        return dict(types)
    return {None: types}


def takes_layer_type(rotary: Any) -> bool:
    return "layer_type" in inspect.signature(rotary.forward).parameters


def rope_limit(layout: NativeLayout, config: Any) -> int | None:
    """Most slots (positions) the rotary table may cover and still be the model's own: None
    without a limit; for dynamic rotary types the length below which the model keeps its
    original frequencies."""
    limits = []
    for kind, rope_type in _rope_types(layout.rotary).items():
        if "dynamic" in rope_type:
            limits.append(int(layout.rotary.original_max_seq_len) - 1)
        elif rope_type == "longrope":
            params = config.rope_parameters if kind is None else config.rope_parameters[kind]
            limits.append(int(params["original_max_position_embeddings"]))
    return min(limits) if limits else None


def _norm_weight(norm: Any, kind: str) -> torch.Tensor:
    if kind == "one_plus":
        return 1.0 + norm.weight.detach().float()
    return norm.weight.detach()


def _norm_eps(norm: Any) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def _linear(weights: dict[str, torch.Tensor], key: str, linear: torch.nn.Linear) -> None:
    weights[key] = linear.weight.detach() if is_plain(linear.weight) else linear.weight
    if linear.bias is not None:
        weights[f"{key}_bias"] = linear.bias.detach()


def _group(
    weights: dict[str, torch.Tensor],
    owner: Any,
    names: tuple[str, ...],
    keys: tuple[str, ...],
    fused_key: str,
    fused: bool,
) -> None:
    """The group's fused matrix under ``fused_key``, or each member under its own key."""
    group = fused_group(owner, names) if fused else None
    if group is not None:
        weights[fused_key] = group.weight
        if group.bias is not None:
            weights[f"{fused_key}_bias"] = group.bias
        return
    for name, key in zip(names, keys, strict=True):
        _linear(weights, key, getattr(owner, name))


@torch.no_grad()
def read_layout(model: Any) -> NativeLayout:
    """The step's layout of ``model`` (``native_refusal(model)`` must be None)."""
    config = text_config(model.config)
    model_type = config.model_type
    base = model.model
    layers = list(base.layers)
    kind = "one_plus" if model_type in ONE_PLUS_NORM else "scaled"
    notes: list[str] = []
    if model_type not in FUSED_IN_MODEL:
        fuse_projections(model)
    qkv, gate_up = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
    in_model = model_type in FUSED_IN_MODEL
    # one layout for every layer (one compiled graph): fused only where every layer is
    fused_qkv = in_model or all(fused_group(x.self_attn, qkv) for x in layers)
    fused_gate_up = in_model or all(fused_group(x.mlp, gate_up) for x in layers)
    if not (fused_qkv and fused_gate_up):
        notes.append(
            "native decode step: projections quantised one by one are read one by one "
            "(fewer products when quantised fused, as worker.quantize does)"
        )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    weights: list[dict[str, torch.Tensor]] = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        w: dict[str, torch.Tensor] = {}
        w["input_norm"] = _norm_weight(layer.input_layernorm, kind)
        if model_type in SANDWICH:
            w["post_attention_norm"] = _norm_weight(layer.post_attention_layernorm, kind)
            w["mlp_norm"] = _norm_weight(layer.pre_feedforward_layernorm, kind)
            w["post_mlp_norm"] = _norm_weight(layer.post_feedforward_layernorm, kind)
        else:
            w["mlp_norm"] = _norm_weight(layer.post_attention_layernorm, kind)
        if model_type in QK_NORM:  # one weight row per query head, then per key head
            w["qk_norm"] = torch.cat(
                [
                    _norm_weight(attn.q_norm, kind).expand(heads, -1),
                    _norm_weight(attn.k_norm, kind).expand(kv_heads, -1),
                ]
            )
        if in_model:
            _linear(w, "qkv", attn.qkv_proj)
            _linear(w, "gate_up", mlp.gate_up_proj)
        else:
            _group(w, attn, qkv, ("q", "k", "v"), "qkv", fused_qkv)
            _group(w, mlp, gate_up, ("gate", "up"), "gate_up", fused_gate_up)
        _linear(w, "o", attn.o_proj)
        _linear(w, "down", mlp.down_proj)
        weights.append(w)
    attn0 = layers[0].self_attn
    plan = LayerPlan(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=int(attn0.head_dim),
        norm=kind,
        eps=_norm_eps(layers[0].input_layernorm),
        qk_norm=model_type in QK_NORM,
        sandwich=model_type in SANDWICH,
        scaling=float(attn0.scaling),
        fused_qkv=fused_qkv,
        fused_gate_up=fused_gate_up,
        softcap=getattr(config, "attn_logit_softcapping", None) or None,
    )
    layer_types = list(getattr(config, "layer_types", None) or [])
    by_type = takes_layer_type(base.rotary_emb)
    embed = base.embed_tokens
    return NativeLayout(
        plan=plan,
        weights=weights,
        windows=sliding_windows(config),
        rope_kinds=[layer_types[i] if by_type else None for i in range(len(layers))],
        embed=embed,
        final_norm=base.norm,
        lm_head=model.lm_head,
        rotary=base.rotary_emb,
        act=_act(layers[0].mlp),
        dtype=embed.weight.dtype,
        final_softcap=getattr(config, "final_logit_softcapping", None),
        notes=notes,
    )
