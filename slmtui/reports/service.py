"""The store's scheduler service from the command line: `slmtui serve` (the service itself,
which the console and `run --detach` start for you), `slmtui run PROFILE --detach`,
`slmtui status` and `slmtui stop` (clients; the console re-attaches the same way).

The service is composed here, above both the scheduler and the store (neither imports the
other): ``slmtui.scheduler.service`` serves a scheduler on the store's socket.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from slmtui import paths
from slmtui.plan import plan_runs
from slmtui.reports.headless import _load_specs, _plan_line, progress_table
from slmtui.scheduler import Scheduler, check_fits, detect_gpus, worker_command
from slmtui.scheduler.address import service_address
from slmtui.scheduler.client import ServiceClient
from slmtui.scheduler.scheduler import CommandFactory
from slmtui.scheduler.service import IDLE_EXIT_S, run_service, say, store_lock
from slmtui.spec import RunSpec
from slmtui.store import Store


def _db(args: argparse.Namespace) -> Path:
    return Path(args.db).expanduser() if getattr(args, "db", None) else paths.default_db_path()


def run_detached(
    args: argparse.Namespace, *, out: Console | None = None, err: Console | None = None
) -> int:
    """Queue the profile's runs not yet stored in the service (started if needed); return.

    The runs go on after this command and after the terminal closes.
    """
    out = out or Console()
    err = err or Console(stderr=True)
    specs, label, _grid = _load_specs(args)
    gpus = detect_gpus()
    check_fits(specs, gpus)
    db = _db(args)
    with Store(db, keep_queued=True) as store:
        plan = plan_runs(specs, store, rerun=bool(getattr(args, "rerun", False)))
    err.print(_plan_line(label, specs, plan.to_run, len(plan.skipped), gpus, db))
    if not plan.to_run:
        out.print("Nothing to run: every run of the profile is stored (--rerun runs them again).")
        return 0
    with ServiceClient(db) as client:
        run_ids = client.submit(plan.to_run)
        pid = client.service_pid
    busy = len(plan.to_run) - len(run_ids)
    out.print(
        f"{len(run_ids)} run{'s' * (len(run_ids) != 1)} handed to the scheduler service "
        f"(pid {pid}) of {db}" + (f"; {busy} already queued or running there" if busy else "")
    )
    out.print(
        "They go on after this terminal closes: `slmtui status` shows them, `slmtui` re-attaches "
        "the console, `slmtui stop` cancels them."
    )
    return 0


def status_command(args: argparse.Namespace, *, out: Console | None = None) -> int:
    """The service's runs as the headless progress table; a store summary when none runs."""
    out = out or Console()
    db = _db(args)
    with ServiceClient(db, autostart=False) as client:
        client.start()
        if client.attached:
            states = client.snapshot()
            live = sum(not s.ended for s in states)
            out.print(
                f"scheduler service pid {client.service_pid} · store {db} · "
                f"{live} run{'s' * (live != 1)} queued or running"
            )
            out.print(progress_table(states))
            return 0
    out.print(f"No scheduler service runs for store {db}.")
    if db.exists():
        with Store(db, keep_queued=True) as store:
            counts = Counter(r.status for r in store.runs())
        if counts:
            out.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
        if counts.get("queued"):
            out.print(
                "Queued runs wait for a service: `slmtui` or `slmtui run --detach` starts one."
            )
    return 0


def stop_command(args: argparse.Namespace, *, out: Console | None = None) -> int:
    """Cancel every queued and running run of the service; wait until their workers are gone."""
    out = out or Console()
    db = _db(args)
    with ServiceClient(db, autostart=False) as client:
        client.start()
        if not client.attached:
            out.print(f"No scheduler service runs for store {db}: nothing to stop.")
            return 0
        active = [s.run_id for s in client.snapshot() if not s.ended]
        stopped = client.stop_runs()
    n = len(active)
    out.print(
        f"Cancelled {n} run{'s' * (n != 1)}; finished results stay stored in {db}."
        if stopped
        else f"Asked {n} run(s) to stop; some are still stopping (`slmtui status`)."
    )
    return 0 if stopped else 1


def serve_command(args: argparse.Namespace) -> int:
    """Run the store's scheduler service in this process until it is stopped or idle.

    Exit 0 at once when another service holds the store (it serves the clients).
    """
    address = service_address(_db(args))
    factory = worker_command
    if getattr(args, "worker_prefix", None):
        factory = prefix_factory(json.loads(args.worker_prefix))
    with store_lock(address) as held:
        if not held:
            say(f"a scheduler service already serves {address.db}")
            return 0
        store = Store(address.db, keep_queued=True)
        try:
            for run_id in store.recovered:
                say(f"run {run_id} was running when its scheduler died: marked crashed")
            kwargs: dict[str, Any] = {}
            if getattr(args, "hang_grace_s", None) is not None:
                kwargs["hang_grace_s"] = args.hang_grace_s
            scheduler = Scheduler(store, command_factory=factory, handle_signals=False, **kwargs)
            adopted = store.adopt_queued()
            if adopted:
                say(f"{len(adopted)} queued run(s) of a scheduler that died adopted")
            scheduler.requeue((row.run_id, row.spec, row.queued_at) for row in adopted)
            idle_exit_s = getattr(args, "idle_exit_s", None)
            run_service(
                scheduler, address, idle_exit_s=IDLE_EXIT_S if idle_exit_s is None else idle_exit_s
            )
        finally:
            store.close()
    return 0


def prefix_factory(prefix: Sequence[str]) -> CommandFactory:
    """Workers started as ``PREFIX --spec-json J --run-id R`` (tests, debugging)."""

    def factory(
        spec: RunSpec, run_id: str, gpu_ids: Sequence[int]
    ) -> tuple[list[str], dict[str, str]]:
        argv, env = worker_command(spec, run_id, gpu_ids)
        return [*prefix, *argv[argv.index("--spec-json") :]], env

    return factory
