#!/usr/bin/env python3
"""Multi-GPU benchmark: 2-GPU tensor parallel against 1 GPU, and two 1-GPU runs at once.

On a box with 2 GPUs (torch 2.11+, transformers 5.x; no hub: the model is built here)::

    python bench/multigpu.py --out "$OUT"

On a CPU, the same plumbing with a tiny model and gloo (what the tests run)::

    python bench/multigpu.py --dry-run --out /tmp/multigpu

What it does, each step in processes of its own (the orchestrator never touches CUDA):

1. builds a random-initialised Qwen2.5-1.5B from its real config (seeded; saved once under
   ``--work`` in bf16, every later process loads that directory);
2. greedy generation, 16 prompts x 128 random tokens -> 64 new tokens, one batch, bf16:
   on 1 GPU (the reference), then under torchrun on 2 GPUs with tensor parallelism, then
   data parallel (each GPU a replica and half the prompts); the same two in fp32 (TF32 off),
   where token identity is a fair demand;
3. compares every run with its reference: share of identical sequences and tokens,
   teacher-forced log-probs of the reference tokens (max / mean difference) and next-token
   agreement under teacher forcing, which does not compound a first divergence;
4. reports tokens/s total and per GPU, torch's peak memory per rank and NVML's per GPU
   (the job's processes and the whole device), and the energy counter over the window;
5. runs two 1-GPU runs through ``slmtui.scheduler.Scheduler`` and shows, from the workers'
   own clocks and GPU UUIDs, that they overlapped in time on different GPUs (if the
   scheduler cannot be imported it starts the two workers by hand and says so).

Output: ``multigpu.json`` (everything), ``multigpu.txt`` (the summary) and ``multigpu.log``
(every child's stderr) in ``--out``. NVLink multicast stays off in everything it starts.
Random weights give near-tied logits, so bf16 token agreement measures numerics, not
correctness (DESIGN.md); teacher-forced log-probs and fp32 tokens are the correctness check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""NVLink SHARP / multicast can take a shared host's GPUs down: off in every process."""

QWEN25_15B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
"""Qwen/Qwen2.5-1.5B's config.json (the base model), as published."""

TINY: dict[str, Any] = {
    **QWEN25_15B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
    "max_window_layers": 2,
    "sliding_window": 512,
    "vocab_size": 512,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "initializer_range": 0.2,
}
"""The dry run's stand-in: the same architecture, small enough for two CPU cores."""

MIB = 1024 * 1024


# -- the orchestrator ---------------------------------------------------------------------------


