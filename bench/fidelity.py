"""Measurement fidelity: do slmtui's reported numbers agree with independent measurements?

On a random-initialised Qwen2.5-0.5B architecture (bf16; config below, no hub) this script runs the
real worker code path (``slmtui.worker.runner.run_spec``: task data, plain engine, measured window,
telemetry) on a local checkpoint it writes first, and checks:

1. tokens/s and ms/token reported by slmtui vs CUDA events recorded around the same generation
   and a token count taken from the model's forward calls (each forward of a batch of one yields
   one token): within +-3%.
2. Sampler overhead: the plain engine's tokens/s with the sampler on vs off (alternating, several
   repeats, medians): <= 1%.
3. Peak memory: slmtui's reported ``peak_mem_mb`` vs NVML polled every 20 ms from another process
   over the same run (per-process when NVML sees our PID, else the device's used memory, the same
   source slmtui reports): within +-5%.
4. Energy: slmtui's window energy vs the same NVML counter read by the other process right after
   slmtui's own reads at the window's ends: within +-2%; and how far mean power x time lies.

The independent measurements hook into the worker from outside (wrapped ``TelemetrySampler``
window methods, a wrapped ``PlainEngine.generate``, a forward hook); nothing in slmtui changes.
Without a GPU the CUDA, NVML and energy parts are skipped: ``--tiny`` runs the plumbing on a CPU.

    PYTHONUNBUFFERED=1 python bench/fidelity.py --out results/   # on the GPU box
    python bench/fidelity.py --tiny --out /tmp/fid               # CPU dry run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN25_05B: dict[str, Any] = {
    # Qwen/Qwen2.5-0.5B config.json; eos/bos removed so every generation runs its full length.
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": None,
    "eos_token_id": None,
}
TINY: dict[str, Any] = {
    **QWEN25_05B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_window_layers": 2,
}
POLL_PERIOD_S = 0.02
LIMITS = {"tokens_pct": 3.0, "overhead_pct": 1.0, "memory_pct": 5.0, "energy_pct": 2.0}


# ---- checkpoint ---------------------------------------------------------------------------------


def build_checkpoint(directory: Path, tiny: bool) -> None:
    """A random-initialised model (seed 0, bf16) and a byte-level tokenizer over its vocabulary.

    The tokenizer has Qwen2's byte alphabet and no merges (one token per byte of a prompt); the
    other ids decode to words "w<id>", so a random model's output holds no task's stop string.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config_dict = dict(TINY if tiny else QWEN25_05B)
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(directory)
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab |= {f"w{i}": i for i in range(len(vocab), config.vocab_size - 1)}
    vocab["<|endoftext|>"] = config.vocab_size - 1
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(directory)


# ---- the other process: NVML polled independently -----------------------------------------------


