"""GPU inventory and packing: FIFO with backfill, never oversubscribed, impossible runs refused."""

from __future__ import annotations

import sys
import types

import pytest

from slmtui.errors import UserError
from slmtui.scheduler.gpus import Gpu, detect_gpus, select_visible
from slmtui.scheduler.packing import Pending, check_fits, pack
from slmtui.spec import ModelRef, RunSpec


def box(n: int, free_mb: list[float] | None = None) -> list[Gpu]:
    free_mb = free_mb or [80_000.0] * n
    return [Gpu(i, "H100", 81_559.0, free_mb[i], uuid=f"GPU-{i:04d}-aaaa") for i in range(n)]


def queue(*gpus: int) -> list[Pending]:
    return [
        Pending(f"r{n}", RunSpec(model=ModelRef(f"m{n}", f"/m/{n}", "local"), task="gsm8k", gpus=k))
        for n, k in enumerate(gpus)
    ]


def started(assignments) -> dict[str, tuple[int, ...]]:
    return {a.run_id: a.gpu_ids for a in assignments}


def test_one_gpu_runs_one_at_a_time() -> None:
    assert started(pack(queue(1, 1, 1), box(1))) == {"r0": (0,)}


def test_two_gpus_take_two_single_runs() -> None:
    assert started(pack(queue(1, 1, 1), box(2))) == {"r0": (0,), "r1": (1,)}


def test_four_gpus_backfill_behind_a_run_that_does_not_fit() -> None:
    # r0 takes 2, r1 (4) must wait, r2 and r3 backfill the remaining two.
    assert started(pack(queue(2, 4, 1, 1), box(4))) == {"r0": (0, 1), "r2": (2,), "r3": (3,)}


def test_eight_gpus_start_four_single_runs_and_a_four_gpu_run_together() -> None:
    got = started(pack(queue(1, 1, 4, 1, 1, 2), box(8)))
    assert set(got) == {"r0", "r1", "r2", "r3", "r4"}  # the 2-GPU run waits: nothing left
    used = [i for ids in got.values() for i in ids]
    assert sorted(used) == list(range(8))  # every GPU once, none shared
    assert len(got["r2"]) == 4


def test_gpus_with_most_free_memory_are_preferred() -> None:
    gpus = box(4, free_mb=[1_000.0, 70_000.0, 500.0, 60_000.0])
    assert started(pack(queue(2, 1), gpus)) == {"r0": (1, 3), "r1": (0,)}


def test_only_the_free_gpus_are_used() -> None:
    free = [g for g in box(4) if g.index in (1, 3)]
    assert started(pack(queue(1, 2, 1), free)) == {"r0": (1,), "r2": (3,)}


def test_cpu_runs_go_one_at_a_time() -> None:
    assert started(pack(queue(0, 0), [])) == {"r0": ()}
    assert started(pack(queue(0, 0), [], cpu_free=False)) == {}
    # On a GPU box a CPU run does not take a GPU.
    assert started(pack(queue(0, 1, 0), box(1))) == {"r0": (), "r1": (0,)}


def test_a_run_larger_than_the_box_is_refused_up_front(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    specs = [q.spec for q in queue(1, 4)]
    with pytest.raises(UserError) as err:
        check_fits(specs, box(2))
    assert str(err.value) == (
        "model m1 (gsm8k): 4 GPUs asked, this box has 2 (CUDA_VISIBLE_DEVICES=0,1); "
        "allowed gpus: 0 (CPU) to 2"
    )
    check_fits(specs[:1], box(2))


def test_a_gpu_run_on_a_cpu_box_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(
        UserError, match=r"1 GPU asked, this box has none .*allowed gpus: 0 \(CPU\)"
    ):
        check_fits([queue(1)[0].spec], [])


def test_cuda_visible_devices_limits_and_orders_the_inventory() -> None:
    gpus = box(4)
    assert [g.index for g in select_visible(gpus, None)] == [0, 1, 2, 3]
    assert [g.index for g in select_visible(gpus, "3,1")] == [3, 1]
    assert [g.index for g in select_visible(gpus, "GPU-0002")] == [2]  # UUID prefix
    assert [g.index for g in select_visible(gpus, "2,7,1")] == [2]  # CUDA stops at a bad entry
    assert select_visible(gpus, "") == []
    assert select_visible(gpus, "-1") == []


class _Memory:
    def __init__(self, total: int, free: int) -> None:
        self.total, self.free = total, free


def fake_pynvml(count: int) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: count
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    mod.nvmlDeviceGetMemoryInfo = lambda h: _Memory(80 * 2**30, (80 - h) * 2**30)
    return mod


def test_detect_gpus_reads_nvml_and_respects_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(4))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    gpus = detect_gpus()
    assert [(g.index, g.name, g.total_mb, g.free_mb) for g in gpus] == [
        (2, "NVIDIA H100 80GB HBM3", 81920.0, 79872.0),
        (3, "NVIDIA H100 80GB HBM3", 81920.0, 78848.0),
    ]


def test_no_nvml_means_a_cpu_box(monkeypatch) -> None:
    broken = types.ModuleType("pynvml")

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert detect_gpus() == []
