"""The fast engine's native decode step (issue 15) against transformers, per family, on the CPU.

For a tiny random model of every family the step implements, plus the configurations where a
decode step is easiest to get wrong (Qwen2's biases, Qwen3's and Gemma 3's query/key norms,
Gemma 3 and Mistral with a sliding window shorter than the sequence, Phi-3's fused weights and
partial rotary, a llama3-scaled rotary, tied embeddings), in float32:

* the native step runs (nothing refused it), its teacher-forced logits match transformers'
  forward over the whole sequence within ``LOGIT_TOLERANCE``, and match transformers' own decode
  step over the same slot cache;
* greedy output is token-identical to plain, and log-likelihood choices are unchanged.

Biases and norm weights are randomised (a fresh model has zero biases and unit norms, which
would hide a bias added twice or a norm misapplied). A model or setting the step does not
implement is refused before it runs, or gives way at warm-up, and the note says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_fast_contract import FAMILIES, LL_REQUESTS, PROMPTS, SMALL, load
from torch._dynamo.utils import counters

from slmtui.tasks.base import GenerateRequest, LoglikelihoodResponse
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.fast.engine import CAPACITY_STEP
from slmtui.worker.engines.fast.graphs import buckets
from slmtui.worker.engines.fast.native import NativeDecoder, native_refusal
from slmtui.worker.engines.plain import PlainEngine
from slmtui.worker.engines.support import NATIVE_FAMILIES
from slmtui.worker.fusion import fuse_projections, fused_group
from slmtui.worker.quantize import weight_bytes

LOGIT_TOLERANCE = 1e-4
"""Largest |native - transformers| logit in float32 (measured: at most 6e-6, logits up to ~12)."""
FORCED = 12
"""Teacher-forced steps: every prompt then runs past the sliding windows (8 tokens) below."""


def _llama3_rope() -> Any:
    from transformers import LlamaConfig

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    }
    return LlamaConfig(**SMALL, rope_parameters=rope)


def _tied_qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**{**SMALL, "tie_word_embeddings": True})


def _sliding_qwen2() -> Any:
    """Layer 1 slides over 8 tokens (Qwen2's max_window_layers)."""
    from transformers import Qwen2Config

    return Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1)


def _sliding_mistral() -> Any:
    """Every layer slides over 8 tokens (Mistral's model slides every mask)."""
    from transformers import MistralConfig

    return MistralConfig(**SMALL, sliding_window=8)


def _partial_phi3() -> Any:
    from transformers import Phi3Config

    return Phi3Config(**SMALL, partial_rotary_factor=0.5)


CASES: dict[str, Callable[[], Any]] = {
    **FAMILIES,
    "llama-llama3-rope": _llama3_rope,
    "qwen2-tied": _tied_qwen2,
    "qwen2-sliding": _sliding_qwen2,
    "mistral-sliding": _sliding_mistral,
    "phi3-partial-rotary": _partial_phi3,
}


def build(path: Path, config: Any, tokenizer_dir: Path, seed: int = 0) -> None:
    """A random model of ``config`` with random biases and norm weights, saved to ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[str, Any, Any]:
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp(f"native-{request.param}")
    build(path, CASES[request.param](), tiny_model_dir)
    return request.param, *load(path)


def forward_logits(model: Any, prompts: list[list[int]], forced: list[list[int]]) -> torch.Tensor:
    """[rows, steps, vocab]: transformers' forward over each whole sequence, row by row."""
    rows = []
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, forced, strict=True):
            logits = model(torch.tensor([prompt + tokens])).logits[0].float()
            rows.append(logits[len(prompt) - 1 : -1])
    return torch.stack(rows)


def inputs(tokenizer: Any, n: int = 3) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [list(tokenizer(p)["input_ids"]) for p in PROMPTS[:n]]
    forced = [[4 + (7 * i + 3 * j) % 90 for j in range(FORCED)] for i in range(n)]
    return prompts, forced


def test_every_native_family_has_a_case():
    assert set(NATIVE_FAMILIES) <= set(CASES)


def test_teacher_forced_logits_match_transformers(case: tuple[str, Any, Any]):
    name, model, tokenizer = case
    assert native_refusal(model) is None, name
    prompts, forced = inputs(tokenizer)
    native = FastEngine(model, tokenizer, batch_size=3, decode_step="native")
    assert native.decode_step == "native", native.notes
    got = native.teacher_forced_logits(prompts, forced)
    want = forward_logits(model, prompts, forced)
    assert float((got - want).abs().max()) <= LOGIT_TOLERANCE, name
    steps = FastEngine(model, tokenizer, batch_size=3, decode_step="transformers")
    assert steps.decode_step == "transformers"
    theirs = steps.teacher_forced_logits(prompts, forced)
    assert float((got - theirs).abs().max()) <= LOGIT_TOLERANCE, name