def poll(pid: int, nvml_index: int) -> None:
    """Poll NVML every 20 ms; on 'mark NAME' read the energy counter and report the segment."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
    proc_max = dev_max = 0.0
    n_polls = 0
    pid_seen = False
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_PERIOD_S)
        if ready:
            line = sys.stdin.readline().split()
            if not line or line[0] == "quit":
                return
            energy_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            t = time.monotonic()
            print(
                json.dumps(
                    {
                        "mark": line[1],
                        "energy_mj": energy_mj,
                        "t": t,
                        "process_max_mb": proc_max,
                        "device_max_mb": dev_max,
                        "pid_seen": pid_seen,
                        "n_polls": n_polls,
                    }
                ),
                flush=True,
            )
            proc_max = dev_max = 0.0
            n_polls = 0
            continue
        own = [
            p.usedGpuMemory
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == pid and p.usedGpuMemory is not None
        ]
        if own:
            pid_seen = True
            proc_max = max(proc_max, sum(own) / 2**20)
        dev_max = max(dev_max, pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
        n_polls += 1


class Poller:
    """The polling process, driven through its stdin."""

    def __init__(self, nvml_index: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--poll", str(os.getpid()), str(nvml_index)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.marks: dict[str, dict[str, Any]] = {}

    def mark(self, name: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"mark {name}\n")
        self.proc.stdin.flush()
        self.marks[name] = json.loads(self.proc.stdout.readline())
        return self.marks[name]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


# ---- measurement hooks --------------------------------------------------------------------------


class Hooks:
    """Independent timing of slmtui's measured window: CUDA events and counted forward calls.

    ``TelemetrySampler.begin_window``/``end_window`` are wrapped so the other process reads the
    energy counter right after slmtui's own reads; the plain engine's ``generate`` is wrapped so
    CUDA events bracket the measured generation and a forward hook counts the model's calls.
    """

    def __init__(self, poller: Poller | None, cuda: bool) -> None:
        self.poller = poller
        self.cuda = cuda
        self.measuring = False
        self.forwards = 0
        self.rows = 0
        self.events: tuple[Any, Any] | None = None
        self.windows: list[dict[str, Any]] = []
        self.sampler_report: dict[str, Any] | None = None

    def install(self) -> None:
        import torch

        from slmtui.telemetry import TelemetrySampler
        from slmtui.worker.engines.plain import PlainEngine

        hooks = self
        begin, end, stop = (
            TelemetrySampler.begin_window,
            TelemetrySampler.end_window,
            TelemetrySampler.stop,
        )
        generate = PlainEngine.generate

        def begin_window(sampler: Any, name: str) -> None:
            begin(sampler, name)
            hooks.measuring = True
            if hooks.poller:
                hooks.poller.mark(f"begin:{name}")

        def end_window(sampler: Any, name: str) -> dict[str, Any]:
            entry = end(sampler, name)
            hooks.measuring = False
            if hooks.poller:
                hooks.poller.mark(f"end:{name}")
            hooks.windows.append({"name": name, **entry})
            return entry

        def stop_sampler(sampler: Any) -> dict[str, Any]:
            hooks.sampler_report = stop(sampler)
            return hooks.sampler_report

        def counted_generate(engine: Any, requests: Any) -> Any:
            if not hooks.measuring:
                yield from generate(engine, requests)
                return

            def count(module: Any, args: Any, kwargs: Any, output: Any) -> None:
                hooks.forwards += 1
                ids = kwargs.get("input_ids", args[0] if args else None)
                hooks.rows += 1 if ids is None else int(ids.shape[0])

            handle = engine.model.register_forward_hook(count, with_kwargs=True)
            start_event = end_event = None
            if hooks.cuda:
                start_event = torch.cuda.Event(enable_timing=True)
                end_event = torch.cuda.Event(enable_timing=True)
                start_event.record()
            try:
                yield from generate(engine, requests)
            finally:
                if end_event is not None:
                    end_event.record()
                    hooks.events = (start_event, end_event)
                handle.remove()

        if not self.cuda:
            # The runner samples nothing on a CPU run; a GPU-less sampler gives the dry run windows.
            from slmtui.worker import runner

            def cpu_sampler(cls: Any, gpus: int) -> Any:
                sampler = TelemetrySampler([], os.getpid())
                sampler.start()
                return cls(sampler)

            runner.Telemetry.start = classmethod(cpu_sampler)  # type: ignore[method-assign,assignment]
        TelemetrySampler.begin_window = begin_window  # type: ignore[method-assign]
        TelemetrySampler.end_window = end_window  # type: ignore[method-assign]
        TelemetrySampler.stop = stop_sampler  # type: ignore[method-assign]
        PlainEngine.generate = counted_generate  # type: ignore[method-assign]

    def event_seconds(self) -> float | None:
        if self.events is None:
            return None
        import torch

        torch.cuda.synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1000


# ---- parts ----------------------------------------------------------------------------------


def worker_run(
    checkpoint: Path, gpus: int, limit: int, new_tokens: int, hooks: Hooks
) -> dict[str, Any]:
    """slmtui's worker code path on the checkpoint: gsm8k sample data, plain engine, batch 1."""
    from slmtui.spec import ModelRef, RunSpec, TaskOptions
    from slmtui.worker.runner import run_spec

    spec = RunSpec(
        model=ModelRef(name="qwen2.5-0.5b-random", source=str(checkpoint), kind="local"),
        task="gsm8k",
        options=TaskOptions(limit=limit, num_fewshot=0, max_new_tokens=new_tokens),
        gpus=gpus,
        dtype="bfloat16",
        batch_size=1,
        engine="plain",
    )
    events: list[Any] = []
    metrics = run_spec(spec, "fidelity", events.append)
    progress = [e for e in events if e.type == "progress" and e.telemetry]
    metrics["_progress_telemetry_events"] = len(progress)
    return metrics


