"""The Textual console. ``launch`` builds the engine (store, scheduler client) and runs the app.

Runs belong to the store's scheduler service (``slmtui serve``), not to the console: the console
is a client that attaches to it, so closing the terminal leaves the runs running and ``slmtui``
opened again shows them.

Importing this package imports nothing heavy: Textual and the engine load inside ``launch``.
"""

from __future__ import annotations

import os
from pathlib import Path


def launch(
    profile_path: str | os.PathLike[str] | None,
    db: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    data_dir: str | None = None,
    timeout_s: float | None = None,
) -> int:
    """Open the console on a profile (``None``: the embedded default); the exit code."""
    from slmtui import paths
    from slmtui.profile import check_overrides, embedded_default, load_profile
    from slmtui.scheduler import detect_gpus
    from slmtui.scheduler.client import ServiceClient
    from slmtui.store import Store

    check_overrides(limit, timeout_s, data_dir)
    profile = load_profile(profile_path) if profile_path else embedded_default()
    gpus = detect_gpus()
    db_path = db if db is not None else paths.default_db_path()
    # Queued runs stay queued for the service; running runs of a dead scheduler are crashed.
    store = Store(db_path, keep_queued=True)
    scheduler = ServiceClient(db_path)
    scheduler.start()
    if not scheduler.attached and store.runs(["queued"]):
        scheduler.submit([])  # a queue left by a dead service (or a reboot): a new one runs it
    from slmtui.ui.app import SlmApp

    app = SlmApp(
        store=store,
        scheduler=scheduler,
        profile=profile,
        gpus=gpus,
        limit=limit,
        data_dir=str(Path(data_dir).expanduser().resolve()) if data_dir else None,
        timeout_s=timeout_s,
    )
    try:
        code = app.run()
    finally:
        scheduler.shutdown()  # detaches; the service's runs go on unless "stop runs" was chosen
        store.close()
    return code if code is not None else (app.return_code or 0)
