"""Multi-GPU worker side, on the CPU: torchrun with gloo on a tiny random model.

The torchrun job below checks what a 2-GPU run relies on: dp splits the items and gathers
them back in order with the same tokens a single process gives; tp shards the weights and
gives the same tokens (fp32 on the CPU, where token identity is a fair demand); an architecture
without a tensor-parallel plan falls back to rank 0 alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from slmtui.errors import UserError
from slmtui.worker import distributed as wd
from slmtui.worker.distributed import DistContext

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    [5, 9, 33, 71],
    [120, 4, 8],
    [99, 98, 97, 96, 95],
    [1, 2],
    [250, 11, 17],
    [60],
    [7, 7, 8],
]
"""Seven prompts: an odd count, so the two dp ranks get 4 and 3."""
NEW_TOKENS = 6


def _tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,
        architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _tiny_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _greedy(model: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


JOB = """
import json, os, sys
import torch
from slmtui.worker import distributed as wd
sys.path.insert(0, {test_dir!r})
from test_distributed import PROMPTS, _greedy

ctx = wd.init_distributed(wd.dist_context())
wd.quiet_non_primary(ctx)
print(f"hello from rank {{ctx.rank}}", flush=True)
out = {{"backend": ctx.backend, "world": ctx.world_size}}

model, note = wd.load_parallel({llama!r}, ctx=ctx, parallel="dp", dtype=torch.float32)
mine = wd.shard_items(list(range(len(PROMPTS))), ctx)
with wd.measured_window(ctx) as window:
    local = [(i, _greedy(model, PROMPTS[i])) for i in mine]
timing = wd.reduce_timing(window.seconds, ctx, "dp", tokens_out=sum(len(t) for _, t in local),
                          samples=len(local))
out["dp"] = {{"note": note, "mine": mine, "gathered": wd.gather_results(local, ctx),
             "timing": [timing.tokens_out, timing.samples, timing.devices,
                        timing.measured_s == max(timing.rank_seconds)]}}

model, note = wd.load_parallel({llama!r}, ctx=ctx, parallel="tp", dtype=torch.float32)
weight = model.model.layers[0].self_attn.q_proj.weight
local_rows = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
tokens = [_greedy(model, p) for p in wd.shard_items(PROMPTS, ctx, "tp")]
timing = wd.reduce_timing(0.5, ctx, "tp", tokens_out=sum(map(len, tokens)))
pids = wd.all_ranks(os.getpid(), ctx)
out["tp"] = {{"note": note, "local_rows": local_rows,
             "tokens": wd.gather_results(tokens, ctx, "tp"),
             "tokens_out": timing.tokens_out, "pids": len(set(pids))}}

model, note = wd.load_parallel({gpt2!r}, ctx=ctx, parallel="tp", dtype=torch.float32)
out["fallback"] = {{"note": note, "has_model": model is not None,
                   "group_after": wd.group_active(ctx)}}
if model is not None:
    out["fallback"]["tokens"] = _greedy(model, PROMPTS[0])
    print("RESULT " + json.dumps(out), flush=True)
