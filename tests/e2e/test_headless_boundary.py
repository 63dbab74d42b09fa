"""`slmtui run --headless`'s own process never imports torch, transformers, accelerate or
llama_cpp: runs happen in worker processes. A static import graph cannot see imports deferred
into functions, so this runs a real headless sweep (one run on the tiny local model) in a fresh
interpreter and reads its ``sys.modules`` when it exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]

HEAVY = ("torch", "transformers", "accelerate", "llama_cpp")
PARENT = """
import atexit, json, sys
def report():
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(m for m in {heavy!r} if m in sys.modules), f)
atexit.register(report)
from slmtui.cli import main
code = main(sys.argv[2:])
report()
sys.exit(code)
"""


def test_the_headless_parent_never_imports_torch(slmtui, tiny_model_dir: Path, tmp_path: Path):
    profile = tmp_path / "p.toml"
    profile.write_text(
        f'name = "boundary"\n[settings]\nengine = "fast"\n'
        f'[[models]]\nname = "tiny"\nsource = "{tiny_model_dir}"\n'
        "[tasks.arc_easy]\nlimit = 2\n",
        encoding="utf-8",
    )
    seen = tmp_path / "modules.json"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PARENT.format(heavy=HEAVY),
            str(seen),
            "run",
            str(profile),
            "--headless",
            "--db",
            str(tmp_path / "s.sqlite"),
        ],
        capture_output=True,
        text=True,
        env=slmtui.env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "arc_easy" in done.stdout  # the run finished and its PER table was printed
    assert json.loads(seen.read_text()) == []
