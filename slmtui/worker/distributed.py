"""Runs on several GPUs, worker side: torchrun ranks, parallel loading, item split, one window.

The scheduler starts a k-GPU run as ``torchrun --standalone --nproc-per-node k``: k processes,
one per GPU, every rank seeing all k GPUs (``CUDA_VISIBLE_DEVICES``), rank r driving ``cuda:r``.

- ``tp`` (the default): every rank loads its shard through transformers' tensor-parallel plan
  and runs the same ``generate`` on the same inputs; the model's collectives keep the ranks in
  lockstep and every rank ends with the same tokens. Rank 0 reports.
- ``tp`` for a model that cannot be split that way (its architecture has no plan, or the GPU
  count does not divide its attention / KV head counts: Qwen2.5-1.5B's 2 KV heads allow 2 GPUs,
  not 4): rank 0 alone loads the model layer-sharded over all the run's GPUs (accelerate,
  ``device_map="auto"``) and runs it; the other ranks leave the process group and return no
  model (the caller exits them). ``load_parallel``'s note says so, for the result. After that
  the collective helpers here act as in a single process.
- ``dp``: every rank loads a full replica on its own GPU, takes ``items[rank::world]``, and the
  results are gathered to rank 0 in the original order.

Only rank 0 writes events: torchrun merges every rank's stdout into the one stream the scheduler
reads, so ``quiet_non_primary`` sends the other ranks' stdout to stderr.

Timing (``measured_window`` + ``reduce_timing``): the ranks meet at a barrier after a device
sync, each measures its own window up to its own device sync, then they meet again; the job's
window is the longest rank's. Tokens: dp sums the ranks' counts; tp counts rank 0's, since every
rank generates the same tokens. Throughput per GPU is the job's total over the run's GPUs (the
study's THR = tokens/s / GPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from slmtui.errors import UserError, allowed_list, did_you_mean
from slmtui.spec import PARALLEL_MODES

T = TypeVar("T")
Parallel = Literal["tp", "dp"]

FALLBACK = "layer-sharded with accelerate device_map"
"""How a model that cannot be tensor-parallel runs on several GPUs (the note's second half)."""

_CONFIG_KWARGS = ("local_files_only", "revision", "trust_remote_code", "cache_dir", "token")
"""Load keywords that also matter when reading a model's config (the rest stay with the model)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in its job; a lone process is rank 0 of a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    """"nccl" or "gloo" once ``init_distributed`` has joined the group; None before or alone."""

    @property
    def is_primary(self) -> bool:
        """Rank 0: the one process that writes events and results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """This rank's device: ``cuda:<local_rank>`` when CUDA has that GPU, else the CPU."""
        if torch.cuda.is_available() and self.local_rank < torch.cuda.device_count():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def dist_context(env: Mapping[str, str] | None = None) -> DistContext:
    """The context torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK (world 1 when unset)."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
    if world < 1:
        raise UserError(f"environment WORLD_SIZE={world}: allowed a whole number >= 1")
    if not 0 <= rank < world:
        raise UserError(
            f"environment RANK={rank} with WORLD_SIZE={world}: allowed 0 to {world - 1}"
        )
    if not 0 <= local_rank < max(local_world, 1):
        raise UserError(
            f"environment LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_world}: "
            f"allowed 0 to {local_world - 1}"
        )
    return DistContext(rank, world, local_rank, local_world)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment {name}={text!r}: allowed a whole number") from None


def init_distributed(ctx: DistContext, *, timeout_s: float = 1800.0) -> DistContext:
    """Join the job's process group: NCCL on GPUs (binding ``cuda:<local_rank>``), else gloo.

    A world of 1 joins nothing. Returns the context with its ``backend`` set.
    """
    if not ctx.is_distributed:
        return ctx
    if dist.is_initialized():
        return replace(ctx, backend=str(dist.get_backend()))
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=timeout_s))
        return replace(ctx, backend="nccl")
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return replace(ctx, backend="gloo")


def finish_distributed() -> None:
    """Leave the process group (NCCL warns at exit about groups never destroyed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def group_active(ctx: DistContext) -> bool:
    """Whether collectives reach the other ranks (False alone, or after the no-plan fallback)."""
    return ctx.is_distributed and dist.is_available() and dist.is_initialized()


def quiet_non_primary(ctx: DistContext) -> None:
    """Send the stdout of ranks other than 0 to stderr: the event stream belongs to rank 0."""
    if ctx.is_primary:
        return
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), 1)
    sys.stdout = sys.stderr


# -- loading ----------------------------------------------------------------------------------