wd.finish_distributed()
"""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"llama": _tiny_llama(root / "llama"), "gpt2": _tiny_gpt2(root / "gpt2")}


# -- the context from torchrun's environment --------------------------------------------------


def test_lone_process_is_rank_zero_of_one() -> None:
    ctx = wd.dist_context({})
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert ctx.is_primary and not ctx.is_distributed
    assert wd.init_distributed(ctx) is ctx  # nothing to join


def test_torchrun_environment_is_read() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ctx = wd.dist_context(env)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert not ctx.is_primary and ctx.is_distributed
    assert ctx.backend is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "5"}, "LOCAL_RANK=5"),
    ],
)
def test_bad_environment_is_one_line_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(UserError, match=named):
        wd.dist_context(env)


# -- splitting and gathering, timing arithmetic -----------------------------------------------


def test_interleave_undoes_the_rank_split() -> None:
    items = list("abcdefg")
    parts = [items[r::3] for r in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert wd.interleave(parts) == items


def test_interleave_refuses_a_rank_that_lost_results() -> None:
    with pytest.raises(ValueError, match="rank 0 returned 3 results for 2 items"):
        wd.interleave([["a", "c", "e"], ["b"]])


def test_without_a_group_items_stay_whole_and_results_pass_through() -> None:
    ctx = DistContext(rank=0, world_size=2)  # torchrun env but no group joined
    assert wd.shard_items([1, 2, 3], ctx) == [1, 2, 3]
    assert wd.gather_results([1, 2, 3], ctx) == [1, 2, 3]
    assert wd.gather_results([1], DistContext(rank=1, world_size=2)) is None
    assert wd.job_progress(5, 10, ctx, "dp") == 5


def test_job_timing_reports_total_and_per_gpu() -> None:
    timing = wd.JobTiming(measured_s=2.0, tokens_out=1000, samples=10, devices=4)
    assert timing.tokens_per_s == 500.0
    assert timing.tokens_per_s_per_gpu == 125.0
    assert timing.samples_per_s_per_gpu == 1.25
    assert timing.ms_per_token == 2.0
    assert wd.JobTiming(measured_s=0.0).tokens_per_s is None


def test_lone_process_timing_is_its_own() -> None:
    with wd.measured_window(DistContext()) as window:
        time.sleep(0.01)
    assert window.seconds >= 0.01 and window.ended_at >= window.started_at
    timing = wd.reduce_timing(window.seconds, DistContext(), "dp", tokens_out=7, samples=2)
    assert (timing.tokens_out, timing.samples, timing.devices) == (7, 2, 1)
    assert timing.measured_s == window.seconds


# -- loading ----------------------------------------------------------------------------------


def test_unknown_parallel_mode_is_a_user_error(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="did you mean 'dp'"):
        wd.load_parallel(
            tiny_models["llama"], ctx=DistContext(), parallel="dpp", dtype=torch.float32
        )  # type: ignore[arg-type]


def test_tensor_parallel_keywords_use_the_models_plan() -> None:
    kwargs = wd.tensor_parallel_kwargs(DistContext(rank=0, world_size=2))
    if "distributed_config" in kwargs:
        assert kwargs["distributed_config"].tp_size == 2
    else:
        assert kwargs == {"tp_plan": "auto"}


def test_tp_load_that_raises_for_a_missing_plan_falls_back_to_layer_sharding(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def fake(source: Any, kwargs: dict[str, Any]) -> Any:
        calls.append(dict(kwargs))
        if "distributed_config" in kwargs or "tp_plan" in kwargs:
            raise ValueError("`tp_size=2` was requested, but `LlamaForCausalLM` has no `tp_plan`.")
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(wd, "_from_pretrained", fake)
    primary = DistContext(rank=0, world_size=2)
    model, note = wd.load_parallel(
        tiny_models["llama"], ctx=primary, parallel="tp", dtype=torch.bfloat16
    )
    assert isinstance(model, torch.nn.Linear)
    assert note == (
        "no tensor-parallel plan for LlamaForCausalLM; layer-sharded with accelerate device_map"
    )
    assert calls[-1] == {"dtype": torch.bfloat16, "device_map": "auto"}

    calls.clear()
    model, note = wd.load_parallel(
        tiny_models["llama"],
        ctx=DistContext(rank=1, world_size=2),
        parallel="tp",
        dtype=torch.bfloat16,
    )
    assert model is None and note is not None and note.startswith("no tensor-parallel plan")
    assert all("device_map" not in c for c in calls)  # only rank 0 loads the fallback


def test_tp_needs_a_plan_and_head_counts_the_gpu_count_divides() -> None:
    from transformers import GPT2Config, LlamaConfig

    llama = LlamaConfig(num_attention_heads=12, num_key_value_heads=2, hidden_size=96)
    llama.architectures = ["LlamaForCausalLM"]
    assert wd.tp_obstacle(llama, 2) is None
    assert wd.tp_obstacle(llama, 4) == (
        "tensor parallel over 4 GPUs needs head counts divisible by 4 "
        "(LlamaForCausalLM: 12 attention, 2 KV heads)"
    )
    assert wd.tp_obstacle(GPT2Config(), 2) == "no tensor-parallel plan for GPT2Config"


def test_tp_load_error_unrelated_to_plans_propagates(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(source: Any, kwargs: dict[str, Any]) -> Any:
        raise ValueError("checkpoint is corrupt")

    monkeypatch.setattr(wd, "_from_pretrained", fake)
    with pytest.raises(ValueError, match="corrupt"):
        wd.load_parallel(
            tiny_models["llama"],
            ctx=DistContext(rank=0, world_size=2),
            parallel="tp",
            dtype=torch.float32,
        )


# -- a real torchrun job on the CPU -----------------------------------------------------------


def _torchrun(script: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc-per-node", str(nproc), str(script)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_torchrun_job_dp_and_tp_match_a_single_process(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        JOB.format(
            test_dir=str(Path(__file__).parent),
            llama=str(tiny_models["llama"]),
            gpt2=str(tiny_models["gpt2"]),
        )
    )
    done = _torchrun(script)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, done.stdout  # rank 0 alone
    assert "hello from rank 0" in done.stdout
    assert "hello from rank 1" not in done.stdout  # other ranks' stdout goes to stderr
    out = json.loads(results[0].removeprefix("RESULT "))

    from transformers import AutoModelForCausalLM

    single = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    expected = [_greedy(single, p) for p in PROMPTS]

    assert out["backend"] == "gloo" and out["world"] == 2
    dp = out["dp"]
    assert dp["mine"] == [0, 2, 4, 6]  # rank 0's share of 7 items
    assert [i for i, _ in dp["gathered"]] == list(range(7))  # original order restored
    assert [t for _, t in dp["gathered"]] == expected
    assert dp["timing"] == [7 * NEW_TOKENS, 7, 2, True]  # tokens summed over ranks

    tp = out["tp"]
    assert tp["note"] == "tensor parallel over 2 GPUs (tp_plan auto)"
    assert tp["local_rows"] == 16  # q_proj's 32 output rows, half on each rank
    assert tp["tokens"] == expected
    assert tp["tokens_out"] == 7 * NEW_TOKENS  # rank 0's count, not doubled
    assert tp["pids"] == 2

    fallback = out["fallback"]
    assert fallback["note"].startswith("no tensor-parallel plan for GPT2LMHeadModel")
    assert fallback["has_model"] and not fallback["group_after"]
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float32)
    assert fallback["tokens"] == _greedy(gpt2, PROMPTS[0])


# -- the multi-GPU benchmark script (bench/multigpu.py) ---------------------------------------


def _bench() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_multigpu", REPO / "bench" / "multigpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeNvml:
    """Two GPUs; the job's pids 11 and 12 use 1000 MiB on GPU 5 and 1500 MiB on GPU 6."""

    def __init__(self) -> None:
        self.energy_mj = 1_000_000

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return type("Mem", (), {"used": (2000 + h) * 1024 * 1024})()

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 300_000

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        proc = type("Proc", (), {})
        mine = {5: (11, 1000), 6: (12, 1500)}[h]
        out = []
        for pid, mib in (mine, (99, 4000)):  # pid 99 is someone else's
            p = proc()
            p.pid, p.usedGpuMemory = pid, mib * 1024 * 1024
            out.append(p)
        return out

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        self.energy_mj += 250_000  # each read 250 J later
        return self.energy_mj


