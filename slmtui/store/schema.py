"""The results store's SQLite schema, versioned by ``PRAGMA user_version``.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``. Never edit a released
migration: append a new one, so stores written by older versions open and upgrade in place.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: runs (one row per run, flat metric columns for the views) and samples.
    """
    CREATE TABLE runs (
        run_id          TEXT PRIMARY KEY,
        run_key         TEXT NOT NULL,
        model           TEXT NOT NULL,
        task            TEXT NOT NULL,
        gpus            INTEGER NOT NULL,
        engine          TEXT NOT NULL,
        status          TEXT NOT NULL CHECK (status IN
                            ('queued', 'running', 'finished', 'failed', 'cancelled')),
        spec_json       TEXT NOT NULL,
        hardware_json   TEXT,
        queued_at       REAL NOT NULL,
        started_at      REAL,
        finished_at     REAL,
        worker_pid      INTEGER,
        app_pid         INTEGER NOT NULL,
        app_started_at  REAL NOT NULL,
        accuracy        REAL,
        throughput      REAL,
        throughput_unit TEXT,
        latency_ms      REAL,
        memory_mb       REAL,
        energy_j        REAL,
        metrics_json    TEXT,
        error_reason    TEXT,
        error_message   TEXT,
        log_tail        TEXT
    );
    CREATE INDEX runs_by_key ON runs (run_key, status);
    CREATE INDEX runs_by_task ON runs (task, model);
    CREATE TABLE samples (
        run_id     TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
        idx        INTEGER NOT NULL,
        item_id    TEXT NOT NULL,
        prompt     TEXT NOT NULL,
        output     TEXT NOT NULL,
        gold       TEXT NOT NULL,
        score      REAL NOT NULL,
        extra_json TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (run_id, idx)
    ) WITHOUT ROWID;
    """,
    # 1 -> 2: how many samples a run has (from its progress), so a run that ended without a
    # result still says how far it got ("37/120"); NULL where no progress said.
    """
    ALTER TABLE runs ADD COLUMN samples_total INTEGER;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
IMPORTABLE_VERSIONS: tuple[int, ...] = (1, 2)
"""Versions whose runs and samples an import reads as they are (read-only, never migrated):
version 2 only added ``runs.samples_total``, which a version-1 store's runs leave empty."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to ``SCHEMA_VERSION``; return the version it had before.

    Each step runs in its own transaction together with its ``user_version`` bump, so a
    crash mid-migration leaves the previous version intact.
    """
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"results store has schema version {found}, this slmtui knows up to "
            f"{SCHEMA_VERSION}: upgrade slmtui"
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return found


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (executescript would commit on its own)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        out.append(pending.strip())
    return out
