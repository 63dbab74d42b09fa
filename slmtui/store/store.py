"""The results store: the only writer of results, one SQLite file (stdlib ``sqlite3``).

Every event that matters is committed in its own transaction the moment it is recorded, so a
killed app loses nothing it has seen finish. WAL mode lets the console read while a run writes
and lets several slmtui processes share one store. Results are committed with
``synchronous=FULL`` (durable even on power loss); samples with ``NORMAL`` (durable when the
process dies, cheap enough for one commit per sample).

The connection is shared by all threads of the process behind a lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from slmtui import paths
from slmtui.board import RUN_STATUSES, TERMINAL_STATUSES, RunState, finite
from slmtui.errors import StoreWriteError, UserError
from slmtui.protocol import (
    Event,
    RunFailed,
    RunFinished,
    RunProgress,
    RunQueued,
    RunStarted,
    SampleScored,
)
from slmtui.spec import RunSpec
from slmtui.store.schema import SCHEMA_VERSION, migrate

_BUSY_TIMEOUT_S = 30.0
_APP_START_TOLERANCE_S = 0.5


@dataclass(frozen=True)
class ResultRow:
    """A finished run: what the PER table, reports and exports read."""

    run_id: str
    run_key: str
    model: str
    task: str
    gpus: int
    engine: str
    spec: RunSpec
    accuracy: float | None
    throughput: float | None
    """THR per GPU (CPU counts as one), in ``throughput_unit``."""
    throughput_unit: str | None
    latency_ms: float | None
    """ms per generated token (generate) or per sample (loglikelihood)."""
    memory_mb: float | None
    """Peak memory of the run in MB (``metrics['mem_source']`` says which counter)."""
    energy_j: float | None
    """Energy over the measured window in J; ``None`` on CPU."""
    metrics: dict[str, Any]
    hardware: dict[str, Any]
    started_at: float | None
    finished_at: float

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def data_source(self) -> str | None:
        """Where the items came from: "file", "data_dir", "hub" or "sample" (not the benchmark)."""
        return self.metrics.get("data_source")


@dataclass(frozen=True)
class SampleRow:
    """One scored benchmark item of a run."""

    run_id: str
    index: int
    item_id: str
    prompt: str
    output: str
    gold: str
    score: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportResult:
    """What ``Store.import_runs`` did, by run id."""

    added: list[str]
    skipped: list[str]
    """Already stored (same run id): this store's copy is kept."""
    unended: list[str]
    """Queued or running in the source: not taken."""