def load_parallel(
    model_source: str | os.PathLike[str],
    *,
    ctx: DistContext,
    parallel: Parallel,
    dtype: torch.dtype,
    load_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any | None, str | None]:
    """Load a causal LM for this rank; returns ``(model or None, note or None)``.

    ``model_source`` is what ``from_pretrained`` reads (a directory, a cached hub id);
    ``load_kwargs`` go to it too (``local_files_only``, ``attn_implementation``...).
    tp: this rank's shard. dp: a full replica on this rank's GPU. A tp model that cannot be
    tensor-parallel (``tp_obstacle``: no plan, or head counts the world does not divide) is
    loaded layer-sharded by rank 0 alone; the other ranks get ``None`` and should exit. A lone
    process gets the model on its device (layer-sharded when it sees several GPUs). The note,
    when not None, belongs in the result.
    """
    if parallel not in PARALLEL_MODES:
        raise UserError(
            f"parallel '{parallel}'{did_you_mean(parallel, PARALLEL_MODES)}; "
            f"allowed {allowed_list(PARALLEL_MODES)}"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, **(load_kwargs or {})}
    if not ctx.is_distributed:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if parallel == "tp" and gpus > 1:
            note = f"{gpus} GPUs in one process (no torchrun); {FALLBACK}"
            return _layer_sharded(model_source, kwargs, ctx, note)
        model = _from_pretrained(model_source, kwargs)
        return model.to(ctx.device).eval(), None
    if parallel == "dp":
        model = _from_pretrained(model_source, {**kwargs, "device_map": {"": ctx.device}})
        return model.eval(), f"data parallel: {ctx.world_size} replicas, items split between them"
    config = _config(model_source, kwargs)
    reason = tp_obstacle(config, ctx.world_size)
    if reason is None:
        try:
            model = _from_pretrained(model_source, {**kwargs, **tensor_parallel_kwargs(ctx)})
        except (ValueError, NotImplementedError) as exc:
            if "plan" not in str(exc).lower():
                raise
            reason = f"no tensor-parallel plan for {_architecture(config)}"
        else:
            return model.eval(), f"tensor parallel over {ctx.world_size} GPUs (tp_plan auto)"
    return _layer_sharded(model_source, kwargs, ctx, f"{reason}; {FALLBACK}")


def tp_obstacle(config: Any, world_size: int) -> str | None:
    """Why the model cannot be tensor-parallel over ``world_size`` GPUs; None when it can.

    It needs a plan (``base_model_tp_plan``) and head counts the world divides: column-wise
    q/k/v shards must hold whole heads, or the first forward fails on a reshape.
    """
    arch = _architecture(config)
    if not getattr(config, "base_model_tp_plan", None):
        return f"no tensor-parallel plan for {arch}"
    text = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads and kv_heads and (heads % world_size or kv_heads % world_size):
        return (
            f"tensor parallel over {world_size} GPUs needs head counts divisible by "
            f"{world_size} ({arch}: {heads} attention, {kv_heads} KV heads)"
        )
    return None


def _layer_sharded(
    model_source: str | os.PathLike[str], kwargs: dict[str, Any], ctx: DistContext, note: str
) -> tuple[Any | None, str]:
    """The fallback: rank 0 alone spreads the layers over every visible GPU."""
    if group_active(ctx):
        dist.barrier()
        dist.destroy_process_group()
    if not ctx.is_primary:
        return None, note
    print(f"slmtui: {note}", file=sys.stderr, flush=True)
    model = _from_pretrained(model_source, {**kwargs, "device_map": "auto"})
    return model.eval(), note


def tensor_parallel_kwargs(ctx: DistContext) -> dict[str, Any]:
    """``from_pretrained`` keywords for the model's own tensor-parallel plan over the world.

    transformers 5.x takes ``distributed_config=DistributedConfig(tp_size=..)`` (the bare
    ``tp_plan="auto"`` keyword is deprecated there); older versions only know ``tp_plan``.
    """
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    names = {f.name for f in dataclasses.fields(DistributedConfig)}
    if "tp_size" not in names:
        return {"tp_plan": "auto"}
    config: dict[str, Any] = {"tp_size": ctx.world_size}
    if "tp_plan" in names:
        config["tp_plan"] = "auto"
    return {"distributed_config": DistributedConfig(**config)}


def _architecture(config: Any) -> str:
    names = getattr(config, "architectures", None) or [type(config).__name__]
    return str(names[0])