class Orchestrator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.logs = self.work / "logs"
        self.model_dir = self.work / ("tiny-qwen2" if args.dry_run else "qwen2.5-1.5b-random")
        self.env = child_env()
        self.report: dict[str, Any] = {
            "dry_run": args.dry_run,
            "settings": {
                "prompts": args.prompts,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "model": "tiny Qwen2 (dry run)" if args.dry_run else "Qwen2.5-1.5B, random init",
                "seed": args.seed,
                "multicast_env": NO_MULTICAST,
            },
            "steps": {},
            "errors": [],
        }

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.time()
        gpus = [] if self.args.dry_run else nvml_gpus()
        self.report["box"] = {"gpus": gpus, "versions": versions()}
        if not self.args.dry_run and len(gpus) < 2:
            self.report["errors"].append(f"needs 2 GPUs, NVML sees {len(gpus)}")
        else:
            self.step("build", self.build)
            self.step("generation", self.generation)
            self.step("scheduler", self.scheduler)
        self.report["wall_s"] = time.time() - started
        self.write()
        return 1 if self.report["errors"] else 0

    def step(self, name: str, fn: Any) -> None:
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # one failing step must not hide the others' results
            self.report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
        self.report["steps"][name] = round(time.time() - t0, 1)
        self.write()  # partial results survive a later timeout

    # -- steps ------------------------------------------------------------------------------

    def build(self) -> None:
        if (self.model_dir / "config.json").is_file() and self.args.reuse_model:
            return
        self.child("build", [*self.me(), "--role", "build", *self.common()], gpus="0")

    def generation(self) -> None:
        """Every run in its own processes; a failing run is reported and the rest go on."""
        runs: dict[str, dict[str, Any]] = {}
        self.report["runs"] = runs
        self.report["comparisons"] = comparisons = {}
        dtypes = ["float32"] if self.args.dry_run else ["bfloat16", "float32"]
        for dtype in dtypes:
            modes = ["single", "tp", "dp"] if dtype == dtypes[0] else ["single", "tp"]
            for mode in (m for m in modes if m in self.args.modes.split(",")):
                name = f"{mode}_{dtype}"
                ref = f"single_{dtype}"
                if mode != "single" and ref not in runs:
                    continue  # nothing to compare with
                try:
                    runs[name] = self.gen(name, mode, dtype, None if mode == "single" else ref)
                except Exception as exc:
                    self.report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                    continue
                if mode != "single":
                    comparisons[name] = compare_runs(runs[ref], runs[name])
                self.write()

    def gen(self, name: str, mode: str, dtype: str, ref: str | None) -> dict[str, Any]:
        result = self.work / f"{name}.json"
        result.unlink(missing_ok=True)
        argv = [*self.me(), "--role", "gen", "--parallel", mode, "--dtype", dtype]
        argv += ["--result", str(result), *self.common()]
        if ref is not None:
            argv += ["--reference", str(self.work / f"{ref}.json")]
        nproc = 1 if mode == "single" else 2
        if nproc > 1:
            argv = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(nproc),
                *argv[1:],
            ]
        self.child(name, argv, gpus="0" if nproc == 1 else "0,1")
        return json.loads(result.read_text())

    def scheduler(self) -> None:
        """Two 1-GPU runs at once: slmtui's own worker (on GPUs), then this script's worker."""
        if not self.args.dry_run:  # slmtui's worker needs CUDA for a 1-GPU run
            try:
                self.report["scheduler_real_worker"] = run_two_single_gpu_runs(self, "real")
            except Exception as exc:
                self.report["errors"].append(f"scheduler (real worker): {exc!r}")
            self.write()
        seconds = 6.0 if self.args.dry_run else self.args.sched_seconds  # room for a loaded CPU
        self.report["scheduler"] = run_two_single_gpu_runs(self, "bench", seconds)

    # -- children ---------------------------------------------------------------------------

    def me(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve())]

    def common(self) -> list[str]:
        argv = ["--model-dir", str(self.model_dir), "--prompts", str(self.args.prompts)]
        argv += ["--prompt-len", str(self.args.prompt_len)]
        argv += ["--new-tokens", str(self.args.new_tokens), "--seed", str(self.args.seed)]
        return argv + (["--dry-run"] if self.args.dry_run else [])

    def child(self, name: str, argv: list[str], *, gpus: str) -> None:
        env = {**self.env, "CUDA_VISIBLE_DEVICES": "" if self.args.dry_run else gpus}
        log = self.logs / f"{name}.log"
        print(
            f"[multigpu] {name}: {' '.join(argv[1:4])} ... (CUDA_VISIBLE_DEVICES={gpus})",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.time()
        with open(log, "w") as f:
            done = subprocess.run(
                argv,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=self.args.child_timeout_s,
                check=False,
            )
        print(
            f"[multigpu] {name}: exit {done.returncode} in {time.time() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} exited with {done.returncode}: {tail(log)}")

    # -- output -----------------------------------------------------------------------------

    def write(self) -> None:
        slim = json.loads(json.dumps(self.report, default=str))
        for run in slim.get("runs", {}).values():
            run.pop("tokens", None)
            run.pop("teacher_forced", None)
        (self.out / "multigpu.json").write_text(json.dumps(slim, indent=2))
        (self.out / "multigpu.txt").write_text(render(slim))
        with open(self.out / "multigpu.log", "w") as f:
            for log in sorted(self.logs.glob("*.log")):
                f.write(f"===== {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(NO_MULTICAST)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def tail(path: Path, lines: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- comparisons (pure) -------------------------------------------------------------------------


def compare_runs(ref: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """How far ``run`` is from ``ref`` on the same prompts (see the module docstring)."""
    a, b = ref["tokens"], run["tokens"]
    same_seq = sum(x == y for x, y in zip(a, b, strict=True))
    pairs = [(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)]
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(xs, ys, strict=False)) if x != y), None)
        for xs, ys in zip(a, b, strict=True)
    ]
    diverged = [i for i in first_diff if i is not None]
    tf_a, tf_b = ref["teacher_forced"], run["teacher_forced"]
    lp_diff = [
        abs(x - y)
        for ra, rb in zip(tf_a, tf_b, strict=True)
        for x, y in zip(ra["lp"], rb["lp"], strict=True)
    ]
    top1 = [
        (x == y, gap)
        for ra, rb in zip(tf_a, tf_b, strict=True)
        for x, y, gap in zip(ra["top1"], rb["top1"], ra["gap"], strict=True)
    ]
    flipped_gaps = [gap for same, gap in top1 if not same]
    all_gaps = [gap for _, gap in top1]
    return {
        "identical_sequences": same_seq,
        "sequences": len(a),
        "identical_sequence_share": same_seq / len(a),
        "identical_token_share": sum(x == y for x, y in pairs) / len(pairs),
        "median_first_divergence": statistics.median(diverged) if diverged else None,
        "tf_logprob_max_abs_diff": max(lp_diff),
        "tf_logprob_mean_abs_diff": statistics.fmean(lp_diff),
        "tf_next_token_agreement": sum(same for same, _ in top1) / len(top1),
        "ref_median_top2_gap": statistics.median(all_gaps),
        "flipped_max_ref_top2_gap": max(flipped_gaps) if flipped_gaps else None,
    }