class Store:
    """The SQLite results store. ``Store(path)`` creates or migrates the file and recovers
    runs a killed app left behind (see ``recover``)."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, keep_queued: bool = False
    ) -> None:
        """``keep_queued``: on recovery, queued runs of a dead owner stay queued (the scheduler
        service adopts them on its next start) instead of being cancelled."""
        self.path = Path(path) if path is not None else paths.default_db_path()
        self.keep_queued = keep_queued
        in_memory = str(path) == ":memory:"
        if not in_memory:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(
                    f"--db {self.path}: cannot create its folder ({exc.strerror}); "
                    "give a writable path"
                ) from exc
        self._lock = threading.RLock()
        self._totals: dict[str, int] = {}
        """The sample total last written per run (progress repeats it every second)."""
        try:
            self._conn = sqlite3.connect(
                ":memory:" if in_memory else str(self.path),
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,  # transactions are explicit: one per recorded event
                check_same_thread=False,  # shared by threads behind self._lock
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            migrate(self._conn)
        except sqlite3.OperationalError as exc:
            raise UserError(
                f"--db {self.path}: cannot open it for writing ({exc}); "
                "give a writable path (a full disk or a read-only mount?)"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise UserError(
                f"--db {self.path}: not a slmtui results store ({exc}); "
                "give a new path or an existing store"
            ) from exc
        except RuntimeError as exc:
            raise UserError(f"--db {self.path}: {exc}") from exc
        me = psutil.Process()
        self._app_pid = me.pid
        self._app_started_at = me.create_time()
        self.recovered: list[str] = self.recover()
        """Run ids that ``recover`` marked when this store was opened."""

    # -- writing ------------------------------------------------------------------------------

    def begin_run(self, run_id: str, spec: RunSpec, *, queued_at: float | None = None) -> None:
        """Record a submitted run as queued (owned by this process until it ends)."""
        t = time.time() if queued_at is None else queued_at
        with self._transaction() as conn:
            self._insert(conn, run_id, spec, "queued", t)

    def record(self, event: Event) -> None:
        """Commit what an event says about its run, in one transaction.

        ``queued``, ``started``, ``sample``, ``result`` and ``error`` events are stored;
        of ``progress`` only the run's sample total, once it is known (a write when it
        changes, not one per event). A run in a terminal status (finished, failed, cancelled)
        never changes again, so a late or repeated event cannot undo a result.
        """
        if isinstance(event, RunProgress):
            if event.total > 0 and self._totals.get(event.run_id) != event.total:
                with self._transaction() as conn:
                    conn.execute(
                        "UPDATE runs SET samples_total = ?"
                        " WHERE run_id = ? AND status IN ('queued', 'running')",
                        (event.total, event.run_id),
                    )
                self._totals[event.run_id] = event.total
            return
        if isinstance(event, RunQueued):
            with self._transaction() as conn:
                self._insert(conn, event.run_id, RunSpec.from_dict(event.spec), "queued", event.t)
        elif isinstance(event, RunStarted):
            with self._transaction() as conn:
                self._record_started(conn, event)
        elif isinstance(event, SampleScored):
            with self._transaction() as conn:
                self._require_run(conn, event.run_id)
                conn.execute(
                    "INSERT OR REPLACE INTO samples"
                    " (run_id, idx, item_id, prompt, output, gold, score, extra_json)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.run_id,
                        event.index,
                        event.item_id,
                        event.prompt,
                        event.output,
                        event.gold,
                        float(event.score),
                        _dumps(event.extra),
                    ),
                )
        elif isinstance(event, RunFinished):
            with self._transaction(durable=True) as conn:
                self._require_run(conn, event.run_id)
                m = event.metrics
                conn.execute(
                    "UPDATE runs SET status = 'finished', finished_at = ?, accuracy = ?,"
                    " throughput = ?, throughput_unit = ?, latency_ms = ?, memory_mb = ?,"
                    " energy_j = ?, metrics_json = ?"
                    " WHERE run_id = ? AND status IN ('queued', 'running')",
                    (
                        event.t,
                        finite(m.get("accuracy")),
                        finite(m.get("throughput")),
                        m.get("throughput_unit"),
                        finite(m.get("latency_ms")),
                        finite(m.get("peak_mem_mb")),
                        finite(m.get("energy_j")),
                        _dumps(m),
                        event.run_id,
                    ),
                )
        elif isinstance(event, RunFailed):
            status = event.status
            with self._transaction(durable=True) as conn:
                self._require_run(conn, event.run_id)
                conn.execute(
                    "UPDATE runs SET status = ?, finished_at = ?, error_reason = ?,"
                    " error_message = ?, log_tail = ?"
                    " WHERE run_id = ? AND status IN ('queued', 'running')",
                    (status, event.t, event.reason, event.message, event.log_tail, event.run_id),
                )
        else:
            raise TypeError(f"the store does not record {type(event).__name__} events")

    def recover(self) -> list[str]:
        """Close runs whose app is gone: running -> failed ("crashed"), queued -> cancelled
        (or, with ``keep_queued``, still queued for the scheduler service to adopt).

        A run belongs to the process that submitted it (the scheduler service, or an app that
        ran its own scheduler); runs of a live owner are left alone. Returns the run ids marked.
        """
        marked: list[str] = []
        now = time.time()
        with self._transaction(durable=True) as conn:
            rows = conn.execute(
                "SELECT run_id, status, app_pid, app_started_at FROM runs"
                " WHERE status IN ('queued', 'running')"
            ).fetchall()
            for run_id, status, app_pid, app_started_at in rows:
                if _process_alive(app_pid, app_started_at):
                    continue
                if status == "running":
                    conn.execute(
                        "UPDATE runs SET status = 'failed', finished_at = ?,"
                        " error_reason = 'crashed', error_message = ? WHERE run_id = ?",
                        (now, "its scheduler (app or service) exited during the run", run_id),
                    )
                elif self.keep_queued:
                    continue
                else:
                    conn.execute(
                        "UPDATE runs SET status = 'cancelled', finished_at = ?,"
                        " error_reason = 'cancelled', error_message = ? WHERE run_id = ?",
                        (now, "app exited before the run started", run_id),
                    )
                marked.append(run_id)
        return marked

    def adopt_queued(self) -> list[RunState]:
        """Take over queued runs whose owner is gone (the service after a crash or a reboot):
        they now belong to this process, which runs them. Oldest first."""
        with self._transaction(durable=True) as conn:
            rows = conn.execute(
                "SELECT run_id, app_pid, app_started_at FROM runs WHERE status = 'queued'"
            ).fetchall()
            orphans = [r[0] for r in rows if not _process_alive(r[1], r[2])]
            for run_id in orphans:
                conn.execute(
                    "UPDATE runs SET app_pid = ?, app_started_at = ? WHERE run_id = ?",
                    (self._app_pid, self._app_started_at, run_id),
                )
        adopted = [self.run(run_id) for run_id in orphans]
        return sorted((r for r in adopted if r is not None), key=lambda r: r.queued_at)

    # -- reading ------------------------------------------------------------------------------

    def completed_keys(self) -> set[str]:
        """Run keys with a finished run: ``plan`` skips these unless asked to rerun."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT run_key FROM runs WHERE status = 'finished'"
            ).fetchall()
        return {r[0] for r in rows}

    def results(
        self, tasks: Iterable[str] | None = None, models: Iterable[str] | None = None
    ) -> list[ResultRow]:
        """Finished runs, the latest per run key, optionally only these tasks / model names."""
        where = ["status = 'finished'"]
        params: list[Any] = []
        for column, values in (("task", tasks), ("model", models)):
            if values is not None:
                values = list(values)
                where.append(f"{column} IN ({', '.join('?' * len(values))})" if values else "0")
                params.extend(values)
        sql = (
            "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY run_key"
            " ORDER BY finished_at DESC, rowid DESC) AS latest FROM runs"
            f" WHERE {' AND '.join(where)}) WHERE latest = 1 ORDER BY task, model, gpus, run_id"
        )
        return [_result_row(r) for r in self._select(sql, params)]

    def runs(self, statuses: Sequence[str] | None = None) -> list[RunState]:
        """Every run (or only those in ``statuses``), oldest first, with its samples scored."""
        sql = _RUN_STATE_SELECT
        params: list[Any] = []
        if statuses is not None:
            sql += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            params.extend(statuses)
        sql += " ORDER BY queued_at, rowid"
        return [_run_state(r) for r in self._select(sql, params)]

    def run(self, run_id: str) -> RunState | None:
        rows = self._select(f"{_RUN_STATE_SELECT} WHERE run_id = ?", [run_id])
        return _run_state(rows[0]) if rows else None

    def samples(self, run_id: str) -> list[SampleRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, idx, item_id, prompt, output, gold, score, extra_json"
                " FROM samples WHERE run_id = ? ORDER BY idx",
                (run_id,),
            ).fetchall()
        return [
            SampleRow(
                run_id=r[0],
                index=r[1],
                item_id=r[2],
                prompt=r[3],
                output=r[4],
                gold=r[5],
                score=r[6],
                extra=json.loads(r[7]),
            )
            for r in rows
        ]

    # -- moving runs between stores ---------------------------------------------------------

    def export_runs(self, run_ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Runs as stored (every column; spec, hardware and metrics as objects) by run id, for
        exports that ``import_runs`` can read back. ``None``: every run."""
        if run_ids is None:
            rows = self._select("SELECT * FROM runs ORDER BY queued_at, rowid", [])
        else:
            ids = list(run_ids)
            rows = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows += self._select(
                    f"SELECT * FROM runs WHERE run_id IN ({', '.join('?' * len(chunk))})", chunk
                )
        return {r["run_id"]: run_record(r) for r in rows}

    def import_runs(
        self,
        records: Iterable[Mapping[str, Any]],
        samples: Mapping[str, Sequence[SampleRow]] | None = None,
        *,
        source: str = "import",
    ) -> ImportResult:
        """Add runs (``export_runs`` records) that this store lacks, with their ``samples``;
        a run id already stored is skipped (deduplicated). Only ended runs (finished, failed,
        cancelled) are taken. One transaction: a bad record adds nothing and raises UserError
        naming ``source`` and the record."""
        rows = []
        for n, record in enumerate(records, start=1):
            rows.append(_import_row(record, f"{source}: run #{n}"))
        added: list[str] = []
        skipped: list[str] = []
        unended: list[str] = []
        with self._transaction(durable=True) as conn:
            for row in rows:
                if row["status"] not in TERMINAL_STATUSES:
                    unended.append(row["run_id"])
                    continue
                names = list(row)
                cursor = conn.execute(
                    f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
                    " ON CONFLICT (run_id) DO NOTHING",
                    [row[k] for k in names],
                )
                if cursor.rowcount == 0:
                    skipped.append(row["run_id"])
                    continue
                added.append(row["run_id"])
                for sample in (samples or {}).get(row["run_id"], ()):
                    conn.execute(
                        "INSERT OR REPLACE INTO samples"
                        " (run_id, idx, item_id, prompt, output, gold, score, extra_json)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            row["run_id"],
                            sample.index,
                            sample.item_id,
                            sample.prompt,
                            sample.output,
                            sample.gold,
                            float(sample.score),
                            _dumps(sample.extra),
                        ),
                    )
        return ImportResult(added=added, skipped=skipped, unended=unended)

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable`` syncs the WAL at commit (survives power loss).

        A write the disk refuses (full, read-only, I/O error) raises ``StoreWriteError`` with
        one line; what was committed before stays committed.
        """
        with self._lock:
            conn = self._conn
            try:
                if durable:
                    conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
                else:
                    conn.execute("COMMIT")
                finally:
                    if durable:
                        with suppress(sqlite3.Error):
                            conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise StoreWriteError(
                    f"store {self.path}: cannot write ({exc}); results stored so far are kept"
                ) from exc

    def _select(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._conn.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]

    def _insert(
        self, conn: sqlite3.Connection, run_id: str, spec: RunSpec, status: str, t: float
    ) -> None:
        conn.execute(
            "INSERT INTO runs (run_id, run_key, model, task, gpus, engine, status, spec_json,"
            " queued_at, started_at, app_pid, app_started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?) ON CONFLICT (run_id) DO NOTHING",
            (
                run_id,
                spec.run_key,
                spec.model.name,
                spec.task,
                spec.gpus,
                spec.engine,
                status,
                spec.to_json(),
                t,
                t if status == "running" else None,
                self._app_pid,
                self._app_started_at,
            ),
        )

    def _record_started(self, conn: sqlite3.Connection, event: RunStarted) -> None:
        exists = conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (event.run_id,)).fetchone()
        if not exists:
            self._insert(conn, event.run_id, RunSpec.from_dict(event.spec), "running", event.t)
        conn.execute(
            "UPDATE runs SET status = 'running', started_at = ?, worker_pid = ?,"
            " hardware_json = ? WHERE run_id = ? AND status IN ('queued', 'running')",
            (event.t, event.pid, _dumps(event.hardware), event.run_id),
        )

    @staticmethod
    def _require_run(conn: sqlite3.Connection, run_id: str) -> None:
        if not conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
            raise KeyError(f"run {run_id!r} is not in the store (begin_run first)")