def test_bench_nvml_sampler_counts_only_the_jobs_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench()
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    sampler = bench.NvmlSampler([5, 6], [11, 12], period_s=0.01).start()
    sampler.begin()
    sampler.end()
    per_gpu = sampler.stop()
    assert [g["nvml_index"] for g in per_gpu] == [5, 6]
    assert [g["peak_job_process_mb"] for g in per_gpu] == [1000.0, 1500.0]
    assert [g["peak_device_used_mb"] for g in per_gpu] == [2005.0, 2006.0]
    assert per_gpu[0]["peak_power_w"] == 300.0
    # begin read GPU 5 then 6, end read 5 then 6: each delta spans two later reads = 500 J.
    assert [g["window_energy_j"] for g in per_gpu] == [500.0, 500.0]


def test_bench_comparison_counts_identical_tokens_and_near_ties() -> None:
    bench = _bench()
    ref = {
        "tokens": [[1, 2, 3], [4, 5, 6]],
        "teacher_forced": [
            {"lp": [-1.0, -2.0, -3.0], "top1": [1, 2, 3], "gap": [0.5, 0.01, 0.2]},
            {"lp": [-1.0, -1.0, -1.0], "top1": [4, 5, 6], "gap": [0.3, 0.3, 0.3]},
        ],
    }
    run = {
        "tokens": [[1, 9, 9], [4, 5, 6]],
        "teacher_forced": [
            {"lp": [-1.0, -2.5, -3.0], "top1": [1, 9, 3], "gap": [0.5, 0.02, 0.2]},
            {"lp": [-1.0, -1.0, -1.25], "top1": [4, 5, 6], "gap": [0.3, 0.3, 0.3]},
        ],
    }
    c = bench.compare_runs(ref, run)
    assert c["identical_sequences"] == 1 and c["identical_sequence_share"] == 0.5
    assert c["identical_token_share"] == 4 / 6
    assert c["median_first_divergence"] == 1
    assert c["tf_logprob_max_abs_diff"] == 0.5
    assert c["tf_logprob_mean_abs_diff"] == pytest.approx(0.75 / 6)
    assert c["tf_next_token_agreement"] == 5 / 6
    assert c["flipped_max_ref_top2_gap"] == 0.01  # the one flip was a near tie
    assert bench.intervals_overlap([(0.0, 10.0), (4.0, 12.0)]) == 6.0
    assert bench.intervals_overlap([(0.0, 1.0), (2.0, 3.0)]) == 0.0


