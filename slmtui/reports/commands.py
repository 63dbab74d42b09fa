"""`slmtui per FILE.csv` and `slmtui report`: PER over a CSV or over the results store.

Both print through the same pure ``compute_per`` the console uses, so the numbers agree.
Bad input is a one-line UserError (the CLI exits 2 and prints nothing else).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmtui.carbon import Grid, carbon_of, parse_grid
from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.metrics import RunMetrics
from slmtui.per import (
    FACTORS,
    SCORE_LABELS,
    PerInput,
    PerRow,
    automatic_rank_by,
    automatic_rank_reason,
    compute_per,
)
from slmtui.reports.columns import METRIC_COLUMNS

if TYPE_CHECKING:
    from slmtui.store import ResultRow

REQUIRED_COLUMNS: tuple[str, ...] = (
    "model",
    "task",
    "accuracy",
    "throughput",
    "latency_ms",
    "memory_mb",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("energy_j", "throughput_unit")


# -- slmtui per ---------------------------------------------------------------------------------


def per_command(args: argparse.Namespace) -> int:
    """PER of every row of a CSV, in the format asked for."""
    path = Path(args.csv)
    grid = grid_option(args)
    inputs = [_with_csv_carbon(i, grid) for i in read_per_csv(path)]
    options = per_options(args)
    options["rank_by"] = options["rank_by"] or "per"  # a CSV is ranked as the study ranks
    rows = compute_per(inputs, **options)
    emit(
        rows,
        args.format,
        args.output,
        title=f"PER of {path.name}",
        by=options["rank_by"],
        grid=grid,
        options=options,
    )
    return 0


def _with_csv_carbon(given: PerInput, grid: Grid) -> PerInput:
    """A CSV's energy_j (J per unit of work) as grams CO2e per unit, for the co2 factor."""
    from dataclasses import replace

    return replace(given, co2_g=grid.grams(given.energy_j))