def _process_alive(pid: int, started_at: float) -> bool:
    """Whether the process that wrote a run still runs (pid reuse ruled out by start time)."""
    try:
        return abs(psutil.Process(pid).create_time() - started_at) < _APP_START_TOLERANCE_S
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _loads(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


_JSON_COLUMNS = {"spec_json": "spec", "hardware_json": "hardware", "metrics_json": "metrics"}
_RUN_COLUMNS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "run_key": (str,),
    "model": (str,),
    "task": (str,),
    "gpus": (int,),
    "engine": (str,),
    "status": (str,),
    "queued_at": (int, float),
    "started_at": (int, float, type(None)),
    "finished_at": (int, float, type(None)),
    "worker_pid": (int, type(None)),
    "app_pid": (int,),
    "app_started_at": (int, float),
    "accuracy": (int, float, type(None)),
    "throughput": (int, float, type(None)),
    "throughput_unit": (str, type(None)),
    "latency_ms": (int, float, type(None)),
    "memory_mb": (int, float, type(None)),
    "energy_j": (int, float, type(None)),
    "error_reason": (str, type(None)),
    "error_message": (str, type(None)),
    "log_tail": (str, type(None)),
    "samples_total": (int, type(None)),
}
"""The runs table's plain columns and the JSON types an imported record may give them."""