def intervals_overlap(windows: Sequence[tuple[float, float]]) -> float:
    """Seconds during which every window was open (0 when they never all overlapped)."""
    start = max(w[0] for w in windows)
    end = min(w[1] for w in windows)
    return max(0.0, end - start)


# -- the scheduler step -------------------------------------------------------------------------


def run_two_single_gpu_runs(orch: Orchestrator, worker: str, seconds: float = 0.0) -> dict:
    """Two 1-GPU runs at once: through the Scheduler when it imports, else by hand.

    ``worker`` "real": the scheduler's own command (``python -m slmtui.worker``) on gsm8k's
    sample items; the measured window is known from the result (``measured_s``, ending at or
    before the result event). "bench": this script's worker, which reports its window's clock
    times and its GPU's UUID.
    """
    from slmtui.spec import ModelRef, RunSpec, TaskOptions

    model = ModelRef("qwen2.5-1.5b-random", str(orch.model_dir), "local")
    if worker == "real":
        options = TaskOptions(limit=32, num_fewshot=0, max_new_tokens=64)
        specs = [
            RunSpec(
                model=model,
                task="gsm8k",
                options=options,
                gpus=1,
                dtype="bfloat16",
                batch_size=bs,
                engine="plain",
                timeout_s=300.0,
            )
            for bs in (16, 8)  # two different run keys
        ]
    else:
        specs = [
            RunSpec(model=model, task=task, gpus=1, dtype="bfloat16", timeout_s=300.0)
            for task in ("imdb", "arc_easy")
        ]
    extra = ["--min-seconds", str(seconds), *orch.common()]
    try:
        from slmtui.scheduler import Scheduler, worker_command
        from slmtui.scheduler.gpus import Gpu
        from slmtui.store import Store
    except ImportError as exc:
        return by_hand(orch, specs, extra, f"slmtui.scheduler did not import ({exc})")

    def command(spec: RunSpec, run_id: str, gpu_ids: Sequence[int]) -> tuple[list[str], dict]:
        # The scheduler's own command, its environment kept (CUDA_VISIBLE_DEVICES, no
        # multicast); for "bench" the worker module is swapped for this script's worker.
        base = {**orch.env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        argv, env = worker_command(spec, run_id, gpu_ids, base_env=base)
        if worker == "real":
            return argv, env
        at = argv.index("slmtui.worker")
        argv = [
            *argv[: at - 1],
            str(Path(__file__).resolve()),
            "--role",
            "sched-worker",
            *argv[at + 1 :],
            *extra,
        ]
        if orch.args.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU stands in for the GPUs
            env["BENCH_FAKE_GPU"] = ",".join(map(str, gpu_ids))
        return argv, env

    inventory = (
        [Gpu(index=i, name="dry-run", total_mb=1000.0, free_mb=1000.0) for i in (0, 1)]
        if orch.args.dry_run
        else None
    )
    events: list[dict[str, Any]] = []
    result_t: dict[str, float] = {}

    def listen(event: Any) -> None:
        if event.type != "progress":
            events.append({"type": event.type, "run_id": event.run_id, "t": event.t})
        if event.type == "result":
            result_t[event.run_id] = event.t

    store = Store(orch.work / f"bench-{worker}.sqlite")
    scheduler = Scheduler(
        store,
        inventory=inventory,
        listener=listen,
        command_factory=command,
        logs_dir=orch.logs,
        handle_signals=False,
    )
    try:
        run_ids = scheduler.submit(specs)
        scheduler.start()
        if not scheduler.wait(timeout=orch.args.child_timeout_s):
            raise RuntimeError("the scheduler's runs did not end in time")
        states = {s.run_id: s for s in scheduler.snapshot()}
    finally:
        scheduler.shutdown()
        store.close()
    runs = []
    for run_id in run_ids:
        state = states[run_id]
        metrics = state.metrics or {}
        row = {
            "run_id": run_id,
            "status": state.status,
            "error": state.error.message if state.error else None,
            "scheduler_gpu_ids": list(state.gpu_ids),
            "launched_at": state.launched_at,
            "ended_at": state.ended_at,
            **{k: metrics.get(k) for k in SCHED_KEYS},
        }
        if worker == "real" and run_id in result_t and metrics.get("measured_s") is not None:
            row["window_ended_at"] = result_t[run_id]  # at or after the window's true end
            row["window_started_at"] = result_t[run_id] - metrics["measured_s"]
            row["cuda_visible_devices"] = ",".join(map(str, state.gpu_ids))
            row["gpu_name"] = (metrics.get("hardware") or {}).get("gpu_name")
            row["accuracy"] = metrics.get("accuracy")
            row["peak_mem_mb"] = metrics.get("peak_mem_mb")
        runs.append(row)
    how = "slmtui.scheduler.Scheduler + " + (
        "python -m slmtui.worker (gsm8k sample, plain engine)"
        if worker == "real"
        else "this script's worker"
    )
    return proof(runs, how, events)


SCHED_KEYS = (
    "cuda_visible_devices",
    "gpu_uuid",
    "gpu_name",
    "window_started_at",
    "window_ended_at",
    "measured_s",
    "tokens_per_s",
    "tokens_out",
    "iterations",
    "pid",
)


def by_hand(orch: Orchestrator, specs: list[Any], extra: list[str], why: str) -> dict[str, Any]:
    """Start the two workers ourselves (one per GPU) when the scheduler is not there."""
    procs = []
    for gpu, spec in enumerate(specs):
        env = {**orch.env, "CUDA_VISIBLE_DEVICES": "" if orch.args.dry_run else str(gpu)}
        if orch.args.dry_run:
            env["BENCH_FAKE_GPU"] = str(gpu)
        argv = [
            *orch.me(),
            "--role",
            "sched-worker",
            "--spec-json",
            spec.to_json(),
            "--run-id",
            f"by-hand-{gpu}",
            *extra,
        ]
        log = open(orch.logs / f"by-hand-{gpu}.log", "w")  # noqa: SIM115 (closed below)
        procs.append(
            (
                subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True),
                log,
                gpu,
            )
        )
    runs = []
    for proc, log, gpu in procs:
        out, _ = proc.communicate(timeout=orch.args.child_timeout_s)
        log.close()
        result = [json.loads(line) for line in out.splitlines() if '"type":"result"' in line]
        metrics = result[-1]["metrics"] if result else {}
        runs.append(
            {
                "run_id": f"by-hand-{gpu}",
                "status": "finished" if result else "failed",
                "error": None if result else f"exit {proc.returncode}",
                "scheduler_gpu_ids": [gpu],
                **{k: metrics.get(k) for k in SCHED_KEYS},
            }
        )
    return proof(runs, f"by hand: {why}", [])


