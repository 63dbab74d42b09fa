"""Which models the fast engine runs: the families its contract tests cover, nothing else.

The fast engine replaces transformers' cache and attention calls with its own, so a model whose
layers do something those calls do not (logit soft-capping, a recurrent block, an attention
layout nobody tested) could be measured wrongly without an error. It therefore runs only the
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
    "gemma3_text": "Gemma 3",
    "phi3": "Phi-3 / Phi-3.5",
}
"""``config.model_type`` -> family, for every family with a contract test."""


def fast_refusal(model: Any) -> str | None:
    """Why the fast engine will not run ``model`` (one line), or None when it will."""
    config = text_config(model.config)
    model_type = str(getattr(config, "model_type", None) or "unknown")
    if model_type not in FAST_FAMILIES:
        families = ", ".join(sorted(FAST_FAMILIES))
        return f"architecture '{model_type}' is not one it is verified on ({families})"
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        return f"attention logit soft-capping ({softcap}) is not in its attention kernels"
    return None