@pytest.mark.slow
def test_bench_dry_run_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "bench" / "multigpu.py"), "--dry-run"]
    argv += ["--out", str(out), "--work", str(tmp_path / "work")]
    argv += ["--modes", "single,tp"]  # dp's split and gather: the torchrun job above
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    report = json.loads((out / "multigpu.json").read_text())
    assert done.returncode == 0, (report["errors"], done.stderr[-2000:])
    assert report["errors"] == []
    runs = report["runs"]
    assert set(runs) == {"single_float32", "tp_float32"}
    assert runs["tp_float32"]["note"] == "tensor parallel over 2 GPUs (tp_plan auto)"
    assert runs["tp_float32"]["gpus"] == 2
    assert runs["tp_float32"]["tokens_out"] == 6 * 6  # 6 prompts x 6 new tokens, not doubled
    c = report["comparisons"]["tp_float32"]
    assert c["identical_sequence_share"] == 1.0  # fp32 on the CPU: token identity
    assert c["tf_logprob_max_abs_diff"] < 1e-4
    sched = report["scheduler"]
    assert sched["how"].startswith("slmtui.scheduler.Scheduler")
    assert sched["both_finished"] and sched["different_gpus"] and sched["concurrent"]
    assert sorted(r["scheduler_gpu_ids"] for r in sched["runs"]) == [[0], [1]]
    text = (out / "multigpu.txt").read_text()
    assert "DRY RUN" in text and "concurrent = True" in text
