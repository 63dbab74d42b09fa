"""`slmtui import FILE`: merge another store's runs, or a JSON export's, into this store.

Runs are deduplicated by run id (a run already stored keeps this store's copy), so importing the
same file twice adds nothing. Sweeps from several boxes then rank together. A SQLite store brings
its samples too; a JSON export (``slmtui report --format json``) carries runs, not samples.
Bad input is a one-line UserError and nothing is written (one transaction).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path
from typing import Any

from slmtui.errors import UserError
from slmtui.reports.export import FORMAT_NAME, FORMAT_VERSION
from slmtui.store import SampleRow

SQLITE_MAGIC = b"SQLite format 3\x00"


def import_command(args: argparse.Namespace) -> int:
    from slmtui import paths
    from slmtui.store import Store

    path = Path(args.file)
    records, samples = read_runs(path)
    db = Path(args.db) if getattr(args, "db", None) else paths.default_db_path()
    if db.exists() and path.resolve() == db.resolve():
        raise UserError(f"{path}: is this store itself; give another store or an export")
    with Store(db) as store:
        result = store.import_runs(records, samples, source=str(path))
    n = len(result.added)
    parts = [f"imported {n} run{'s' * (n != 1)} from {path} into {db}"]
    if result.skipped:
        parts.append(f"{len(result.skipped)} already stored (same run id), kept as they were")
    if result.unended:
        parts.append(f"{len(result.unended)} still queued or running there, not taken")
    print("slmtui: " + "; ".join(parts))
    return 0


def read_runs(path: Path) -> tuple[list[dict[str, Any]], dict[str, list[SampleRow]]]:
    """Run records (``Store.export_runs`` shape) and samples by run id from a store or export."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; give a results store or a .json export") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    if head == SQLITE_MAGIC:
        return _read_store(path)
    return _read_export(path), {}


def _read_export(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path}: neither a slmtui results store (SQLite) nor a JSON export ({exc}); "
            "make one with `slmtui report --format json -o FILE`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UserError(
            f'{path}: not a slmtui report export (no "format": "{FORMAT_NAME}"); '
            "make one with `slmtui report --format json -o FILE`"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {version!r}; this slmtui reads up to {FORMAT_VERSION}"
        )
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise UserError(f"{path}: 'rows' must be a list")
    records = []
    for n, row in enumerate(rows, start=1):
        run = row.get("run") if isinstance(row, dict) else None
        if not isinstance(run, dict):
            raise UserError(
                f"{path}: row #{n} has no 'run' object (exported by `slmtui per`, not `report`?)"
            )
        records.append(run)
    return records


def _read_store(path: Path) -> tuple[list[dict[str, Any]], dict[str, list[SampleRow]]]:
    """Every run and sample of another store, read-only (the file is not migrated or changed)."""
    from slmtui.store.schema import IMPORTABLE_VERSIONS, SCHEMA_VERSION
    from slmtui.store.store import run_record

    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise UserError(f"{path}: cannot open the store ({exc})") from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in IMPORTABLE_VERSIONS:
            raise UserError(
                f"{path}: store schema version {version}, this slmtui imports versions "
                f"{', '.join(map(str, IMPORTABLE_VERSIONS))} (its own: {SCHEMA_VERSION}); open "
                "it once with a matching slmtui to upgrade it"
            )
        cursor = conn.execute("SELECT * FROM runs ORDER BY queued_at, rowid")
        names = [d[0] for d in cursor.description]
        records = [run_record(dict(zip(names, r, strict=True))) for r in cursor.fetchall()]
        samples: dict[str, list[SampleRow]] = {}
        for r in conn.execute(
            "SELECT run_id, idx, item_id, prompt, output, gold, score, extra_json FROM samples"
            " ORDER BY run_id, idx"
        ):
            samples.setdefault(r[0], []).append(
                SampleRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]))
            )
    except sqlite3.Error as exc:
        raise UserError(f"{path}: not a slmtui results store ({exc})") from None
    finally:
        conn.close()
    return records, samples
