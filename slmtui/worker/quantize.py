"""Weight-only quantisation of a loaded model (torchao; int8 through gemlite's kernels on a GPU
where installed: ``choose_kernels``), and the bytes its weights take.

``quantize_model`` turns the model's ``nn.Linear`` weights into torchao tensor subclasses in
place (``slmtui.quantization`` names the schemes and checks a setting before any run starts).
The forward is unchanged Python: the fast engine's static cache and CUDA-graph decode step run on
it as on full precision (the quantised matmuls are ordinary kernels, nothing syncs the host).

Left in full precision: the embeddings, norms and a tied output embedding (quantising it would
add a second copy of the matrix, not save one). int4 groups 128 input features per scale; a layer
whose input width is not a multiple of 128 (SmolLM2-135M's 576) takes group 64 or
32 instead (torchao would otherwise skip it silently), and the scheme says so. int4 is packed for
tinygemm in 128-column tiles (``worker.int4_tiles``: a 576-wide layer is stored 640 wide, which
``weight_bytes`` counts), where torchao's own tile-packed tensor pads to 1,024 columns
(``SLMTUI_INT4_PACKING=torchao`` keeps that, for comparison).
Layers are counted after quantising: what torchao left in full precision is listed, never
claimed. torchao is imported lazily, here and in ``worker.gemlite_weights``.

For the families the fast engine's native decode step runs (``engines.support.NATIVE_FAMILIES``)
each layer's query/key/value projections, and its gate/up projections, are fused in full
precision first and quantised as one matrix (``worker.fusion.quantize_fused``): every output row
is scaled on its own in both schemes, so the model's own layers, which get row slices of that
matrix, compute what they would have separately, and the native step reads each group with one
quantised product instead of three or two. With gemlite's kernels every projection is its own
matrix (``fusion.unfuse_projections`` first): gemlite 0.5 does not compute a strided row slice.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slmtui.paths import cache_dir
from slmtui.quantization import (
    INT4_GROUP_SIZE,
    gemlite_version,
    kernels_setting,
    scheme,
    torchao_version,
)
from slmtui.worker.fusion import fused_tensors, quantize_fused, unfuse_projections


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


GEMLITE_SETTINGS = ("int8",)
"""Settings ``auto`` gives gemlite's kernels (``SLMTUI_QUANT_KERNELS=gemlite`` runs int4 there
too). Measured on the H200 (Qwen2.5-7B, batch 1, triton 3.6, docs/benchmarks.md): gemlite's
int8 ran 1.27-1.35x bf16 where torchao's ran 0.86x; gemlite's int4 (built for bfloat16) ran
1.09x where torchao's tinygemm ran 1.28-1.30x, so int4 stays on tinygemm."""


def choose_kernels(model: Any, quantize: str = "int8", requested: str | None = None) -> str:
    """ "gemlite" or "torchao": the kernel library ``quantize_model`` uses for ``model``.

    auto (``SLMTUI_QUANT_KERNELS`` unset) takes gemlite for the settings in
    ``GEMLITE_SETTINGS`` when the model sits on a GPU in bfloat16 or float16 and gemlite
    imports; asking for gemlite where it cannot run is a QuantizeError (one line)."""
    wanted = kernels_setting(requested)
    if wanted == "torchao" or (wanted == "auto" and quantize not in GEMLITE_SETTINGS):
        return "torchao"
    first = next(model.parameters())
    why = None
    if quantize not in ("int8", "int4"):
        why = f"quantize '{quantize}': gemlite runs int8 and int4"
    elif first.device.type != "cuda":
        why = "gemlite's kernels run on a GPU only"
    elif first.dtype not in (torch.bfloat16, torch.float16):
        why = f"gemlite takes bfloat16 or float16 weights, not {str(first.dtype).split('.')[-1]}"
    elif gemlite_version() is None:
        why = "gemlite is not installed (pip install 'slmtui[gemlite]')"
    else:
        try:
            import gemlite  # noqa: F401  (needs a GPU and triton at import)
        except Exception as exc:  # a broken install: auto takes torchao's kernels
            why = f"gemlite does not import ({type(exc).__name__}: {str(exc)[:80]})"
    if why is None:
        return "gemlite"
    if wanted == "gemlite":
        raise QuantizeError(f"SLMTUI_QUANT_KERNELS=gemlite: {why}")
    return "torchao"


def gemlite_tuning_file() -> Path:
    """Where gemlite's autotuned kernel choices for this GPU are kept between runs."""
    name = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    return cache_dir() / "gemlite" / f"{name}-gemlite-{gemlite_version()}.json"