def _config(model_source: str | os.PathLike[str], load_kwargs: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs = {k: load_kwargs[k] for k in _CONFIG_KWARGS if k in load_kwargs}
    return AutoConfig.from_pretrained(model_source, **kwargs)


def _from_pretrained(model_source: str | os.PathLike[str], kwargs: Mapping[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_source, **kwargs)


# -- items and results ------------------------------------------------------------------------


def shard_items(items: Sequence[T], ctx: DistContext, parallel: Parallel = "dp") -> list[T]:
    """This rank's items: ``items[rank::world]`` for dp; all of them for tp or a lone process."""
    if parallel != "dp" or not group_active(ctx):
        return list(items)
    return list(items[ctx.rank :: ctx.world_size])


def gather_results(
    local: Sequence[T], ctx: DistContext, parallel: Parallel = "dp"
) -> list[T] | None:
    """Every rank's results on rank 0, in the items' original order; None on other ranks.

    ``local[k]`` must answer ``shard_items(...)[k]``. tp or a lone process: ``local`` itself
    (every tp rank holds the same results) on rank 0.
    """
    if parallel != "dp" or not group_active(ctx):
        return list(local) if ctx.is_primary else None
    parts: list[list[T]] | None = [[] for _ in range(ctx.world_size)] if ctx.is_primary else None
    dist.gather_object(list(local), parts, dst=0)
    if parts is None:
        return None
    return interleave(parts)


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """Undo ``items[r::world]``: ``parts[r][k]`` goes back to position ``r + k * world``."""
    world = len(parts)
    total = sum(len(p) for p in parts)
    out: list[Any] = [None] * total
    for r, part in enumerate(parts):
        expected = len(range(r, total, world))
        if len(part) != expected:
            raise ValueError(
                f"rank {r} returned {len(part)} results for {expected} items "
                f"({total} items over {world} ranks)"
            )
        out[r::world] = list(part)
    return out


def all_ranks(value: T, ctx: DistContext) -> list[T]:
    """``value`` from every rank, in rank order, on every rank (``[value]`` alone)."""
    if not group_active(ctx):
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def job_progress(done_local: int, total: int, ctx: DistContext, parallel: Parallel) -> int:
    """Items done by the whole job as rank 0 can tell without talking to the others.

    dp ranks hold near-equal shares and run at the same pace, so rank 0's count times the
    world is the estimate (capped at ``total``); tp ranks all work on every item.
    """
    if parallel != "dp" or not group_active(ctx):
        return done_local
    return min(total, done_local * ctx.world_size)


# -- timing -----------------------------------------------------------------------------------


@dataclass
class Window:
    """One rank's measured window: perf-counter seconds plus wall-clock ends (Unix seconds)."""

    started_at: float = 0.0
    ended_at: float = 0.0
    seconds: float = 0.0


@contextlib.contextmanager
def measured_window(ctx: DistContext) -> Iterator[Window]:
    """Time a block on every rank: sync + barrier, the block, this rank's device sync, barrier.

    ``Window.seconds`` is this rank's own time; ``reduce_timing`` takes the longest.
    """
    window = Window()
    _synchronize()
    if group_active(ctx):
        dist.barrier()
    window.started_at = time.time()
    start = time.perf_counter()
    yield window
    _synchronize()
    window.seconds = time.perf_counter() - start
    window.ended_at = time.time()
    if group_active(ctx):
        dist.barrier()


def _synchronize() -> None:
    """Wait for every GPU this process has put work on (none of the others: no new contexts)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    for index in range(torch.cuda.device_count()):
        if torch.cuda.memory_reserved(index) > 0:
            torch.cuda.synchronize(index)


@dataclass(frozen=True)
class JobTiming:
    """The job's measured window and what it produced, over all ranks."""

    measured_s: float
    """The longest rank's window, seconds."""
    tokens_out: int = 0
    """Generated tokens of the job (dp: summed over ranks; tp: rank 0's, as all ranks agree)."""
    tokens_in: int = 0
    samples: int = 0
    devices: int = 1
    """GPUs the run holds (each torchrun rank drives one); THR per GPU divides by this."""
    rank_seconds: tuple[float, ...] = field(default_factory=tuple)
    """Each rank's own window, seconds, in rank order."""

    @property
    def tokens_per_s(self) -> float | None:
        """Generated tokens per second, all GPUs together."""
        return self.tokens_out / self.measured_s if self.measured_s > 0 else None

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        """The study's THR for generation: total tokens/s over the GPU count."""
        total = self.tokens_per_s
        return None if total is None else total / self.devices

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.measured_s if self.measured_s > 0 else None

    @property
    def samples_per_s_per_gpu(self) -> float | None:
        total = self.samples_per_s
        return None if total is None else total / self.devices

    @property
    def ms_per_token(self) -> float | None:
        """Window milliseconds per generated token of the job."""
        return 1000.0 * self.measured_s / self.tokens_out if self.tokens_out else None


def reduce_timing(
    seconds: float,
    ctx: DistContext,
    parallel: Parallel,
    *,
    tokens_out: int = 0,
    tokens_in: int = 0,
    samples: int = 0,
) -> JobTiming:
    """Combine every rank's window and counts into the job's (on every rank)."""
    rows = all_ranks((float(seconds), int(tokens_out), int(tokens_in), int(samples)), ctx)
    rank_seconds = tuple(r[0] for r in rows)
    # dp ranks produce different tokens and add up; tp ranks all produce the same ones.
    summed = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    counts = summed if parallel == "dp" else list(rows[0][1:])
    return JobTiming(
        measured_s=max(rank_seconds),
        tokens_out=counts[0],
        tokens_in=counts[1],
        samples=counts[2],
        devices=max(1, ctx.world_size),
        rank_seconds=rank_seconds,
    )


def rank_memory_mb() -> dict[str, float | None]:
    """This process's torch peaks on its devices, MiB (None on the CPU)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {"torch_peak_allocated_mb": None, "torch_peak_reserved_mb": None}
    allocated = reserved = 0
    for index in range(torch.cuda.device_count()):
        if torch.cuda.memory_reserved(index) > 0:
            allocated += torch.cuda.max_memory_allocated(index)
            reserved += torch.cuda.max_memory_reserved(index)
    mib = 1024 * 1024
    return {"torch_peak_allocated_mb": allocated / mib, "torch_peak_reserved_mb": reserved / mib}