def run_record(r: Mapping[str, Any]) -> dict[str, Any]:
    """A runs-table row with its JSON columns as objects (``spec``, ``hardware``, ``metrics``)."""
    out = {k: v for k, v in r.items() if k not in _JSON_COLUMNS}
    for column, key in _JSON_COLUMNS.items():
        text = r.get(column)
        out[key] = json.loads(text) if text else None
    return out


def _import_row(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An exported run back as a runs-table row; UserError naming ``where`` when malformed."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: expected an object with the run's stored columns")
    row: dict[str, Any] = {}
    for column, types in _RUN_COLUMNS.items():
        value = record.get(column)
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UserError(f"{where}: '{column}' must be {allowed}, got {value!r}")
        row[column] = value
    where = f"{where} ({row['run_id']})"
    if row["status"] not in RUN_STATUSES:
        raise UserError(f"{where}: status '{row['status']}' is not one of {RUN_STATUSES}")
    try:
        spec = RunSpec.from_dict(record.get("spec"))  # type: ignore[arg-type]
    except Exception as exc:  # any malformed spec is the file's fault
        raise UserError(f"{where}: 'spec' is not a run spec ({exc})") from None
    row["spec_json"] = spec.to_json()
    for column, key in (("hardware_json", "hardware"), ("metrics_json", "metrics")):
        value = record.get(key)
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{where}: '{key}' must be an object or null")
        row[column] = None if value is None else _dumps(value)
    return row