def _gemlite_tuned_configs() -> None:
    """Give gemlite tuned kernel configs for this GPU before its first matmul: what earlier runs
    here autotuned (``save_kernel_tuning``), and the configs gemlite ships: it loads the file
    named after the device (h100.json ...) itself; a Hopper it has none for (the H200) gets the
    H100's, the same SM 9.0 chip. A shape found in neither autotunes at its first call (tens of
    seconds per model: the first gemlite run of a model has a long warm-up)."""
    import gemlite

    name = torch.cuda.get_device_name().lower().replace(" ", "_")
    shipped = Path(gemlite.__file__).parent / "configs"
    has_own = any(tag.stem in name for tag in shipped.glob("*.json"))
    hopper = torch.cuda.get_device_capability() == (9, 0)
    if not has_own and hopper and (shipped / "h100.json").exists():
        gemlite.load_config(str(shipped / "h100.json"), print_error=False)
    tuned = gemlite_tuning_file()
    if tuned.exists():
        gemlite.load_config(str(tuned), print_error=False)


def save_kernel_tuning() -> None:
    """Keep what gemlite autotuned in this process for the next run (after a warm-up; a no-op
    when gemlite never loaded). Never fails a run: the file is a cache."""
    gemlite = sys.modules.get("gemlite")
    if gemlite is None:
        return
    try:
        target = gemlite_tuning_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        gemlite.cache_config(str(target))
    except Exception:  # a cache that could not be written costs only time
        return


def _quantizer(quantize: str, kernels: str) -> Any:
    """A function that quantises one ``nn.Linear`` in place (ValueError: no group size fits)."""
    if quantize not in ("int8", "int4"):
        raise QuantizeError(f"quantize '{quantize}': allowed none, int8, int4")

    def group_of(linear: torch.nn.Linear) -> int | None:
        if quantize == "int8":
            return None
        group = int4_group(linear.in_features)
        if group is None:
            raise ValueError(f"no int4 group size divides {linear.in_features}")
        return group

    if kernels == "gemlite":
        from slmtui.worker.gemlite_weights import quantize_linear

        bits = 8 if quantize == "int8" else 4
        return lambda linear: quantize_linear(linear, bits, group_of(linear))
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    tight = quantize == "int4" and int4_packing() == "tight"

    def torchao_one(linear: torch.nn.Linear) -> None:
        group = group_of(linear)
        if group is not None and tight:
            from slmtui.worker.int4_tiles import TightInt4Tensor

            packed = TightInt4Tensor.from_weight(linear.weight.detach(), group)
            linear.weight = torch.nn.Parameter(packed, requires_grad=False)
            return
        config = (
            Int8WeightOnlyConfig()
            if group is None
            else Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
        )
        quantize_(linear, config)

    return torchao_one


def int4_packing() -> str:
    """``SLMTUI_INT4_PACKING``: ``tight`` (default: ``worker.int4_tiles``, 128-column tiles)
    or ``torchao`` (torchao's tensor, input widths padded to 1,024); ValueError otherwise."""
    value = os.environ.get("SLMTUI_INT4_PACKING", "tight").strip().lower() or "tight"
    if value not in ("tight", "torchao"):
        raise ValueError(f"SLMTUI_INT4_PACKING={value!r}: one of tight, torchao")
    return value


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
        import torchao  # noqa: F401
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
    kernels = choose_kernels(model, quantize)
    if kernels == "gemlite":
        _gemlite_tuned_configs()
    fused, unfused = 0, []
    try:
        quantize_one = _quantizer(quantize, kernels)
        if kernels == "gemlite":
            # gemlite 0.5's kernels do not compute a row slice of a packed matrix in place
            # (measured: every group failed the check), so each projection is its own matrix
            unfuse_projections(model)
        elif fuses_projections(model):
            fused, unfused = quantize_fused(model, quantize_one)
        modules = dict(model.named_modules())
        for name in chosen:
            module = modules[name]
            fits = quantize == "int8" or int4_group(module.in_features) is not None
            if fits and wanted(module, name) and not _is_quantized(module):
                quantize_one(module)  # a width no group divides stays listed as skipped
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
    described = scheme(quantize, kernels) or quantize
    if quantize == "int4" and kernels == "torchao":
        described += (
            ", 128-column tiles" if int4_packing() == "tight" else ", widths padded to 1,024"
        )
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
        "quantize_kernels": kernels if kernels == "torchao" else f"gemlite {gemlite_version()}",
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
