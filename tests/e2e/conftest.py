"""Fixtures for end-to-end tests: a tiny random Llama saved as a local checkpoint (the same one
tests/worker uses), and a helper that runs the real `slmtui` command offline."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _worker_fixtures() -> ModuleType:
    """tests/worker/conftest.py as a module (its builders), without registering its fixtures."""
    path = REPO / "tests" / "worker" / "conftest.py"
    spec = importlib.util.spec_from_file_location("slmtui_worker_test_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 32) with a one-character-per-token tokenizer."""
    fixtures = _worker_fixtures()
    path = tmp_path_factory.mktemp("tiny-llama")
    fixtures.build_tokenizer(path)
    fixtures.build_model(path, vocab_size=len(fixtures.SPECIALS) + 96)
    return path


class Slmtui:
    """Runs the real `slmtui` command offline, its logs under ``tmp_path``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.env = dict(os.environ)
        self.env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            SLMTUI_DATA_DIR=str(tmp_path / "slmtui-data"),
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",  # tiny models: more threads only contend on a busy CI box
            COLUMNS="200",
        )
        self.env.pop("CUDA_VISIBLE_DEVICES", None)

    @staticmethod
    def argv(*args: str) -> list[str]:
        return [sys.executable, "-m", "slmtui", *args]

    def run(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `slmtui ARGS` to the end; stdout and stderr captured as text."""
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            timeout=timeout_s,
        )

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """`slmtui ARGS` in the background, output to ``app.out`` / ``app.err`` (no pipes to
        fill while nobody reads them)."""
        with (
            (self.tmp_path / "app.out").open("ab") as out,
            (self.tmp_path / "app.err").open("ab") as err,
        ):
            return subprocess.Popen(
                self.argv(*args), stdout=out, stderr=err, env=self.env, cwd=REPO
            )


@pytest.fixture
def slmtui(tmp_path: Path) -> Slmtui:
    return Slmtui(tmp_path)
