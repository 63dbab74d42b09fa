"""The command line's --data-dir, --timeout and --rerun on the console path."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmtui.cli import main
from slmtui.profile import embedded_default
from slmtui.ui.selection import Selection


def test_data_dir_and_timeout_reach_every_run_of_the_selection(tmp_path: Path) -> None:
    selection = Selection.from_profile(embedded_default(), data_dir=str(tmp_path), timeout_s=90.0)
    specs = selection.specs(limit=2)
    assert specs and all(s.data_dir == str(tmp_path.resolve()) for s in specs)
    assert all(s.timeout_s == 90.0 and s.options.limit == 2 for s in specs)
    # the data folder is part of what a run is: the same run on other data has another key
    plain = Selection.from_profile(embedded_default()).specs(limit=2)
    assert {s.run_key for s in specs}.isdisjoint({s.run_key for s in plain})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--rerun"], "--rerun: applies to --headless"),
        (["run", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir: no such directory"),
        (["run", "--timeout", "0"], "--timeout 0: must be a number of seconds > 0"),
    ],
)
def test_console_options_that_cannot_apply_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "results.sqlite"
    assert main(["--db", str(db), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not db.exists()  # nothing written