_RUN_STATE_SELECT = (
    "SELECT *, (SELECT COUNT(*) FROM samples WHERE samples.run_id = runs.run_id)"
    " AS samples_scored FROM runs"
)
"""A runs-table row and how many of its samples are stored, for ``_run_state``."""


def _run_state(r: dict[str, Any]) -> RunState:
    """A runs-table row as the run's state (its figures read from ``metrics``, which the flat
    columns copy for SQL; how far it got from its stored samples and total)."""
    error = None
    if r["error_reason"] is not None:
        error = RunFailed(
            r["run_id"],
            reason=r["error_reason"],
            message=r["error_message"] or "",
            log_tail=r["log_tail"] or "",
            t=r["finished_at"] or 0.0,
        )
    return RunState(
        run_id=r["run_id"],
        spec=RunSpec.from_json(r["spec_json"]),
        status=r["status"],
        queued_at=r["queued_at"],
        started_at=r["started_at"],
        ended_at=r["finished_at"],
        samples_done=r["samples_scored"],
        samples_total=r["samples_total"] or 0,
        metrics=json.loads(r["metrics_json"]) if r["metrics_json"] else None,
        error=error,
        hardware=_loads(r["hardware_json"]),
    )


def _result_row(r: dict[str, Any]) -> ResultRow:
    return ResultRow(
        run_id=r["run_id"],
        run_key=r["run_key"],
        model=r["model"],
        task=r["task"],
        gpus=r["gpus"],
        engine=r["engine"],
        spec=RunSpec.from_json(r["spec_json"]),
        accuracy=r["accuracy"],
        throughput=r["throughput"],
        throughput_unit=r["throughput_unit"],
        latency_ms=r["latency_ms"],
        memory_mb=r["memory_mb"],
        energy_j=r["energy_j"],
        metrics=_loads(r["metrics_json"]),
        hardware=_loads(r["hardware_json"]),
        started_at=r["started_at"],
        finished_at=r["finished_at"],
    )
