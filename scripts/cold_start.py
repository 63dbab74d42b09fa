"""Time the console's cold start: process start to first screen painted, and what it imported.

    python scripts/cold_start.py [--db PATH] [--profile PATH] [--runs N] [--json]

Each run is a fresh interpreter (``--child`` below) that builds the engine the way ``slmtui``
does (profile, GPU detection, store, a client of the store's scheduler service), runs the app
headless, and exits as soon as the first screen is painted. The time counts from the process's
creation (psutil), so interpreter start and every import are inside it. ``heavy_modules`` lists
torch / transformers / accelerate if the UI process ever loaded them (it must not:
tests/test_ui_boundary.py checks it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "accelerate")


def child(db: str, profile: str | None) -> None:
    """Open the console headless, quit after the first paint, print one JSON line."""
    import psutil

    created = psutil.Process().create_time()
    steps: dict[str, float] = {}
    t = time.perf_counter()
    from slmtui.profile import embedded_default, load_profile
    from slmtui.scheduler import detect_gpus
    from slmtui.scheduler.client import ServiceClient
    from slmtui.store import Store

    steps["import_engine_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from slmtui.ui.app import SlmApp

    steps["import_ui_s"] = time.perf_counter() - t

    class FirstPaint(SlmApp):
        def _painted(self) -> None:
            super()._painted()
            self.painted_at = time.time()
            self.exit(0)

    t = time.perf_counter()
    gpus = detect_gpus()
    store = Store(db, keep_queued=True)
    scheduler = ServiceClient(db)  # as the console: a client of the store's scheduler service
    scheduler.start()
    loaded = load_profile(profile) if profile else embedded_default()
    steps["engine_s"] = time.perf_counter() - t
    app = FirstPaint(store=store, scheduler=scheduler, profile=loaded, gpus=gpus)
    app.run(headless=True, size=(80, 24))
    scheduler.shutdown()
    store.close()
    result = {
        "first_paint_s": round(app.painted_at - created, 3),
        "app_init_to_paint_s": round(app.first_paint_s or 0.0, 3),
        **{k: round(v, 3) for k, v in steps.items()},
        "heavy_modules": sorted(m for m in HEAVY if m in sys.modules),
    }
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="results store (default: a fresh temporary one)")
    parser.add_argument("--profile", help="profile to open (default: the embedded one)")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to time")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or str(Path(tmp) / "cold-start.sqlite")
        if args.child:
            child(db, args.profile)
            return 0
        argv = [sys.executable, __file__, "--child", "--db", db]
        if args.profile:
            argv += ["--profile", args.profile]
        results = []
        for _ in range(args.runs):
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    paints = [r["first_paint_s"] for r in results]
    print(f"first paint over {len(paints)} cold starts: median {statistics.median(paints):.3f} s, ")
    print(f"  min {min(paints):.3f} s, max {max(paints):.3f} s")
    for key in ("import_engine_s", "import_ui_s", "engine_s", "app_init_to_paint_s"):
        print(f"  {key:<22} median {statistics.median(r[key] for r in results):.3f} s")
    heavy = sorted({m for r in results for m in r["heavy_modules"]})
    print(f"  heavy modules loaded: {', '.join(heavy) if heavy else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