def test_greedy_output_is_token_identical_to_plain(case: tuple[str, Any, Any]):
    name, model, tokenizer = case
    requests = [GenerateRequest(p, 8 + 2 * i) for i, p in enumerate(PROMPTS)]
    plain = {c.index: c for c in PlainEngine(model, tokenizer, batch_size=1).generate(requests)}
    for batch_size in (1, 3):
        engine = FastEngine(
            model, tokenizer, batch_size=batch_size, check_every_tokens=4, decode_step="native"
        )
        engine.warmup(requests[:2], [])
        assert engine.decode_step == "native", engine.notes
        fast = {c.index: c for c in engine.generate(requests)}
        for i in range(len(requests)):
            assert fast[i].response.text == plain[i].response.text, (name, batch_size, i)
            assert fast[i].tokens_out == plain[i].tokens_out


def test_loglikelihood_choices_are_unchanged(case: tuple[str, Any, Any]):
    name, model, tokenizer = case
    plain = {
        c.index: c for c in PlainEngine(model, tokenizer, batch_size=1).loglikelihood(LL_REQUESTS)
    }
    engine = FastEngine(model, tokenizer, batch_size=4, decode_step="native")
    engine.warmup([GenerateRequest(PROMPTS[0], 4)], LL_REQUESTS[:1])
    assert engine.decode_step == "native"
    for completed in engine.loglikelihood(LL_REQUESTS):
        got, ref = completed.response, plain[completed.index].response
        assert isinstance(got, LoglikelihoodResponse) and isinstance(ref, LoglikelihoodResponse)
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4), name
        assert got.greedy == ref.greedy


# -- one model, many settings -----------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("native-qwen2-one")
    build(path, FAMILIES["qwen2"](), tiny_model_dir, seed=1)
    return path


@pytest.fixture
def qwen2(qwen2_dir: Path) -> tuple[Any, Any]:
    """A fresh load for each test (some tests patch or hook it)."""
    torch.set_num_threads(1)
    return load(qwen2_dir)


def test_auto_runs_native_and_the_run_metric_says_so(qwen2: tuple[Any, Any]):
    model, tokenizer = qwen2
    engine = FastEngine(model, tokenizer, batch_size=2)
    assert engine.decode_step == "native"  # CPU: not compiled by default
    engine.warmup([GenerateRequest(PROMPTS[0], 4)], [])
    assert engine.warmup_report.native_max_abs_diff is not None
    assert engine.warmup_report.native_max_abs_diff <= 1e-5
    assert any("checked against transformers'" in note for note in engine.notes)


def test_the_setting_comes_from_the_environment(
    qwen2: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, tokenizer = qwen2
    monkeypatch.setenv("SLMTUI_DECODE_STEP", "transformers")
    assert FastEngine(model, tokenizer, batch_size=2).decode_step == "transformers"
    monkeypatch.setenv("SLMTUI_DECODE_STEP", "nativ")
    with pytest.raises(ValueError, match="decode_step 'nativ': one of auto, native"):
        FastEngine(model, tokenizer, batch_size=2)


def test_fusion_shares_the_models_own_memory_and_changes_nothing(qwen2: tuple[Any, Any]):
    model, tokenizer = qwen2
    ids = torch.tensor([list(tokenizer(PROMPTS[0])["input_ids"])])
    with torch.inference_mode():
        before = model(ids).logits
    stored = weight_bytes(model)
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    assert weight_bytes(model) == stored  # the fused matrices are the parameters' memory
    assert fuse_projections(model) == 0  # already fused
    attn = model.model.layers[0].self_attn
    group = fused_group(attn, ("q_proj", "k_proj", "v_proj"))
    assert group is not None and group.bias is not None
    assert attn.q_proj.weight.data_ptr() == group.weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == group.weight[group.sizes[0]].data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())
    assert fused_group(attn, ("q_proj", "k_proj", "v_proj")) is None  # no longer shared


