"""The console's process never loads torch, transformers or accelerate (fast start, no CUDA
context in the UI). A static import graph cannot see imports deferred into functions, so this
opens the real app, headless, in a fresh interpreter and reads its ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_console_process_never_imports_torch(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "cold_start.py"),
            "--child",
            "--db",
            str(tmp_path / "store.sqlite"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heavy_modules"] == []
    assert result["first_paint_s"] > 0


def test_cli_and_ui_package_import_no_textual() -> None:
    code = (
        "import sys, slmtui.cli, slmtui.ui; "
        "print(sorted(m for m in ('textual', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
