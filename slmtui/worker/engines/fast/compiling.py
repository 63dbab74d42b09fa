"""Where ``torch.compile`` keeps what it compiled, and the settings that choose a decode step.

Inductor's caches (FX graphs, AOTAutograd, autotuning, and Triton's kernels beneath them) go
under slmtui's cache directory (``paths.cache_dir() / "compile"``) unless the user set
``TORCHINDUCTOR_CACHE_DIR``, so a second run of the same model and shapes loads its compiled
kernels instead of compiling them again (the warm-up target: 20 s cold, 5 s warm).

Two environment variables set a fast engine's defaults where a caller passes none (the bench
scripts and ``bench/tasks.py`` use them to compare steps through the worker's own path; a run
records what ran in its ``decode_step`` metric):

``SLMTUI_DECODE_STEP``   auto (native where the model is supported), native, transformers
``SLMTUI_COMPILE_STEP``  auto, on, off
"""

from __future__ import annotations

import os
from pathlib import Path

from slmtui.paths import cache_dir

DECODE_STEPS = ("auto", "native", "transformers")
COMPILE_SETTINGS = ("auto", "on", "off")


def compile_cache_dir() -> Path:
    return cache_dir() / "compile"


def use_compile_cache() -> Path:
    """Point inductor at slmtui's compile cache, unless the user chose a directory; the
    directory in use. Call before the first compile.

    Inductor writes ``TORCHINDUCTOR_CACHE_DIR`` itself (its temporary-directory default) the
    first time anything asks for its cache, so a value equal to that default counts as unset.
    Triton's kernels go under the same directory unless ``TRITON_CACHE_DIR`` is set.
    """
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default: str | None = default_cache_dir()
    except (ImportError, AttributeError):  # another torch: only an unset variable is ours
        torch_default = None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir() / "inductor")
    chosen = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def decode_step_setting(value: str | None) -> str:
    """``value``, else ``SLMTUI_DECODE_STEP``, else auto; ValueError naming the allowed."""
    chosen = (value or os.environ.get("SLMTUI_DECODE_STEP") or "auto").strip().lower()
    if chosen not in DECODE_STEPS:
        raise ValueError(f"decode_step {chosen!r}: one of {', '.join(DECODE_STEPS)}")
    return chosen


def compile_setting(value: bool | str | None) -> bool | None:
    """True / False, or None for auto: ``value``, else ``SLMTUI_COMPILE_STEP``, else auto."""
    if isinstance(value, bool):
        return value
    chosen = (value or os.environ.get("SLMTUI_COMPILE_STEP") or "auto").strip().lower()
    if chosen not in COMPILE_SETTINGS:
        raise ValueError(f"compile_step {chosen!r}: one of {', '.join(COMPILE_SETTINGS)}")
    return None if chosen == "auto" else chosen == "on"