def proof(runs: list[dict[str, Any]], how: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    finished = [r for r in runs if r["status"] == "finished" and r["window_started_at"]]
    windows = [(r["window_started_at"], r["window_ended_at"]) for r in finished]
    gpu_sets = [tuple(r["scheduler_gpu_ids"]) for r in runs]
    uuids = [r["gpu_uuid"] for r in finished]
    overlap = intervals_overlap(windows) if len(windows) == 2 else 0.0
    return {
        "how": how,
        "runs": runs,
        "events": events,
        "both_finished": len(finished) == 2,
        "different_gpus": len(set(gpu_sets)) == 2
        and (None in uuids or len(set(uuids)) == len(uuids)),
        "measured_windows_overlap_s": overlap,
        "concurrent": len(finished) == 2 and overlap > 0 and len(set(gpu_sets)) == 2,
    }


# -- NVML over the job's GPUs -------------------------------------------------------------------


def nvml_gpus() -> list[dict[str, Any]]:
    """Every GPU NVML sees: index, name, uuid, memory (MiB). Empty without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append(
                {
                    "index": i,
                    "name": _text(pynvml.nvmlDeviceGetName(h)),
                    "uuid": _text(pynvml.nvmlDeviceGetUUID(h)),
                    "total_mb": pynvml.nvmlDeviceGetMemoryInfo(h).total / MIB,
                }
            )
        return out
    except Exception:
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSampler:
    """Peaks of device memory, of the job's processes' memory and of power, per GPU.

    Counts every process of the job (all torchrun ranks) on every GPU of the job; energy is the
    total-energy counter's delta over ``begin``/``end`` (device-wide).
    """

    def __init__(self, indices: Sequence[int], pids: Sequence[int], period_s: float = 0.05) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.indices = list(indices)
        self.pids = set(pids)
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        self.period_s = period_s
        self.peak_device_mb = [0.0] * len(self.handles)
        self.peak_job_mb: list[float | None] = [None] * len(self.handles)
        self.peak_power_w = [0.0] * len(self.handles)
        self.pids_seen: set[int] = set()
        self.samples = 0
        self.energy_start_mj: list[int | None] = [None] * len(self.handles)
        self.energy_j: list[float | None] = [None] * len(self.handles)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> NvmlSampler:
        self._thread.start()
        return self

    def begin(self) -> None:
        self.energy_start_mj = [self._energy(h) for h in self.handles]

    def end(self) -> None:
        for n, h in enumerate(self.handles):
            now, start = self._energy(h), self.energy_start_mj[n]
            self.energy_j[n] = (
                (now - start) / 1000.0 if now is not None and start is not None else None
            )

    def _energy(self, handle: Any) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period_s)

    def _sample(self) -> None:
        nv = self.nvml
        self.samples += 1
        for n, h in enumerate(self.handles):
            with contextlib.suppress(Exception):
                self.peak_device_mb[n] = max(
                    self.peak_device_mb[n], nv.nvmlDeviceGetMemoryInfo(h).used / MIB
                )
            with contextlib.suppress(Exception):
                self.peak_power_w[n] = max(
                    self.peak_power_w[n], nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                )
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:
                continue
            mine = [p for p in procs if p.pid in self.pids]
            self.pids_seen.update(p.pid for p in mine)
            if mine:
                used = sum((p.usedGpuMemory or 0) for p in mine) / MIB
                self.peak_job_mb[n] = max(self.peak_job_mb[n] or 0.0, used)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sample()
        out = [
            {
                "nvml_index": index,
                "peak_job_process_mb": self.peak_job_mb[n],
                "peak_device_used_mb": self.peak_device_mb[n],
                "peak_power_w": self.peak_power_w[n],
                "window_energy_j": self.energy_j[n],
            }
            for n, index in enumerate(self.indices)
        ]
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()
        return out


def visible_indices() -> list[int]:
    """The NVML indices this process may use (CUDA_VISIBLE_DEVICES as set by the orchestrator)."""
    text = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [int(t) for t in text.split(",") if t.strip().isdigit()]


# -- roles run in child processes ---------------------------------------------------------------


def role_build(args: argparse.Namespace) -> int:
    """Build the seeded random model once and save it (bf16 on GPU; fp32 for the dry run)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**(TINY if args.dry_run else QWEN25_15B))
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    save_dtype = torch.float32 if args.dry_run else torch.bfloat16
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.to(save_dtype).save_pretrained(args.model_dir)
    save_tokenizer(args.model_dir, config.vocab_size)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n / 1e9:.3f} B parameters in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def save_tokenizer(directory: str, vocab_size: int) -> None:
    """A byte-level tokenizer over the whole vocabulary (slmtui's worker needs one).

    Qwen2's byte alphabet with no merges (one token per byte of a prompt); the other ids
    decode to words "w<id>", so a random model's output never holds a task's stop string.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab |= {f"w{i}": i for i in range(len(vocab), vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(directory)


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, the same in every process (never the special ids at the top)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(1, min(vocab, 151643), (n, length), generator=g).tolist()


def role_gen(args: argparse.Namespace) -> int:
    """One generation run (alone or one torchrun rank); rank 0 writes ``--result``."""
    import torch

    from slmtui.worker import distributed as wd

    ctx = wd.init_distributed(wd.dist_context())
    wd.quiet_non_primary(ctx)
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    kind = "tp" if args.parallel == "tp" else "dp"
    t0 = time.perf_counter()
    model, note = wd.load_parallel(args.model_dir, ctx=ctx, parallel=kind, dtype=dtype)
    if model is None:
        wd.finish_distributed()
        return 0
    load_s = time.perf_counter() - t0
    device = model.device
    vocab = model.config.vocab_size
    prompts = make_prompts(args.prompts, args.prompt_len, vocab, args.seed)
    mine = wd.shard_items(list(range(len(prompts))), ctx, kind)
    batch = torch.tensor([prompts[i] for i in mine], device=device)
    gen = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}

    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=4, **gen)
        warmup_s = time.perf_counter() - t0
    pids = wd.all_ranks(os.getpid(), ctx)
    sampler = None
    if ctx.is_primary and visible_indices() and not args.dry_run:
        try:
            sampler = NvmlSampler(visible_indices(), pids).start()
        except Exception as exc:
            print(f"NVML sampler did not start: {exc!r}", file=sys.stderr)
    if sampler:
        sampler.begin()
    with torch.no_grad(), wd.measured_window(ctx) as window:
        out = model.generate(
            batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.new_tokens, **gen
        )
    if sampler:
        sampler.end()
    tokens = out[:, args.prompt_len :].tolist()
    timing = wd.reduce_timing(
        window.seconds,
        ctx,
        kind,
        tokens_out=sum(map(len, tokens)),
        tokens_in=batch.numel(),
        samples=len(tokens),
    )

    reference = json.loads(Path(args.reference).read_text())["tokens"] if args.reference else None
    ref_tokens = [reference[i] for i in mine] if reference else tokens
    forced = teacher_forced(
        model, [prompts[i] + t for i, t in zip(mine, ref_tokens, strict=True)], args.prompt_len
    )
    gathered = wd.gather_results(list(zip(tokens, forced, strict=True)), ctx, kind)
    memory = wd.all_ranks(
        {"rank": ctx.rank, "pid": os.getpid(), "device": str(device), **wd.rank_memory_mb()}, ctx
    )
    nvml = sampler.stop() if sampler else []
    if ctx.is_primary:
        assert gathered is not None
        result = {
            "mode": args.parallel,
            "dtype": args.dtype,
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "note": note,
            "load_s": load_s,
            "warmup_s": warmup_s,
            "measured_s": timing.measured_s,
            "rank_seconds": timing.rank_seconds,
            "tokens_out": timing.tokens_out,
            "gpus": timing.devices,
            "tokens_per_s": timing.tokens_per_s,
            "tokens_per_s_per_gpu": timing.tokens_per_s_per_gpu,
            "ms_per_token": timing.ms_per_token,
            "ms_per_step": 1000.0 * timing.measured_s / args.new_tokens,
            "memory_per_rank": memory,
            "torch_peak_allocated_mb_total": _sum(m["torch_peak_allocated_mb"] for m in memory),
            "torch_peak_reserved_mb_total": _sum(m["torch_peak_reserved_mb"] for m in memory),
            "nvml_per_gpu": nvml,
            "nvml_job_mb_total": _sum(g["peak_job_process_mb"] for g in nvml) if nvml else None,
            "nvml_device_mb_total": _sum(g["peak_device_used_mb"] for g in nvml) if nvml else None,
            "window_energy_j_total": _sum(g["window_energy_j"] for g in nvml) if nvml else None,
            "tokens": [t for t, _ in gathered],
            "teacher_forced": [f for _, f in gathered],
        }
        Path(args.result).write_text(json.dumps(result))
    wd.finish_distributed()
    return 0


def _sum(values: Any) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def teacher_forced(model: Any, seqs: list[list[int]], prompt_len: int) -> list[dict[str, list]]:
    """Per continuation position: log-prob of the given token, the model's top-1, top-2 gap."""
    import torch

    out: list[dict[str, list]] = []
    for start in range(0, len(seqs), 4):
        ids = torch.tensor(seqs[start : start + 4], device=model.device)
        with torch.no_grad():
            logits = model(ids).logits
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        logp = torch.log_softmax(logits[:, prompt_len - 1 : -1].float(), dim=-1)
        target = ids[:, prompt_len:].to(logp.device)
        chosen = logp.gather(-1, target[..., None])[..., 0]
        top = logp.topk(2, dim=-1)
        gap = top.values[..., 0] - top.values[..., 1]
        for r in range(ids.shape[0]):
            out.append(
                {
                    "lp": chosen[r].tolist(),
                    "top1": top.indices[r, :, 0].tolist(),
                    "gap": gap[r].tolist(),
                }
            )
    return out