def overhead_ab(
    checkpoint: Path,
    gpus: int,
    repeats: int,
    n_requests: int,
    new_tokens: int,
    period_s: float,
    engine_name: str = "plain",
    batch_size: int = 1,
) -> dict[str, Any]:
    """An engine's tokens/s with the sampler running vs not, in pairs of alternating order.

    Each pair runs the same generation without and with a sampler; the overhead is 1 - the
    median of the pairs' on/off ratios (pairing cancels the host's slow drift). The sampler's
    duty cycle (wall time inside ``_sample`` per period, GIL mostly held) bounds the cost too.
    ``plain`` at batch 1 is host-bound (Python per token: its rate swings by tens of percent);
    ``fast`` replays CUDA graphs and is GPU-bound, so its repeats are steady enough to resolve 1%.
    """
    import torch

    from slmtui.spec import ModelRef
    from slmtui.tasks.base import GenerateRequest
    from slmtui.telemetry import TelemetrySampler
    from slmtui.worker.engines import get_engine
    from slmtui.worker.loading import load_model

    ref = ModelRef(name="qwen2.5-0.5b-random", source=str(checkpoint), kind="local")
    loaded = load_model(ref, dtype="bfloat16", gpus=gpus)
    engine = get_engine(engine_name)(loaded.model, loaded.tokenizer, batch_size=batch_size)
    prompt = " ".join(f"w{(i * 7919) % 5000 + 300}" for i in range(32))
    requests = [GenerateRequest(prompt, new_tokens, ()) for _ in range(n_requests)]
    engine.warmup(requests[:batch_size], [])
    cuda = loaded.device.type == "cuda"
    sample_s: list[float] = []
    original_sample = TelemetrySampler._sample

    def timed_sample(sampler: Any) -> None:
        started = time.perf_counter()
        original_sample(sampler)
        sample_s.append(time.perf_counter() - started)

    TelemetrySampler._sample = timed_sample  # type: ignore[method-assign]

    def once(sampled: bool) -> float:
        sampler = TelemetrySampler(list(range(gpus)), os.getpid(), period_s) if sampled else None
        if sampler:
            sampler.start()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        tokens = sum(c.tokens_out for c in engine.generate(requests))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if sampler:
            sampler.stop()
        return tokens / seconds

    once(False)  # full-length warm-up: allocator, kernels, caches
    once(True)
    sample_s.clear()
    on: list[float] = []
    off: list[float] = []
    for r in range(repeats):
        for sampled in (r % 2 == 0, r % 2 == 1):
            (on if sampled else off).append(once(sampled))
    TelemetrySampler._sample = original_sample  # type: ignore[method-assign]
    ratios = sorted(a / b for a, b in zip(on, off, strict=True))
    mean_sample_s = statistics.mean(sample_s) if sample_s else None
    return {
        "engine": engine.name,
        "batch_size": batch_size,
        "period_s": period_s,
        "pairs": repeats,
        "requests_per_run": n_requests,
        "new_tokens": new_tokens,
        "tokens_per_s_on": on,
        "tokens_per_s_off": off,
        "median_on": statistics.median(on),
        "median_off": statistics.median(off),
        "overhead_pct": 100 * (1 - statistics.median(ratios)),
        "overhead_of_medians_pct": 100 * (1 - statistics.median(on) / statistics.median(off)),
        "pair_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
        "spread_off_pct": 100 * (max(off) - min(off)) / statistics.median(off),
        "samples_timed": len(sample_s),
        "sample_mean_ms": None if mean_sample_s is None else 1000 * mean_sample_s,
        "sample_max_ms": 1000 * max(sample_s) if sample_s else None,
        "duty_cycle_pct": None if mean_sample_s is None else 100 * mean_sample_s / period_s,
    }


def pct(reported: float | None, reference: float | None) -> float | None:
    if reported is None or not reference:
        return None
    return 100 * (reported - reference) / reference


