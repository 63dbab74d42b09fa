"""The Textual console. ``launch`` builds the engine (store, scheduler) and runs the app.

Importing this package imports nothing heavy: Textual and the engine load inside ``launch``.
"""

from __future__ import annotations

import os


def launch(
    profile_path: str | os.PathLike[str] | None,
    db: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> int:
    """Open the console on a profile (``None``: the embedded default); the exit code."""
    from slmtui import paths
    from slmtui.errors import UserError
    from slmtui.profile import embedded_default, load_profile
    from slmtui.scheduler import Scheduler, detect_gpus
    from slmtui.store import Store

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be an integer >= 1")
    profile = load_profile(profile_path) if profile_path else embedded_default()
    gpus = detect_gpus()
    store = Store(db if db is not None else paths.default_db_path())
    scheduler = Scheduler(store, inventory=gpus)
    from slmtui.ui.app import SlmApp

    app = SlmApp(store=store, scheduler=scheduler, profile=profile, gpus=gpus, limit=limit)
    try:
        code = app.run()
    finally:
        scheduler.shutdown()
        store.close()
    return code if code is not None else (app.return_code or 0)
