"""Engines by name. Imported lazily: ``fast`` pulls in more than ``plain`` needs.

An engine module defines one ``Engine`` subclass whose class attribute ``name`` is its name.

``get_engine("fast")`` falls back to ``plain`` only when ``engines/fast.py`` is missing, and
says so in ``notes``; any other import error in it is a bug and propagates.
"""

from __future__ import annotations

import importlib

from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.spec import ENGINES
from slmtui.worker.engines.base import Engine

_MODULES: dict[str, str] = {
    "plain": "slmtui.worker.engines.plain",
    "fast": "slmtui.worker.engines.fast",
}


def get_engine(name: str, notes: list[str] | None = None) -> type[Engine]:
    """The engine class called ``name``; a fallback to plain is appended to ``notes``."""
    if name not in _MODULES:
        raise UserError(
            f"engine '{name}' is unknown{did_you_mean(name, ENGINES)}; "
            f"allowed: {allowed_list(ENGINES)}"
        )
    module_name = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if name == "plain" or exc.name != module_name:
            raise
        if notes is not None:
            notes.append(f"engine '{name}' is not installed ({module_name}); ran 'plain'")
        return get_engine("plain", notes)
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, Engine)
            and value.__dict__.get("name") == name
        ):
            return value
    raise ImportError(f"{module_name} defines no Engine subclass with name = '{name}'")