def role_sched_worker(args: argparse.Namespace) -> int:
    """A worker the scheduler can run: protocol events on stdout, generation on its one GPU.

    It generates the benchmark batch again and again for at least ``--min-seconds`` so two
    runs started together have measured windows long enough to show they overlapped.
    """
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries events only
    from slmtui.protocol import RunFailed, RunFinished, RunProgress, RunStarted

    def emit(event: Any) -> None:
        events.write(event.to_json() + "\n")
        events.flush()

    spec = json.loads(args.spec_json)
    visible = os.environ.get("BENCH_FAKE_GPU") or os.environ.get("CUDA_VISIBLE_DEVICES", "")
    emit(RunStarted(args.run_id, spec=spec, pid=os.getpid(), hardware={"cuda_visible": visible}))
    try:
        import torch
        from transformers import AutoModelForCausalLM

        emit(RunProgress(args.run_id, phase="loading"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device).eval()
        prompts = make_prompts(args.prompts, args.prompt_len, model.config.vocab_size, args.seed)
        batch = torch.tensor(prompts, device=device)
        gen = {
            "do_sample": False,
            "eos_token_id": None,
            "pad_token_id": 0,
            "attention_mask": torch.ones_like(batch),
        }
        emit(RunProgress(args.run_id, phase="warmup"))
        with torch.no_grad():
            model.generate(batch, max_new_tokens=4, **gen)
        if cuda:
            torch.cuda.synchronize()
        started_at, t0 = time.time(), time.perf_counter()
        iterations = tokens_out = 0
        while iterations == 0 or time.perf_counter() - t0 < args.min_seconds:
            with torch.no_grad():
                out = model.generate(batch, max_new_tokens=args.new_tokens, **gen)
            iterations += 1
            tokens_out += out[:, args.prompt_len :].numel()
            elapsed = time.perf_counter() - t0
            emit(
                RunProgress(
                    args.run_id,
                    phase="measuring",
                    done=iterations,
                    elapsed_s=elapsed,
                    tokens_per_s=tokens_out / elapsed,
                )
            )
        if cuda:
            torch.cuda.synchronize()
        measured_s, ended_at = time.perf_counter() - t0, time.time()
        uuid = name = None
        if cuda:
            props = torch.cuda.get_device_properties(0)
            uuid, name = str(getattr(props, "uuid", "")) or None, props.name
        metrics = {
            "cuda_visible_devices": visible,
            "gpu_uuid": uuid if cuda else f"fake-{visible}",
            "gpu_name": name,
            "window_started_at": started_at,
            "window_ended_at": ended_at,
            "measured_s": measured_s,
            "tokens_out": tokens_out,
            "tokens_per_s": tokens_out / measured_s,
            "throughput": tokens_out / measured_s,
            "throughput_unit": "tokens/s",
            "iterations": iterations,
            "pid": os.getpid(),
            "note": "bench worker: random-weight model, no task scoring",
        }
        emit(RunFinished(args.run_id, metrics=metrics))
        return 0
    except Exception as exc:
        emit(RunFailed(args.run_id, reason="crashed", message=f"{type(exc).__name__}: {exc}"))
        raise


# -- the text report ----------------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    lines = [
        "# Multi-GPU benchmark" + (" (DRY RUN: tiny model on the CPU)" if r["dry_run"] else "")
    ]
    s = r["settings"]
    lines.append(
        f"model: {s['model']}; {s['prompts']} prompts x {s['prompt_len']} tokens -> "
        f"{s['new_tokens']} new tokens, greedy, one batch; plain HF generate"
    )
    box = r.get("box", {})
    gpus = box.get("gpus") or []
    if gpus:
        lines.append(f"GPUs: {len(gpus)} x {gpus[0]['name']}; versions: {box.get('versions')}")
    runs = r.get("runs", {})
    if runs:
        lines += [
            "",
            "| run | GPUs | tokens/s total | tokens/s per GPU | ms per step | "
            "torch peak alloc MB per GPU | NVML job MB per GPU | NVML job MB total | "
            "energy J | note |",
            "|" + "---|" * 10,
        ]
        for name, run in runs.items():
            per_gpu = (
                "/".join(
                    f"{m['torch_peak_allocated_mb']:.0f}"
                    for m in run["memory_per_rank"]
                    if m["torch_peak_allocated_mb"] is not None
                )
                or "-"
            )
            nv = (
                "/".join(
                    f"{g['peak_job_process_mb']:.0f}"
                    for g in run["nvml_per_gpu"]
                    if g["peak_job_process_mb"] is not None
                )
                or "-"
            )
            lines.append(
                f"| {name} | {run['gpus']} | {_f(run['tokens_per_s'])} | "
                f"{_f(run['tokens_per_s_per_gpu'])} | {_f(run['ms_per_step'])} | "
                f"{per_gpu} | {nv} | "
                f"{_f(run['nvml_job_mb_total'])} | {_f(run['window_energy_j_total'])} | "
                f"{run['note'] or ''} |"
            )
    comps = r.get("comparisons", {})
    if comps:
        lines += [
            "",
            "| run vs 1 GPU | identical sequences | identical tokens | "
            "TF next-token agreement | TF logprob max / mean abs diff | "
            "ref median top-2 gap | largest ref gap among flips |",
            "|" + "---|" * 7,
        ]
        for name, c in comps.items():
            lines.append(
                f"| {name} | {c['identical_sequences']}/{c['sequences']} | "
                f"{c['identical_token_share']:.1%} | {c['tf_next_token_agreement']:.1%} | "
                f"{c['tf_logprob_max_abs_diff']:.4f} / {c['tf_logprob_mean_abs_diff']:.5f} | "
                f"{c['ref_median_top2_gap']:.4f} | {_f(c['flipped_max_ref_top2_gap'], 4)} |"
            )
    for key in ("scheduler_real_worker", "scheduler"):
        lines += _render_sched(r.get(key))
    lines += ["", f"steps (s): {r.get('steps')}; wall {r.get('wall_s', 0):.0f} s"]
    if r.get("errors"):
        lines += ["", "ERRORS:", *[f"- {e}" for e in r["errors"]]]
    return "\n".join(lines) + "\n"


