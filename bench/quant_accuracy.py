"""Issue 17's accuracy rows: ``profiles/quant.toml`` (full precision, int8 and int4 weight-only)
run headless on the dev items, through the product's own path (scheduler, workers, store).

On one H200 (torch 2.11, torchao 0.18 from its wheel; the GGUF files copied in, no hub)::

    PYTHONUNBUFFERED=1 python bench/quant_accuracy.py --data-dir ../shared/data \\
        --model smollm2-135m-instruct=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --model gemma-3-270m=/tmp/gemma-3-270m-q4_k_m.gguf --out "$OUT/quant_accuracy"

``--model SOURCE=PATH`` points the profile's catalog source at a local GGUF file; a model of
the profile without one is left out (said in the output). The store is ``OUT/quant.db``, so a
second call with the same ``--out`` resumes (stored runs are skipped) — the way to split the
sweep over two device calls. Written to ``--out``: the store, ``accuracy.md`` (Rank's Markdown:
each variant's accuracy change against the same model's full-precision run) and
``accuracy.json`` (every row with its stored run: weights, weight bytes, peak memory, speed).

Dry run on a CPU (int4 is refused there: torchao has no CPU kernel; ``--quantize none,int8``
keeps the CPU-capable variants)::

    python bench/quant_accuracy.py --device cpu --limit 2 --tasks arc_easy \\
        --quantize none,int8 --model smollm2-135m-instruct=PATH --out /tmp/qa
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "quant.toml"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def device_profile(args: argparse.Namespace, sources: dict[str, str]) -> tuple[str, list[str]]:
    """``profiles/quant.toml`` with local GGUF paths, the chosen tasks and variants."""
    profile = tomllib.loads(PROFILE.read_text())
    settings = dict(profile["settings"])
    if args.device == "cpu":
        settings["gpus"] = [0]
        settings["dtype"] = "float32"
    if args.limit:
        settings["limit"] = args.limit
    lines = [f'name = "{profile["name"]}-device"', "", "[settings]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    dropped = []
    variants = set(args.quantize.split(","))
    for model in profile["models"]:
        if model["source"] not in sources:
            dropped.append(f"{model['name']} · {model.get('quantize', 'none')}")
            continue
        if model.get("quantize", "none") not in variants:
            continue
        lines += ["", "[[models]]"]
        entry = dict(model, source=sources[model["source"]])
        lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
    tasks = args.tasks.split(",") if args.tasks else list(profile["tasks"])
    for task in tasks:
        lines += ["", f"[tasks.{task}]"]
    return "\n".join(lines) + "\n", dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="SOURCE=PATH")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", default="", help="comma-separated (default: the profile's)")
    parser.add_argument("--quantize", default="none,int8,int4")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    args = parser.parse_args(argv)
    sources = {}
    for item in args.model:
        source, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"--model {item!r}: SOURCE=PATH with an existing GGUF file")
        sources[source] = str(Path(path).resolve())
    text, dropped = device_profile(args, sources)
    args.out.mkdir(parents=True, exist_ok=True)
    profile_path = args.out / "quant-device.toml"
    profile_path.write_text(text)
    if dropped:
        print("left out (no local file):", ", ".join(dropped), flush=True)
    db = args.out / "quant.db"
    slmtui = [sys.executable, "-m", "slmtui"]
    run = [*slmtui, "run", str(profile_path), "--headless", "--db", str(db)]
    run += ["--data-dir", str(args.data_dir.resolve())]
    code = subprocess.call(run, cwd=ROOT)
    print(f"slmtui run exited {code}", flush=True)
    for fmt, name in (("markdown", "accuracy.md"), ("json", "accuracy.json")):
        report = [*slmtui, "report", "--db", str(db), "--format", fmt, "-o", str(args.out / name)]
        subprocess.call(report, cwd=ROOT)
    md = args.out / "accuracy.md"
    if md.is_file():
        print(re.sub(r"\n{3,}", "\n\n", md.read_text()), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
