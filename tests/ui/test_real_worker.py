"""The console driving the real scheduler and worker on a tiny random Llama (local checkpoint).

select -> launch -> live updates -> ranked table sorted -> inspect -> export. The model is built
in a subprocess with the worker tests' builder, so this process never imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable
from ui_fixtures import notices_of

from slmtui.profile import parse_profile
from slmtui.scheduler import Scheduler
from slmtui.store import Store
from slmtui.ui.app import SlmApp
from slmtui.ui.screens.inspect import InspectScreen
from slmtui.ui.widgets.rank_view import RankView

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILD = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("worker_conftest", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["worker_conftest"] = mod
spec.loader.exec_module(mod)
path = Path(sys.argv[2])
mod.build_tokenizer(path)
mod.build_model(path, vocab_size=len(mod.SPECIALS) + 96)
"""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    conftest = REPO / "tests" / "worker" / "conftest.py"
    subprocess.run([sys.executable, "-c", BUILD, str(conftest), str(path)], check=True)
    return path


def arc_docs(path: Path, n: int) -> Path:
    docs = [
        {
            "id": f"arc-{i}",
            "question": f"Which planet is number {i} from the sun?",
            "choices": {"text": ["Mars", "Venus", "Earth", "Saturn"], "label": list("ABCD")},
            "answerKey": "B",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


async def test_pick_launch_watch_rank_inspect_export(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "SLMTUI_CACHE_DIR": str(tmp_path / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    torch_before = "torch" in sys.modules  # earlier tests in this process may have loaded it
    data = arc_docs(tmp_path / "arc.jsonl", 4)
    profile = parse_profile(
        f"""
name = "tiny"
[settings]
engine = "plain"
batch_size = 2
dtype = "float32"
[[models]]
name = "tiny-a"
source = "{tiny_model_dir}"
[[models]]
name = "tiny-b"
source = "{tiny_model_dir}"
batch_size = 1
[tasks.arc_easy]
limit = 3
mode = "loglikelihood"
data_file = "{data}"
""",
        label="tiny.toml",
        default_name="tiny",
    )
    store = Store(tmp_path / "results.sqlite")
    scheduler = Scheduler(store, inventory=[], logs_dir=tmp_path / "logs", handle_signals=False)
    app = SlmApp(
        store=store,
        scheduler=scheduler,
        profile=profile,
        export_dir=tmp_path,
        progress_interval_s=0.2,
    )
    handled: list[str] = []
    try:
        async with app.run_test(
            size=(120, 40), message_hook=lambda m: handled.append(type(m).__name__)
        ) as pilot:
            await pilot.press("down", "space", "R")  # tiny-b dropped: one run (CPU: one at a time)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                await pilot.pause(0.2)
                if all(r.ended for r in app.live_runs()):
                    break
            runs = app.live_runs()
            assert [r.status for r in runs] == ["finished"], [r.reason for r in runs]
            assert handled.count("ProgressSnapshot") >= 1  # live progress reached the panels
            assert runs[0].done == 3 and runs[0].spec.model.name == "tiny-a"
            rank = app.query_one(RankView)
            assert [r.model for r in rank.per_rows] == ["tiny-a"]
            await pilot.press("3", "v")
            table = app.query_one("#rank-table", DataTable)
            table.move_cursor(column=[c.key for c in rank.columns].index("throughput"))
            await pilot.press("s")  # highest throughput first
            assert rank.sort_by[rank.view] == ("throughput", True)
            thr = float(str(next(table.get_column("throughput"))).replace(",", ""))
            assert thr == pytest.approx(rank.per_rows[0].input.throughput, rel=0.01)
            await pilot.press("i")
            assert isinstance(app.screen, InspectScreen)
            assert len(app.screen.samples) == 3
            assert {s.gold for s in app.screen.samples} == {"B"}
            await pilot.press("escape", "e")
            app.screen.query_one("#answer").value = str(tmp_path / "tiny.csv")  # type: ignore[attr-defined]
            await pilot.press("enter")
            assert "1 row written" in notices_of(app)[-1]
    finally:
        scheduler.shutdown()
        store.close()
    assert "tiny-a" in (tmp_path / "tiny.csv").read_text()
    # the console's process did not load torch (tests/test_ui_boundary.py checks a fresh one)
    assert torch_before or "torch" not in sys.modules
