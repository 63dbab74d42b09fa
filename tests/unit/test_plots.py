"""Plots: the 2-D Pareto front, terminal and SVG drawings, and `report --plot` files."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_reports import fill, finish, report

from slmtui.per import PerInput, compute_per
from slmtui.reports import plots
from slmtui.store import Store


def test_front_2d_marks_points_nothing_beats_on_both_axes():
    # (thr, acc): A (150, .8), B (250, .6), C (50, .5): C is beaten by A on both -> off the front
    assert plots.front_2d([150, 250, 50], [0.8, 0.6, 0.5], x_higher=True) == [True, True, False]
    # energy per correct answer, lower is better: 300 J / .25 is beaten by 250 J / .5
    assert plots.front_2d([300, 250, 500], [0.25, 0.5, 0.75], x_higher=False) == [
        False,
        True,
        True,
    ]


ROWS = compute_per(
    [
        PerInput(
            "A",
            "gsm8k",
            0.80,
            150,
            8,
            1200,
            throughput_unit="tokens/s",
            extra={"energy_per_correct_j": 300.0},
        ),
        PerInput(
            "B",
            "gsm8k",
            0.60,
            250,
            4,
            800,
            throughput_unit="tokens/s",
            extra={"energy_per_correct_j": 250.0},
        ),
        PerInput("C", "gsm8k", 0.50, 50, 12, 2000, throughput_unit="tokens/s"),
    ]
)


def test_task_charts_plot_throughput_and_energy_where_measured():
    throughput, energy = plots.task_charts("gsm8k", ROWS)
    assert throughput.x_label == "throughput per GPU (tokens/s)"
    assert {p.label: p.front for p in throughput.points} == {"A": True, "B": True, "C": False}
    assert [p.label for p in energy.points] == ["B", "A"]  # C has no energy: left out, said so
    assert energy.notes == ("1 model without measured energy left out",)
    assert not energy.x_higher_is_better


def test_terminal_chart_fits_its_box_and_names_every_point():
    chart = plots.task_charts("gsm8k", ROWS)[0]
    for width, height in ((60, 18), (150, 44)):
        text = plots.chart_text(chart, width, height)
        lines = text.plain.splitlines()
        assert len(lines) <= height and max(map(len, lines)) <= width
        # letters in row order (B ranks first): A is model B, B model A, C model C
        assert "A ◆ B  acc 0.600" in text.plain and "C   C  acc 0.500" in text.plain
        assert any(0x2800 < ord(ch) <= 0x28FF for ch in text.plain)  # the front, in braille


def test_overview_bars_follow_the_score_in_use():
    chart = plots.overview_chart(ROWS, by="per_rel")
    assert chart.title == "Mean PER-rel per model across tasks"
    assert [name for name, _ in chart.bars] == ["B", "A", "C"]
    text = plots.chart_text(chart, 60, 10).plain
    assert "█" in text and "0.931" in text


def test_svg_is_well_formed_and_marks_the_front():
    svg = plots.chart_svg(plots.task_charts("gsm8k", ROWS)[0])
    root = ET.fromstring(svg)
    circles = root.findall(".//{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 3
    assert root.findall(".//{http://www.w3.org/2000/svg}polyline")  # the front line
    ET.fromstring(plots.charts_svg(plots.all_charts(ROWS)))


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "results.sqlite") as s:
        yield s


def test_report_plot_writes_a_folder_of_svgs(tmp_path: Path, store: Store, capsys, monkeypatch):
    monkeypatch.setattr(plots, "png_available", lambda: False)
    fill(store)
    code, _, err = report(capsys, store.path, "--plot", str(tmp_path / "plots"))
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["gsm8k-throughput.svg", "imdb-throughput.svg", "overview.svg"]
    assert "PNG plots need matplotlib" in err


def test_report_plot_to_one_svg_file(tmp_path: Path, store: Store, capsys):
    finish(store, "a", "A", "gsm8k", metrics={"energy_j": 10.0, "energy_per_correct_j": 4.0})
    finish(
        store,
        "b",
        "B",
        "gsm8k",
        accuracy=0.7,
        metrics={"energy_j": 9.0, "energy_per_correct_j": 3.0},
    )
    target = tmp_path / "all.svg"
    code, _, _ = report(capsys, store.path, "--plot", str(target))
    assert code == 0
    titles = [t.text for t in ET.parse(target).getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert "gsm8k: accuracy against energy per correct answer" in titles


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("nowhere/x.svg", "folder"),
        ("plot.pdf", "not '.pdf'"),
    ],
)
def test_bad_plot_target_is_one_line_and_writes_nothing(
    tmp_path: Path, store: Store, capsys, target: str, expected: str
):
    fill(store)
    code, out, err = report(capsys, store.path, "--plot", str(tmp_path / target))
    assert code == 2 and err.count("\n") == 1 and expected in err and out == ""


def test_png_without_matplotlib_is_a_clear_error(tmp_path: Path, store: Store, capsys, monkeypatch):
    monkeypatch.setattr(plots, "png_available", lambda: False)
    fill(store)
    code, _, err = report(capsys, store.path, "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "PNG needs matplotlib (pip install matplotlib)" in err


def test_png_files_when_matplotlib_is_installed(tmp_path: Path):
    pytest.importorskip("matplotlib")
    written = plots.write_plots(ROWS, str(tmp_path / "out"))
    pngs = [p for p in written if p.suffix == ".png"]
    assert {p.name for p in pngs} == {"overview.png", "gsm8k-throughput.png", "gsm8k-energy.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    one = plots.write_plots(ROWS, str(tmp_path / "all.png"))
    assert one[0].read_bytes().startswith(b"\x89PNG")
