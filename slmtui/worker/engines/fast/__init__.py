"""The fast engine, one module per seam:

``attention``   SDPA variants registered with transformers (prefill, decode, backend checks)
``slot_cache``  the preallocated KV cache, one slot row per sequence, per-row write positions
``graphs``      decode steps captured in CUDA graphs per batch-size bucket
``batching``    the continuous-batching loop (admit, chunked prefill, decode, refill)
``loglik``      packed shared-context log-likelihood, gathered on the device
``engine``      ``FastEngine``, which ties them together
"""

from slmtui.worker.engines.fast.attention import DECODE_ATTENTIONS, decode_backend
from slmtui.worker.engines.fast.engine import (
    CHECK_EVERY_TOKENS,
    FastEngine,
    WarmupReport,
    cache_argument,
)
from slmtui.worker.engines.fast.slot_cache import SlotCache

__all__ = [
    "CHECK_EVERY_TOKENS",
    "DECODE_ATTENTIONS",
    "FastEngine",
    "SlotCache",
    "WarmupReport",
    "cache_argument",
    "decode_backend",
]
