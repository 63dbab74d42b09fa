"""The Textual console. ``launch`` builds the engine (store, scheduler) and runs the app.

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
    from slmtui.scheduler import Scheduler, detect_gpus
    from slmtui.store import Store

    check_overrides(limit, timeout_s, data_dir)
    profile = load_profile(profile_path) if profile_path else embedded_default()
    gpus = detect_gpus()
    store = Store(db if db is not None else paths.default_db_path())
    scheduler = Scheduler(store, inventory=gpus)
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
        scheduler.shutdown()
        store.close()
    return code if code is not None else (app.return_code or 0)