def read_per_csv(path: Path) -> list[PerInput]:
    """Rows of a CSV with model, task, accuracy, throughput, latency_ms, memory_mb columns.

    Other columns are ignored; ``energy_j`` and ``throughput_unit`` are read when present.
    Header names are matched ignoring case and surrounding spaces.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a readable CSV file ({exc})") from None
        if header is None:
            raise UserError(
                f"{path}: empty file; needs a header with {', '.join(REQUIRED_COLUMNS)}"
            )
        columns = {name.strip().lower(): i for i, name in reversed(list(enumerate(header)))}
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise UserError(
                f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                f"{allowed_list(missing).replace(' or ', ' and ')}; needs "
                f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})"
            )
        inputs: list[PerInput] = []
        first_line: dict[tuple[str, str], int] = {}
        try:
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                inputs.append(_csv_row(path, line, cells, columns, first_line))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    if not inputs:
        raise UserError(f"{path}: no data rows under the header")
    return inputs


def _csv_row(
    path: Path,
    line: int,
    cells: list[str],
    columns: dict[str, int],
    first_line: dict[tuple[str, str], int],
) -> PerInput:
    def cell(column: str) -> str:
        index = columns[column]
        return cells[index].strip() if index < len(cells) else ""

    def text(column: str) -> str:
        value = cell(column)
        if not value:
            raise UserError(f"{path} line {line}, column '{column}': empty cell")
        return value

    def optional_number(column: str) -> float | None:
        raw = cell(column)
        if not raw:
            return None
        where = f"{path} line {line}, column '{column}'"
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"{where}: '{raw}' is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: '{raw}' is not a finite number")
        if value < 0:
            raise UserError(f"{where}: '{raw}' is negative; a number >= 0 is needed")
        return value

    def number(column: str) -> float:
        value = optional_number(column)
        if value is None:
            raise UserError(
                f"{path} line {line}, column '{column}': empty cell; a number >= 0 is needed"
            )
        return value

    model, task = text("model"), text("task")
    if (model, task) in first_line:
        raise UserError(
            f"{path} line {line}: model '{model}' on task '{task}' again "
            f"(first on line {first_line[model, task]}); give each model one row per task"
        )
    first_line[model, task] = line
    return PerInput(
        model=model,
        task=task,
        accuracy=number("accuracy"),
        throughput=number("throughput"),
        latency_ms=number("latency_ms"),
        memory_mb=number("memory_mb"),
        energy_j=optional_number("energy_j") if "energy_j" in columns else None,
        key=f"line {line}",
        throughput_unit=(cell("throughput_unit") or None) if "throughput_unit" in columns else None,
    )


# -- slmtui report ------------------------------------------------------------------------------


def report_command(args: argparse.Namespace) -> int:
    """PER over the stored results (optionally only some tasks / models)."""
    from slmtui import paths

    db = Path(args.db) if getattr(args, "db", None) else paths.default_db_path()
    fmt = getattr(args, "format", "table")
    if not db.exists():
        _say(f"No results yet: {db} does not exist. Run `slmtui run` to make some.", fmt)
        return 0
    from slmtui.store import Store

    with Store(db) as store:
        results = store.results()
    if not results:
        _say(f"No finished runs in {db} yet. Run `slmtui run` to make some.", fmt)
        return 0
    tasks = _check_filter("--task", getattr(args, "task", None), {r.task for r in results}, db)
    models = _check_filter("--model", getattr(args, "model", None), {r.model for r in results}, db)
    selected = [
        r
        for r in results
        if (tasks is None or r.task in tasks) and (models is None or r.model in models)
    ]
    if not selected:
        _say("No stored result matches both --task and --model.", fmt)
        return 0
    grid = grid_option(args)
    options = per_options(args)
    plot = getattr(args, "plot", None)
    if plot:
        from slmtui.reports.plots import plot_targets

        plot_targets(plot)  # a bad path fails before anything is written
    built = build_per_inputs(selected, grid=grid)
    for note in built.notes:
        print(f"slmtui: note: {note}", file=sys.stderr)
    if not built.inputs:
        _say("No selected result has every PER metric.", fmt)
        return 0
    reason = choose_rank_by(options, built.inputs)
    if reason and fmt == "csv":
        label = SCORE_LABELS[options["rank_by"]]
        print(f"slmtui: note: rows ranked by {label} ({reason}; --rank-by)", file=sys.stderr)
    rows = compute_per(built.inputs, **options)
    n = len(built.inputs)
    runs = None
    if fmt in ("json", "csv"):
        with Store(db) as store:
            runs = store.export_runs([r.input.key for r in rows if r.input.key])
    if plot:
        from slmtui.reports.plots import write_plots

        for path in write_plots(rows, plot, by=options["rank_by"]):
            print(f"slmtui: wrote {path}", file=sys.stderr)
    emit(
        rows,
        fmt,
        getattr(args, "output", None),
        title=f"{n} result{'s' * (n != 1)} from {db}",
        by=options["rank_by"],
        reason=reason,
        runs=runs,
        grid=grid,
        options=options,
    )
    return 0


def _say(message: str, fmt: str) -> None:
    """A one-line message; on stderr for machine formats so stdout stays parseable."""
    print(message, file=sys.stdout if fmt == "table" else sys.stderr)


def _check_filter(
    flag: str, wanted: Sequence[str] | None, stored: set[str], db: Path
) -> set[str] | None:
    if not wanted:
        return None
    for name in wanted:
        if name not in stored:
            what = "task" if flag == "--task" else "model"
            hint = did_you_mean(name, sorted(stored)) or f"; stored: {allowed_list(sorted(stored))}"
            raise UserError(f"{flag} '{name}': no stored results for this {what} in {db}{hint}")
    return set(wanted)


@dataclass
class PerInputs:
    """Inputs built from stored results, and what the caller should tell the user."""

    inputs: list[PerInput] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    accuracy_change: dict[str, float] = field(default_factory=dict)
    """Run id of a quantised run -> its accuracy minus that of the same model's full-precision
    run (same task and settings) when both are among the results."""


def per_inputs_from_results(results: Iterable[ResultRow]) -> list[PerInput]:
    """PER inputs from store rows (see ``build_per_inputs``; rows lacking a metric are left out)."""
    return build_per_inputs(results).inputs


_SETTING_LABELS: tuple[tuple[str, str], ...] = (
    ("dtype", "{}"),
    ("engine", "engine {}"),
    ("batch_size", "batch {}"),
    ("parallel", "{}"),
    ("num_fewshot", "{}-shot"),
    ("max_new_tokens", "{} new tokens"),
    ("limit", "limit {}"),
    ("data_source", "{} data"),
)


def build_per_inputs(results: Iterable[ResultRow], grid: Grid | None = None) -> PerInputs:
    """Turn stored results into PER inputs, labelled so that every row of a task is distinct.

    - A quantised variant is a model of its own: "x · int4" (``RunSpec.model_label``), and its
      accuracy change against the full-precision run is in ``accuracy_change``.
    - A model measured at several GPU counts gets the count in its label ("x · 2 GPUs", "x · CPU").
    - A model measured on one task with different settings (dtype, batch size, few-shot, limit,
      sample vs real data, ...) gets the differing settings in its label.
    - A task measured in both modes is split ("arc_easy (generate)"), since tokens/s and
      samples/s cannot be normalised together.
    - Energy is per unit of work (J per token for generate, per sample for loglikelihood) when the
      metrics hold it, else the window's total. CO2 (``co2_g`` per unit, and per run, per 1,000
      tokens and per correct answer in ``extra``) is that energy at ``grid`` (default: world).
    Rows lacking accuracy, throughput, latency or memory are left out, with a note.
    """
    out = PerInputs()
    rows: list[ResultRow] = []
    for r in results:
        absent = [
            name
            for name in ("accuracy", "throughput", "latency_ms", "memory_mb")
            if getattr(r, name) is None
        ]
        if absent:
            out.notes.append(f"left out {r.label} (run {r.run_id}): no {', '.join(absent)}")
        else:
            rows.append(r)

    modes_by_task: dict[str, set[str]] = {}
    for r in rows:
        modes_by_task.setdefault(r.task, set()).add(_mode(r))
    task_label = {
        id(r): f"{r.task} ({_mode(r)})" if len(modes_by_task[r.task]) > 1 else r.task for r in rows
    }

    model_of = {id(r): r.spec.model_label for r in rows}  # "x" or "x · int4"
    gpus_by_model: dict[str, set[int]] = {}
    for r in rows:
        gpus_by_model.setdefault(model_of[id(r)], set()).add(r.gpus)
    # settings that differ between rows of the same model, task and GPU count
    groups: dict[tuple[str, str, int], list[ResultRow]] = {}
    for r in rows:
        groups.setdefault((model_of[id(r)], task_label[id(r)], r.gpus), []).append(r)
    varying: dict[str, list[str]] = {}
    for (model, _, _), group in groups.items():
        for name, _ in _SETTING_LABELS:
            if len({_setting(r, name) for r in group}) > 1 and name not in varying.get(model, []):
                varying.setdefault(model, []).append(name)

    grid = grid or parse_grid(None)
    changes = accuracy_changes(rows)
    for r in rows:
        parts = [model_of[id(r)]]
        if len(gpus_by_model[model_of[id(r)]]) > 1:
            parts.append(_where(r.gpus))
        for name, template in _SETTING_LABELS:
            value = _setting(r, name)
            if name in varying.get(model_of[id(r)], []) and value is not None:
                parts.append(template.format(value))
        carbon = carbon_of(r.energy_j, r.metrics, grid)
        reported = RunMetrics.from_dict(r.metrics)
        energy_per_unit = _energy_per_unit(r)
        out.inputs.append(
            PerInput(
                model=" · ".join(parts),
                task=task_label[id(r)],
                accuracy=r.accuracy,
                throughput=r.throughput,
                latency_ms=r.latency_ms,
                memory_mb=r.memory_mb,
                energy_j=energy_per_unit,
                key=r.run_id,
                throughput_unit=r.throughput_unit,
                co2_g=grid.grams(energy_per_unit),
                extra={
                    "run_id": r.run_id,
                    "co2_run_g": carbon.run_g,
                    "co2_per_1k_tokens_g": carbon.per_1k_tokens_g,
                    "co2_per_correct_g": carbon.per_correct_g,
                    "energy_per_correct_j": _number(r.metrics.get("energy_per_correct_j")),
                    **{c.key: getattr(reported, c.metric) for c in METRIC_COLUMNS if c.metric},
                    "acc_change": changes.get(r.run_id),
                },
            )
        )
    out.accuracy_change = changes
    sample = [r for r in rows if r.metrics.get("data_source") == "sample"]
    if sample:
        out.notes.append(
            f"{len(sample)} result{'s' * (len(sample) != 1)} used slmtui's embedded sample "
            "items, not the benchmark data: "
            + ", ".join(sorted({f"{r.model} on {r.task}" for r in sample}))
        )
    labels: dict[tuple[str, str], int] = {}
    for given in out.inputs:
        labels[given.model, given.task] = labels.get((given.model, given.task), 0) + 1
    for (model, task), count in labels.items():
        if count > 1:
            out.notes.append(f"{count} results of '{model}' on {task} with the same settings")
    return out


def accuracy_changes(rows: Iterable[ResultRow]) -> dict[str, float]:
    """Quantised run id -> accuracy minus its full-precision twin's (the run whose spec differs
    only in ``quantize``: the same run key with quantize "none"); the newest twin counts."""
    rows = list(rows)
    full = {
        r.spec.run_key: r  # recomputed, like the twin's: keys stored by older versions may differ
        for r in sorted(rows, key=lambda r: r.finished_at)
        if r.spec.quantize == "none" and r.accuracy is not None
    }
    changes: dict[str, float] = {}
    for r in rows:
        twin = full.get(replace(r.spec, quantize="none").run_key)
        if r.spec.quantize != "none" and twin is not None and r.accuracy is not None:
            changes[r.run_id] = r.accuracy - twin.accuracy  # type: ignore[operator]
    return changes


def _mode(r: ResultRow) -> str:
    mode = r.metrics.get("mode") or r.spec.options.mode
    if mode:
        return str(mode)
    return "loglikelihood" if r.throughput_unit == "samples/s" else "generate"


def _setting(r: ResultRow, name: str) -> Any:
    if name == "data_source":
        return r.metrics.get("data_source")
    if hasattr(r.spec.options, name):
        return getattr(r.spec.options, name)
    return getattr(r.spec, name)


def _where(gpus: int) -> str:
    return "CPU" if gpus == 0 else f"{gpus} GPU{'s' if gpus > 1 else ''}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _energy_per_unit(r: ResultRow) -> float | None:
    key = "energy_per_sample_j" if r.throughput_unit == "samples/s" else "energy_per_token_j"
    value = r.metrics.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return r.energy_j


# -- shared -------------------------------------------------------------------------------------


def grid_option(args: argparse.Namespace) -> Grid:
    """The grid of ``--carbon-intensity`` (gCO2e/kWh or a region code; default: world)."""
    return parse_grid(getattr(args, "carbon_intensity", None), where="--carbon-intensity")


def per_options(args: argparse.Namespace) -> dict[str, Any]:
    """``compute_per`` keyword arguments from ``--energy``, ``--co2``, ``--log-scale``,
    ``--weight F=W`` and ``--rank-by`` (``rank_by`` None when not given: the command picks)."""
    weights: dict[str, float] = {}
    for item in getattr(args, "weight", None) or []:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in FACTORS:
            hint = did_you_mean(name, FACTORS) if sep else ""
            raise UserError(
                f"--weight '{item}': expected FACTOR=NUMBER with FACTOR one of "
                f"{allowed_list(FACTORS)}{hint}"
            )
        try:
            weights[name] = float(raw)
        except ValueError:
            raise UserError(f"--weight '{item}': '{raw.strip()}' is not a number") from None
    given = getattr(args, "rank_by", None)
    rank_by = None if given is None else given.strip().lower().replace("-", "_")
    if given is not None and rank_by not in SCORE_LABELS:
        hint = did_you_mean(given, ("per", "per-rel"))
        raise UserError(f"--rank-by '{given}'{hint}; allowed: 'per' or 'per-rel'")
    return {
        "energy": bool(getattr(args, "energy", False)),
        "co2": bool(getattr(args, "co2", False)),
        "weights": weights or None,
        "log_scale": bool(getattr(args, "log_scale", False)),
        "rank_by": rank_by,
    }


def choose_rank_by(options: dict[str, Any], inputs: Sequence[PerInput]) -> str | None:
    """Without ``--rank-by``, set ``options["rank_by"]`` to the score the console's Rank and the
    headless run choose for these inputs (``per.automatic_rank_by``) and return why; None when
    the user chose."""
    if options["rank_by"] is not None:
        return None
    options["rank_by"] = automatic_rank_by(inputs)
    return automatic_rank_reason(options["rank_by"])


def render(
    rows: Sequence[PerRow],
    fmt: str,
    *,
    title: str | None = None,
    width: int = 120,
    by: str = "per",
    reason: str | None = None,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    grid: Grid | None = None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """The report as text: a format of ``slmtui.cli.FORMATS`` (tables without colour).

    ``runs`` (stored runs by run id) adds every stored metric, setting and hardware fact to
    CSV and JSON; ``grid`` is the carbon intensity behind the CO2 figures; ``reason`` says why
    ``by`` ranks when it was chosen automatically (every format but CSV carries it)."""
    from slmtui.reports import export

    grid_facts = _grid_facts(grid)
    if fmt == "csv":
        return export.to_csv(rows, runs)
    if fmt == "json":
        return export.to_json(
            rows, runs, ranked_by=by, rank_reason=reason, grid=grid_facts, options=options
        )
    if fmt == "markdown":
        return export.to_markdown(rows, by=by, reason=reason)
    if fmt == "table":
        import io

        from rich.console import Console

        from slmtui.reports.tables import render_per_tables

        buffer = io.StringIO()
        console = Console(file=buffer, width=width, color_system=None)
        render_per_tables(
            rows, console, title=title, by=by, grid_label=grid and grid.label, reason=reason
        )
        return buffer.getvalue()
    raise UserError(
        f"--format '{fmt}': allowed: {allowed_list(('table', 'csv', 'json', 'markdown'))}"
    )


def _grid_facts(grid: Grid | None) -> dict[str, Any] | None:
    from slmtui.carbon import GRID_SOURCE

    if grid is None:
        return None
    return {"g_per_kwh": grid.g_per_kwh, "label": grid.label, "table_source": GRID_SOURCE}


def emit(
    rows: Sequence[PerRow],
    fmt: str,
    output: str | None,
    *,
    title: str | None = None,
    by: str = "per",
    reason: str | None = None,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    grid: Grid | None = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Print the report to the terminal (tables in colour) or write it to ``output``
    (whole or not at all: a temporary file renamed into place)."""
    if output is None and fmt == "table":
        from rich.console import Console

        from slmtui.reports.tables import render_per_tables

        render_per_tables(
            rows, Console(), title=title, by=by, grid_label=grid and grid.label, reason=reason
        )
        return
    text = render(
        rows, fmt, title=title, by=by, reason=reason, runs=runs, grid=grid, options=options
    )
    if output is None:
        sys.stdout.write(text)
        return
    write_atomically(Path(output), text, flag="-o")
    print(f"slmtui: wrote {len(rows)} rows to {output}", file=sys.stderr)


def write_atomically(path: Path, text: str, *, flag: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed into
    place, so a failed write leaves nothing half-written."""
    import os
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{flag} {path}: cannot write ({exc.strerror})") from None
