"""Weight-only quantisation of a loaded model (torchao), and the bytes its weights take.

``quantize_model`` turns the model's ``nn.Linear`` weights into torchao tensor subclasses in
place (``slmtui.quantization`` names the schemes and checks a setting before any run starts).
The forward is unchanged Python: the fast engine's static cache and CUDA-graph decode step run on
it as on full precision (the quantised matmuls are ordinary kernels, nothing syncs the host).

Left in full precision: the embeddings, norms and a tied output embedding (quantising it would
add a second copy of the matrix, not save one). int4 groups 128 input features per scale; a layer
whose input width is not a multiple of 128 (SmolLM2-135M's 576) takes group 64 or
32 instead (torchao would otherwise skip it silently), and the scheme says so. torchao's int4
tile-packed format pads each weight's input width to a multiple of 1024 (and the activations with
it): a 576-wide layer is stored 1.8x larger than its shape, which ``weight_bytes`` counts.
Layers are counted after quantising: what torchao left in full precision is listed, never
claimed. torchao is imported here only, lazily.

For the families the fast engine's native decode step runs (``engines.support.NATIVE_FAMILIES``)
each layer's query/key/value projections, and its gate/up projections, are fused in full
precision first and quantised as one matrix (``worker.fusion.quantize_fused``): every output row
is scaled on its own in both schemes, so the model's own layers, which get row slices of that
matrix, compute what they would have separately, and the native step reads each group with one
quantised product instead of three or two.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from slmtui.quantization import INT4_GROUP_SIZE, scheme, torchao_version
from slmtui.worker.fusion import fused_tensors, quantize_fused


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
    """Bytes of the model's parameters as stored (tied matrices once, quantised at their size),
    and of its fused groups' matrices where they hold more than the parameters' views of them
    (int4's per-group scales, copied for each member's slice: ``fusion.share_rows``)."""
    seen: set[int] = set()
    tensors = [p.data if hasattr(p, "data") else p for p in model.parameters()]
    return sum(tensor_bytes(t, seen) for t in [*tensors, *fused_tensors(model)])


INT4_GROUPS = (INT4_GROUP_SIZE, 64, 32)
"""Group sizes int4 tries, largest first, for a layer's input width (tinygemm takes these)."""


def int4_group(in_features: int) -> int | None:
    """The group size an int4 layer of this input width gets (None: no group divides it)."""
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def _configs(quantize: str) -> dict[int | None, Any]:
    """The torchao config per int4 group size (``None``: int8, one config for every layer)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quantize == "int8":
        return {None: Int8WeightOnlyConfig()}
    if quantize == "int4":
        return {
            g: Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d")
            for g in INT4_GROUPS
        }
    raise QuantizeError(f"quantize '{quantize}': allowed none, int8, int4")


def _is_quantized(module: torch.nn.Module) -> bool:
    return type(module.weight) not in (torch.Tensor, torch.nn.Parameter)


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

    chosen = {name: module for name, module in model.named_modules() if wanted(module, name)}
    if not chosen:
        raise QuantizeError(f"quantize '{quantize}': the model has no linear layer to quantise")
    configs = _configs(quantize)
    fused, unfused = 0, []
    try:
        if fuses_projections(model):

            def quantize_one(linear: torch.nn.Linear) -> None:
                group = None if quantize == "int8" else int4_group(linear.in_features)
                if group not in configs:
                    raise ValueError(f"no int4 group size divides {linear.in_features}")
                quantize_(linear, configs[group])

            fused, unfused = quantize_fused(model, quantize_one)
        for group, config in configs.items():

            def in_group(module: torch.nn.Module, name: str, group: int | None = group) -> bool:
                return (
                    wanted(module, name)
                    and not _is_quantized(module)
                    and (group is None or int4_group(module.in_features) == group)
                )

            if any(in_group(m, n) for n, m in chosen.items()):
                quantize_(model, config, filter_fn=in_group)
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
    modules = dict(model.named_modules())  # quantize_ may have replaced modules
    done = [name for name in chosen if _is_quantized(modules[name])]
    left = sorted(set(chosen) - set(done))
    if not done:
        raise QuantizeError(
            f"quantize '{quantize}': torchao quantised no layer of this model "
            f"(e.g. {left[0]}: {tuple(chosen[left[0]].weight.shape)})"
        )
    described = scheme(quantize) or quantize
    if quantize == "int4":
        smaller = sorted(
            {g for n in done if (g := int4_group(modules[n].in_features)) != INT4_GROUP_SIZE},
            reverse=True,
        )
        if smaller:
            described += f" (group {', '.join(map(str, smaller))} where widths need it)"
    metrics: dict[str, Any] = {
        "quantize": quantize,
        "quantize_scheme": described,
        "quantize_s": time.perf_counter() - started,
        "quantized_layers": len(done),
        "torchao_version": torchao_version(),
        "weight_bytes": weight_bytes(model),
    }
    if left:
        metrics["quantize_skipped"] = left
    if fused or unfused:
        metrics["quantize_fused_groups"] = fused
    if unfused:
        metrics["quantize_unfused"] = unfused
    return metrics


def fuses_projections(model: Any) -> bool:
    """Quantise QKV and gate/up as one matrix each: a family the native decode step runs."""
    from slmtui.worker.engines.base import text_config
    from slmtui.worker.engines.support import NATIVE_FAMILIES

    return getattr(text_config(model.config), "model_type", None) in NATIVE_FAMILIES
