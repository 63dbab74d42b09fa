"""The native decode step: the fast engine's decode step without transformers' forward.

``layout``  what the step reads from a loaded model, per family (fused QKV and gate/up, norms,
            the model's own embedding, final norm, head and rotary modules), and what it refuses
``layer``   one decoder layer for one token per row, one function for every family (compiled
            once, replayed by every layer)
``step``    ``NativeDecoder``: masks, rotary rows, the layers, the head, over the slot cache

Prefill and log-likelihood stay on transformers' forward; only the decode step is native.
"""

from slmtui.worker.engines.fast.native.layout import native_refusal
from slmtui.worker.engines.fast.native.step import NativeDecoder

__all__ = ["NativeDecoder", "native_refusal"]