def test_a_module_it_does_not_know_is_refused(
    qwen2: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, tokenizer = qwen2
    mlp = model.model.layers[1].mlp
    monkeypatch.setattr(mlp, "__class__", type("CustomMLP", (type(mlp),), {}))
    engine = FastEngine(model, tokenizer, batch_size=2)
    assert engine.decode_step == "transformers"
    assert engine.notes == [
        "fast engine: transformers' decode step (layer 1: Qwen2Attention / CustomMLP are not "
        "Qwen2Attention / Qwen2MLP)"
    ]


def test_forward_hooks_keep_transformers_step(qwen2: tuple[Any, Any]):
    model, tokenizer = qwen2
    handle = model.model.layers[0].register_forward_hook(lambda *args: None)
    try:
        engine = FastEngine(model, tokenizer, batch_size=2)
    finally:
        handle.remove()
    assert engine.decode_step == "transformers"
    assert "model.layers.0 has forward hooks" in engine.notes[0]


def test_a_native_step_that_differs_at_warm_up_gives_way(
    qwen2: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, tokenizer = qwen2
    honest = NativeDecoder.logits

    def off(self: Any, *args: Any) -> torch.Tensor:
        return honest(self, *args) + 1.0

    monkeypatch.setattr(NativeDecoder, "logits", off)
    requests = [GenerateRequest(p, 6) for p in PROMPTS]
    engine = FastEngine(model, tokenizer, batch_size=2)
    engine.warmup(requests[:2], [])
    assert engine.decode_step == "transformers"
    assert "differed from transformers' by" in engine.notes[-1]
    plain = {
        c.index: c.response.text
        for c in PlainEngine(model, tokenizer, batch_size=1).generate(requests)
    }
    assert {c.index: c.response.text for c in engine.generate(requests)} == plain


def test_a_native_step_that_raises_gives_way(
    qwen2: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, tokenizer = qwen2

    def broken(self: Any, *args: Any) -> torch.Tensor:
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(NativeDecoder, "logits", broken)
    engine = FastEngine(model, tokenizer, batch_size=2)
    engine.warmup([GenerateRequest(PROMPTS[0], 4)], [])
    assert engine.decode_step == "transformers"
    assert engine.notes[-1] == (
        "fast engine: transformers' decode step (the native step failed: RuntimeError: no "
        "kernel for this shape)"
    )


@pytest.fixture
def compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The compile cache in a temporary folder (never the user's), inductor's variable restored."""
    monkeypatch.setenv("SLMTUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    return tmp_path / "cache" / "compile"


def test_a_compiled_step_that_fails_to_compile_runs_eagerly(
    qwen2: tuple[Any, Any], compile_cache: Path
):
    model, tokenizer = qwen2

    def broken_backend(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("inductor is not installed")

    engine = FastEngine(
        model, tokenizer, batch_size=2, compile_step=True, compile_backend=broken_backend
    )  # type: ignore[arg-type]
    assert engine.decode_step == "native compiled"
    engine.warmup([GenerateRequest(PROMPTS[0], 4)], [])
    assert engine.decode_step == "native"
    assert any("the compiled native step failed" in note for note in engine.notes)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3_text"])
def test_the_compiled_layer_traces_whole_and_matches_eager(
    family: str, tmp_path: Path, tiny_model_dir: Path, compile_cache: Path
):
    """torch.compile (fullgraph, AOT autograd without inductor: the CPU has no time for it)
    takes the layer function whole, cache write included, and changes no logit."""
    torch.set_num_threads(1)
    build(tmp_path / family, FAMILIES[family](), tiny_model_dir)
    model, tokenizer = load(tmp_path / family)
    prompts, forced = inputs(tokenizer)
    eager = FastEngine(model, tokenizer, batch_size=4, decode_step="native", compile_step=False)
    want = eager.teacher_forced_logits(prompts, forced)
    torch._dynamo.reset()
    counters.clear()
    compiled = FastEngine(
        model, tokenizer, batch_size=4, compile_step=True, compile_backend="aot_eager"
    )
    compiled.warmup([GenerateRequest(p, 4) for p in PROMPTS[:4]], [])
    assert compiled.decode_step == "native compiled", compiled.notes
    got = compiled.teacher_forced_logits(prompts, forced)
    assert float((got - want).abs().max()) <= 1e-5
    compiled._step_idx.zero_()
    compiled._decode_step(2)  # the 2-row bucket runs the 4-row graph: rows are dynamic
    assert counters["stats"]["unique_graphs"] == 1
    assert (compile_cache / "inductor").is_dir()  # where inductor keeps what it compiles
    again = FastEngine(
        model, tokenizer, batch_size=2, compile_step=True, compile_backend="aot_eager"
    )
    assert again._native is not None and compiled._native is not None
    assert again._native.layer is compiled._native.layer  # the next run's engine compiles nothing


def test_compiled_steps_start_at_two_rows():
    """A size-1 dimension costs torch.compile a graph of its own: one row runs in two rows'."""
    assert buckets(16, smallest=2) == [2, 4, 8, 16]
    assert buckets(1, smallest=2) == [1]
    assert buckets(6) == [1, 2, 4, 6]


def test_the_cache_holds_the_runs_real_need(qwen2: tuple[Any, Any]):
    """Capacity = the longest prompt + its budget (+ the trash slot), rounded to 16; no margin
    when prepare saw every request."""
    model, tokenizer = qwen2
    requests = [GenerateRequest(p, 5 + i) for i, p in enumerate(PROMPTS)]
    engine = FastEngine(model, tokenizer, batch_size=2)
    engine.prepare(requests, [])
    need = max(len(tokenizer(r.prompt)["input_ids"]) + r.max_new_tokens for r in requests)
    engine.warmup(requests[:1], [])
    assert engine._cache is not None
    assert engine._cache.capacity == math.ceil((need + 1) / CAPACITY_STEP) * CAPACITY_STEP
    assert engine.warmup_report.cache_bytes == engine._cache.nbytes()


# -- settings it does not implement --------------------------------------------------------------


def test_a_config_feature_it_does_not_implement_runs_transformers_step(
    tmp_path: Path, tiny_model_dir: Path
):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        **SMALL,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=True,
    )
    build(tmp_path / "bidirectional", config, tiny_model_dir)
    model, tokenizer = load(tmp_path / "bidirectional")
    engine = FastEngine(model, tokenizer, batch_size=2)
    assert engine.decode_step == "transformers"
    assert engine.notes == [
        "fast engine: transformers' decode step (config 'use_bidirectional_attention' is set "
        "(True))"
    ]


def _longrope_phi3() -> Any:
    from transformers import Phi3Config

    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.1, 1.2, 1.3],
        "long_factor": [2.0, 3.0, 4.0, 5.0],
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 32,
    }
    return Phi3Config(**SMALL, original_max_position_embeddings=32, rope_parameters=rope)


def test_a_dynamic_rotary_runs_native_only_below_its_threshold(
    tmp_path: Path, tiny_model_dir: Path
):
    """Long RoPE switches frequencies once a call's longest position passes 32: below, the
    native step's table is the model's; a cache that reaches past it gives way."""
    build(tmp_path / "longrope", _longrope_phi3(), tiny_model_dir)
    model, tokenizer = load(tmp_path / "longrope")
    prompts, forced = inputs(tokenizer, 2)
    short = [f[:4] for f in forced]
    engine = FastEngine(model, tokenizer, batch_size=2, decode_step="native")
    got = engine.teacher_forced_logits([p[:8] for p in prompts], short)  # 12 slots + trash
    assert engine.decode_step == "native"
    want = forward_logits(model, [p[:8] for p in prompts], short)
    assert float((got - want).abs().max()) <= LOGIT_TOLERANCE
    engine.teacher_forced_logits([p * 2 for p in prompts], forced)  # grows past 32
    assert engine.decode_step == "transformers"
    assert any("rotary embedding changes past 32 positions" in note for note in engine.notes)


# -- quantised weights ------------------------------------------------------------------------


def test_int8_native_step_reads_fused_quantised_projections(
    qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """worker.quantize quantises QKV and gate/up fused; the model's own layers get row slices
    of the same quantised matrices (their forward unchanged: equal to quantising each layer
    alone), and the native step reads each group with one product."""
    pytest.importorskip("torchao")
    from slmtui.spec import ModelRef
    from slmtui.worker import quantize
    from slmtui.worker.loading import load_model

    torch.set_num_threads(1)
    ref = ModelRef("qwen2", str(qwen2_dir), "local")
    loaded = load_model(ref, dtype="float32", quantize="int8")
    assert loaded is not None
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = model.config.num_hidden_layers
    assert loaded.metrics["quantize_fused_groups"] == 2 * layers
    assert "quantize_unfused" not in loaded.metrics
    monkeypatch.setattr(quantize, "fuses_projections", lambda model: False)
    alone = load_model(ref, dtype="float32", quantize="int8")
    assert alone is not None and "quantize_fused_groups" not in alone.metrics
    prompts, forced = inputs(tokenizer)
    ids = torch.tensor([prompts[0] + forced[0]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, alone.model(ids).logits)

    engine = FastEngine(model, tokenizer, batch_size=3, decode_step="native")
    assert engine.decode_step == "native" and engine._native is not None
    qkv = engine._native.layout.weights[0]["qkv"]
    assert type(qkv).__name__ == "Int8Tensor" and qkv.shape[0] == 32 + 2 * 16
    got = engine.teacher_forced_logits(prompts, forced)
    theirs = FastEngine(model, tokenizer, batch_size=3, decode_step="transformers")
    assert float((got - theirs.teacher_forced_logits(prompts, forced)).abs().max()) <= 1e-5
    requests = [GenerateRequest(p, 10) for p in PROMPTS]
    plain = {
        c.index: c.response.text
        for c in PlainEngine(model, tokenizer, batch_size=1).generate(requests)
    }
    assert {c.index: c.response.text for c in engine.generate(requests)} == plain


def test_the_compile_cache_lives_in_slmtuis_cache_unless_the_user_chose_one(
    compile_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from slmtui.worker.engines.fast.compiling import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch sets itself
    assert use_compile_cache() == compile_cache / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compile_cache / "inductor")
    mine = tmp_path / "my-inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
    assert use_compile_cache() == mine and mine.is_dir()
