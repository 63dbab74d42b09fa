"""Weight-only quantisation of a loaded model (torchao), and the bytes its weights take.

``quantize_model`` turns the model's ``nn.Linear`` weights into torchao tensor subclasses in
place (``slmtui.quantization`` names the schemes and checks a setting before any run starts).
The forward is unchanged Python: the fast engine's static cache and CUDA-graph decode step run on
it as on full precision (the quantised matmuls are ordinary kernels, nothing syncs the host).

Left in full precision: the embeddings, norms and a tied output embedding (quantising it would
add a second copy of the matrix, not save one). torchao's int4 tile-packed format pads each
weight's input width to a multiple of 1024 (and the activations with it): a 576-wide model stores
its int4 layers 1.8x larger than their shape, which ``weight_bytes`` counts as stored.
torchao is imported here only, lazily.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from slmtui.quantization import INT4_GROUP_SIZE, scheme, torchao_version


class QuantizeError(Exception):
    """The model could not be quantised as asked (one line for the user)."""


def tensor_bytes(tensor: torch.Tensor, seen: set[int] | None = None) -> int:
    """Bytes ``tensor`` holds: a torchao subclass counts its inner tensors (int data, scales,
    zero points), not the full-precision size it presents. ``seen`` (data pointers) counts a
    shared tensor once."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(tensor_bytes(getattr(tensor, name), seen) for name in names)
    if seen is not None:
        pointer = tensor.data_ptr()
        if pointer in seen:
            return 0
        seen.add(pointer)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters as stored (tied matrices once, quantised at their size)."""
    seen: set[int] = set()
    return sum(tensor_bytes(p.data if hasattr(p, "data") else p, seen) for p in model.parameters())


def _config(quantize: str) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quantize == "int8":
        return Int8WeightOnlyConfig()
    if quantize == "int4":
        return Int4WeightOnlyConfig(
            group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d"
        )
    raise QuantizeError(f"quantize '{quantize}': allowed none, int8, int4")


def quantize_model(model: Any, quantize: str) -> dict[str, Any]:
    """Quantise ``model``'s linear layers in place; the metrics that record it.

    Returns ``quantize``, ``quantize_scheme``, ``quantize_s`` (seconds, part of the load),
    ``quantized_layers`` and ``weight_bytes`` (after). "none" only measures ``weight_bytes``.
    QuantizeError when torchao is missing or refuses this model on this device.
    """
    if quantize == "none":
        return {"quantize": "none", "quantize_scheme": None, "weight_bytes": weight_bytes(model)}
    started = time.perf_counter()
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise QuantizeError(f"quantize '{quantize}' needs torchao: {exc}") from None
    embedding = model.get_input_embeddings()
    tied = embedding.weight if embedding is not None else None

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not (
            tied is not None and module.weight is tied
        )

    chosen = [name for name, module in model.named_modules() if wanted(module, name)]
    if not chosen:
        raise QuantizeError(f"quantize '{quantize}': the model has no linear layer to quantise")
    try:
        quantize_(model, _config(quantize), filter_fn=wanted)
    except torch.OutOfMemoryError:
        raise  # the run's own failure class ("oom"), not a refusal
    except (RuntimeError, AssertionError, ValueError, ImportError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        device = next(model.parameters()).device
        raise QuantizeError(
            f"quantize '{quantize}' failed on {device.type} ({type(exc).__name__}: {first})"
        ) from exc
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the full-precision weights just replaced
    metrics: dict[str, Any] = {
        "quantize": quantize,
        "quantize_scheme": scheme(quantize),
        "quantize_s": time.perf_counter() - started,
        "quantized_layers": len(chosen),
        "torchao_version": torchao_version(),
        "weight_bytes": weight_bytes(model),
    }
    return metrics