def compare(
    metrics: dict[str, Any], hooks: Hooks, poller: Poller | None, cuda: bool
) -> dict[str, Any]:
    """The checks of the module docstring, from the worker's metrics and the hooks' records."""
    out: dict[str, Any] = {}
    seconds = hooks.event_seconds() if cuda else None
    tokens = hooks.rows if hooks.rows else None
    out["timing"] = {
        "reported_tokens_per_s": metrics.get("tokens_per_s"),
        "reported_ms_per_token": metrics.get("ms_per_token"),
        "reported_tokens_out": metrics.get("tokens_out"),
        "reported_measured_s": metrics.get("measured_s"),
        "forward_calls": hooks.forwards,
        "independent_tokens": tokens,
        "cuda_event_s": seconds,
        "independent_tokens_per_s": tokens / seconds if tokens and seconds else None,
        "independent_ms_per_token": 1000 * seconds / tokens if tokens and seconds else None,
    }
    t = out["timing"]
    t["tokens_per_s_diff_pct"] = pct(t["reported_tokens_per_s"], t["independent_tokens_per_s"])
    t["ms_per_token_diff_pct"] = pct(t["reported_ms_per_token"], t["independent_ms_per_token"])
    report = hooks.sampler_report or {}
    if poller is not None:
        # every mark closes a segment: the run is the segments after run_begin, up to run_end
        names = list(poller.marks)
        segments = [poller.marks[n] for n in names[names.index("run_begin") + 1 :]]
        run = {
            "process_max_mb": max(m["process_max_mb"] for m in segments),
            "device_max_mb": max(m["device_max_mb"] for m in segments),
            "pid_seen": any(m["pid_seen"] for m in segments),
            "n_polls": sum(m["n_polls"] for m in segments),
        }
        source = metrics.get("mem_source")
        reference = run["process_max_mb"] if source == "nvml_process" else None
        if source == "nvml_device":
            reference = run["device_max_mb"]
        out["memory"] = {
            "reported_peak_mem_mb": metrics.get("peak_mem_mb"),
            "mem_source": source,
            "torch_peak_reserved_mb": metrics.get("torch_peak_reserved_mb"),
            "torch_peak_allocated_mb": metrics.get("torch_peak_allocated_mb"),
            "poller_process_max_mb": run["process_max_mb"],
            "poller_device_max_mb": run["device_max_mb"],
            "poller_pid_seen": run["pid_seen"],
            "poller_polls": run["n_polls"],
            "diff_pct": pct(metrics.get("peak_mem_mb"), reference),
        }
        window = hooks.windows[-1] if hooks.windows else {}
        begin = poller.marks.get(f"begin:{window.get('name')}")
        end = poller.marks.get(f"end:{window.get('name')}")
        poller_j = (end["energy_mj"] - begin["energy_mj"]) / 1000 if begin and end else None
        reported_j = metrics.get("energy_j")
        if reported_j is None:
            reported_j = window.get("energy_j")
        out["energy"] = {
            "window": window.get("name"),
            "reported_energy_j": reported_j,
            "energy_source": window.get("source"),
            "flagged": window.get("flagged"),
            "window_s": window.get("duration_s"),
            "poller_energy_j": poller_j,
            "poller_window_s": end["t"] - begin["t"] if begin and end else None,
            "diff_pct": pct(reported_j, poller_j),
            "power_integral_j": window.get("power_integral_j"),
            "power_mean_w": window.get("power_mean_w"),
            "power_integral_vs_counter_pct": pct(window.get("power_integral_j"), poller_j),
        }
    out["sampler"] = {
        k: report.get(k)
        for k in (
            "gpu",
            "mem_source",
            "peak_mem_mb",
            "n_samples",
            "gpu_util_mean_pct",
            "power_mean_w",
            "power_max_w",
            "contaminated",
            "foreign_processes",
            "process_attribution",
            "degraded",
            "n_errors",
            "errors",
        )
    }
    out["sampler"]["series_points"] = len(report.get("series", {}).get("t_s", []))
    out["sampler"]["progress_events_with_telemetry"] = metrics.get("_progress_telemetry_events")
    return out


def verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    def within(value: float | None, limit: float) -> bool | None:
        return None if value is None else abs(value) <= limit

    checks = result["checks"]
    return {
        "tokens_per_s": within(checks["timing"]["tokens_per_s_diff_pct"], LIMITS["tokens_pct"]),
        "ms_per_token": within(checks["timing"]["ms_per_token_diff_pct"], LIMITS["tokens_pct"]),
        "sampler_overhead": None
        if result.get("overhead") is None
        else result["overhead"]["overhead_pct"] <= LIMITS["overhead_pct"],
        "peak_memory": within(checks.get("memory", {}).get("diff_pct"), LIMITS["memory_pct"]),
        "energy": within(checks.get("energy", {}).get("diff_pct"), LIMITS["energy_pct"]),
    }


def environment() -> dict[str, Any]:
    import torch
    import transformers

    from slmtui.telemetry import hardware_identity

    gpus = 1 if torch.cuda.is_available() else 0
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **hardware_identity(list(range(gpus)) if gpus else None),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def worker_checks(checkpoint: Path, gpus: int, cuda: bool, args: Any) -> dict[str, Any]:
    """Checks 1, 3 and 4 of the module docstring on one worker-path run."""
    from slmtui.telemetry import nvml_available
    from slmtui.telemetry.nvml import nvml_indices_for, open_nvml

    poller = None
    if cuda and nvml_available():
        with open_nvml() as nvml:
            nvml_index = nvml_indices_for([0], nvml.devices())[0]
        poller = Poller(nvml_index)
    hooks = Hooks(poller, cuda)
    hooks.install()
    if poller:
        poller.mark("run_begin")
    try:
        metrics = worker_run(checkpoint, gpus, args.limit, args.new_tokens, hooks)
    finally:
        if poller:
            poller.mark("run_end")
    out: dict[str, Any] = {"path": "slmtui.worker.runner.run_spec (plain engine, batch 1)"}
    out["checks"] = compare(metrics, hooks, poller, cuda)
    out["telemetry_report"] = hooks.sampler_report
    out["worker_metrics"] = {
        k: v for k, v in metrics.items() if k not in ("telemetry", "task_metrics")
    }
    if poller:
        poller.close()
    print(json.dumps(out["checks"], indent=1, default=str), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fidelity-out"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU dry run)")
    parser.add_argument("--limit", type=int, default=10, help="gsm8k sample items measured")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=15, help="A/B pairs")
    parser.add_argument("--ab-requests", type=int, default=1)
    parser.add_argument("--ab-new-tokens", type=int, default=64)
    parser.add_argument("--period-s", type=float, default=0.2)
    parser.add_argument("--ab-engine", default="plain", help="engine of the sampler A/B")
    parser.add_argument("--ab-batch", type=int, default=1, help="batch size of the sampler A/B")
    parser.add_argument(
        "--ab-only", action="store_true", help="only the sampler A/B (no worker-path checks)"
    )
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--poll", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_checkpoint(args.build, args.tiny)
        return 0
    if args.poll:
        poll(*args.poll)
        return 0

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gpus = 1 if cuda else 0
    result: dict[str, Any] = {"environment": environment(), "args": vars(args) | {"out": None}}
    result["model"] = "random-initialised Qwen2.5-0.5B architecture, bf16" + (
        " (tiny config)" if args.tiny else ""
    )
    print(json.dumps(result["environment"]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "qwen25-05b-random"
        started = time.perf_counter()
        build = [sys.executable, __file__, "--build", str(checkpoint)]
        subprocess.run(build + (["--tiny"] if args.tiny else []), check=True)
        print(f"checkpoint built in {time.perf_counter() - started:.1f} s", flush=True)
        if not args.ab_only:
            result.update(worker_checks(checkpoint, gpus, cuda, args))
        if cuda:
            torch.cuda.empty_cache()
        result["overhead"] = overhead_ab(
            checkpoint,
            gpus,
            args.repeats,
            args.ab_requests,
            args.ab_new_tokens,
            args.period_s,
            args.ab_engine,
            args.ab_batch,
        )
        print(json.dumps(result["overhead"], indent=1), flush=True)
    if args.ab_only:
        result["verdicts"] = {
            "sampler_overhead": result["overhead"]["overhead_pct"] <= LIMITS["overhead_pct"]
        }
        print(json.dumps(result["verdicts"]), flush=True)
        (args.out / "fidelity_ab.json").write_text(json.dumps(result, indent=1, default=str))
        return 0
    result["verdicts"] = verdicts(result)
    print(json.dumps(result["verdicts"]), flush=True)
    (args.out / "fidelity.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
