"""Which models the fast engine runs: the families its contract tests cover, nothing else.

The fast engine replaces transformers' cache and attention calls with its own, so a model whose
layers do something those calls do not (a recurrent block, an attention layout nobody tested)
could be measured wrongly without an error. (Attention logit soft-capping, Gemma 2's, is one of
its calls: ``attention.softcapped_attention``.) It therefore runs only the
architectures that ``tests/worker/test_fast_contract.py`` checks against ``plain`` (greedy tokens
and log-likelihood choices identical in fp32 on the CPU); every other model runs ``plain``, and
the run says why (``slmtui.worker.engines.start_engine``).
"""

from __future__ import annotations

from typing import Any

from slmtui.worker.engines.base import text_config

FAST_FAMILIES: dict[str, str] = {
    "llama": "Llama (SmolLM2, Llama 2/3, Vicuna)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "phi3": "Phi-3 / Phi-3.5",
}
"""``config.model_type`` -> family, for every family with a contract test."""


NATIVE_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
    "phi3": "Phi3",
}
"""``config.model_type`` -> the class-name prefix of its transformers modules, for every family
the fast engine's native decode step implements (``fast/native``; its tests check each one
against transformers' forward)."""

WINDOW_BY_LAYER_TYPE = frozenset({"qwen2", "qwen3", "gemma2", "gemma3_text"})
"""Families whose model builds a sliding-window mask for the layers ``config.layer_types``
marks ``sliding_attention`` (and a full causal mask for the others)."""
WINDOW_ON_EVERY_LAYER = frozenset({"mistral", "phi3"})
"""Families whose model slides every layer's mask when ``config.sliding_window`` is set."""


def sliding_windows(config: Any) -> list[int | None]:
    """Each decoder layer's sliding window (tokens; None: full causal attention), as the family's
    model builds its masks (Llama never slides)."""
    config = text_config(config)
    layers = int(config.num_hidden_layers)
    model_type = getattr(config, "model_type", None)
    window = getattr(config, "sliding_window", None)
    if model_type in WINDOW_BY_LAYER_TYPE:
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
        return [int(window) if t == "sliding_attention" and window else None for t in types]
    if model_type in WINDOW_ON_EVERY_LAYER and window:
        return [int(window)] * layers
    return [None] * layers


def fast_refusal(model: Any) -> str | None:
    """Why the fast engine will not run ``model`` (one line), or None when it will."""
    config = text_config(model.config)
    model_type = str(getattr(config, "model_type", None) or "unknown")
    if model_type not in FAST_FAMILIES:
        families = ", ".join(sorted(FAST_FAMILIES))
        return f"architecture '{model_type}' is not one it is verified on ({families})"
    return None