def _render_sched(sched: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    if sched:
        lines += [
            "",
            f"Two 1-GPU runs ({sched['how']}): concurrent = {sched['concurrent']}, "
            f"different GPUs = {sched['different_gpus']}, measured windows overlap "
            f"{sched['measured_windows_overlap_s']:.1f} s",
        ]
        t0 = min(
            (run.get("launched_at") or run["window_started_at"] or 0.0) for run in sched["runs"]
        )
        for run in sched["runs"]:
            lines.append(
                f"- {run['run_id']}: {run['status']} on scheduler GPUs {run['scheduler_gpu_ids']} "
                f"(CUDA_VISIBLE_DEVICES={run['cuda_visible_devices']}, uuid {run['gpu_uuid']}), "
                f"measured window {_at(run['window_started_at'], t0)}..."
                f"{_at(run['window_ended_at'], t0)} s after the first launch, "
                f"{_f(run['tokens_per_s'])} tokens/s"
                + (f", error: {run['error']}" if run.get("error") else "")
            )
    return lines


def _at(t: float | None, t0: float) -> str:
    return "-" if t is None else f"{t - t0:.1f}"


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def versions() -> dict[str, str | None]:
    """Library versions, read without importing torch into the orchestrator."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "nvidia-ml-py"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# -- entry --------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="report folder")
    p.add_argument("--work", default="/tmp/slmtui-multigpu", help="model and scratch folder")
    p.add_argument("--dry-run", action="store_true", help="tiny model, CPU, gloo")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sched-seconds",
        type=float,
        default=15.0,
        help="minimum measured seconds of each scheduler run",
    )
    p.add_argument("--child-timeout-s", type=float, default=300.0)
    p.add_argument("--modes", default="single,tp,dp", help="generation runs to make")
    p.add_argument("--reuse-model", action="store_true", help="keep a model already in --work")
    # Internal: the child processes' roles.
    p.add_argument(
        "--role", choices=("orchestrate", "build", "gen", "sched-worker"), default="orchestrate"
    )
    p.add_argument("--model-dir")
    p.add_argument("--parallel", choices=("single", "tp", "dp"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--result")
    p.add_argument("--reference")
    p.add_argument("--spec-json")
    p.add_argument("--run-id")
    p.add_argument("--min-seconds", type=float, default=0.0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    os.environ.update(NO_MULTICAST)
    if args.role == "build":
        return role_build(args)
    if args.role == "gen":
        return role_gen(args)
    if args.role == "sched-worker":
        return role_sched_worker(args)
    if args.dry_run and args.prompts == 16:
        args.prompts, args.prompt_len, args.new_tokens = 6, 8, 6
    return Orchestrator(args).run()


if __name__ == "__main__":
    sys.exit(main())
