"""The fast engine's contract, per model family: the same answers as ``plain``, or ``plain`` itself.

For every family the profiles name, a tiny random model built from that family's config (fp32,
CPU) must give greedy output token-identical to plain's and identical log-likelihood choices.
These tests run against whatever transformers is installed, so a release that changes how a
family's layers call the cache or the attention shows up here by family, not as a crash in a
sweep. A model the fast engine does not cover runs plain, and the run says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from slmtui.metrics import FIELD_NAMES
from slmtui.spec import ModelRef, RunSpec, TaskOptions
from slmtui.tasks.base import GenerateRequest, LoglikelihoodRequest, LoglikelihoodResponse
from slmtui.worker.engines import start_engine
from slmtui.worker.engines.fast import FastEngine
from slmtui.worker.engines.plain import PlainEngine
from slmtui.worker.engines.support import FAST_FAMILIES, fast_refusal
from slmtui.worker.loading import loaded_transformers

VOCAB = 3 + 96 + 8
"""The tiny tokenizer's 99 tokens (tests/worker/conftest.py: BOS, EOS, UNK, 96 characters) and
room for the specials a family's own tokenizer class adds (Qwen2's adds a pad token)."""
SMALL: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SMALL)


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**SMALL, sliding_window=None)


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**SMALL)


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**SMALL, head_dim=8)


def _gemma2() -> Any:
    """Gemma 3's layout without query/key norms, with soft-capped attention scores and logits
    (caps low enough that tiny random weights reach them)."""
    from transformers import Gemma2Config

    return Gemma2Config(
        **SMALL,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=8,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=5.0,
    )


def _gemma3() -> Any:
    """Layer 0 slides over 8 tokens, layer 1 attends to everything: prompts below are longer."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **SMALL,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=8,
    )


def _phi3() -> Any:
    from transformers import Phi3Config

    return Phi3Config(**SMALL)


FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
    "phi3": _phi3,
}

PROMPTS = (
    "Question: what is 2+2?\nAnswer:",
    "The cat sat on the",
    "A",
    "Once upon a time, in a land far away, there lived a",
    "x = 1; y = 2; z =",
)
LL_REQUESTS = [
    LoglikelihoodRequest("The capital of France is", (" Paris", " London", " Rome")),
    LoglikelihoodRequest("2 + 2 =", (" 4", " 5")),
    LoglikelihoodRequest("A long context that is longer than a sliding window:", (" yes", " no")),
]


def build_family(path: Path, config: Any, tokenizer_dir: Path, seed: int = 0) -> None:
    """Save a random model of ``config``'s family with the tiny tokenizer to ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider logits than the default init: fewer near-ties
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)


def load(path: Path) -> tuple[Any, Any]:
    from slmtui.worker.loading import load_model

    loaded = load_model(ModelRef(path.name, str(path), "local"), dtype="float32")
    assert loaded is not None
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[str, Any, Any]:
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_family(path, FAMILIES[request.param](), tiny_model_dir)
    return request.param, *load(path)


def test_every_verified_family_has_a_contract_test():
    assert set(FAMILIES) == set(FAST_FAMILIES)


def test_family_greedy_output_is_token_identical_to_plain(family_model: tuple[str, Any, Any]):
    family, model, tokenizer = family_model
    assert model.config.model_type == family and fast_refusal(model) is None
    requests = [GenerateRequest(p, 6 + 2 * i) for i, p in enumerate(PROMPTS)]
    plain = {c.index: c for c in PlainEngine(model, tokenizer, batch_size=1).generate(requests)}
    for batch_size in (1, 3):
        engine = FastEngine(model, tokenizer, batch_size=batch_size, check_every_tokens=4)
        fast = {c.index: c for c in engine.generate(requests)}
        assert sorted(fast) == list(range(len(requests)))
        for i in range(len(requests)):
            assert fast[i].response.text == plain[i].response.text, (family, batch_size, i)
            assert fast[i].tokens_out == plain[i].tokens_out


def test_family_loglikelihood_choices_match_plain(family_model: tuple[str, Any, Any]):
    family, model, tokenizer = family_model
    plain = {
        c.index: c for c in PlainEngine(model, tokenizer, batch_size=1).loglikelihood(LL_REQUESTS)
    }
    fast = {
        c.index: c for c in FastEngine(model, tokenizer, batch_size=4).loglikelihood(LL_REQUESTS)
    }
    for i in range(len(LL_REQUESTS)):
        got, ref = fast[i].response, plain[i].response
        assert isinstance(got, LoglikelihoodResponse) and isinstance(ref, LoglikelihoodResponse)
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4), family
        assert got.greedy == ref.greedy
        assert got.logprobs.index(max(got.logprobs)) == ref.logprobs.index(max(ref.logprobs))


# -- the fallback ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A tiny random GPT-2: an architecture the fast engine is not verified on."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    build_family(path, config, tiny_model_dir)
    return path


def test_an_unverified_architecture_runs_plain_and_says_why(gpt2_dir: Path):
    model, tokenizer = load(gpt2_dir)
    notes: list[str] = []
    started = start_engine(
        "fast", loaded_transformers(model, tokenizer), batch_size=2,
        warmup_generate=[GenerateRequest("Hello", 3)], notes=notes,
    )  # fmt: skip
    assert started.engine.name == "plain"
    assert started.fallback is not None and "architecture 'gpt2'" in started.fallback
    assert notes == [started.fallback]


def test_a_fast_engine_failing_in_warm_up_gives_way_to_plain(
    family_model: tuple[str, Any, Any], monkeypatch: pytest.MonkeyPatch
):
    """What transformers 5.24 did to 5.17's cache: a call the slot cache did not take."""
    _, model, tokenizer = family_model

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise TypeError("SlotCache.update() got an unexpected keyword argument 'kwargs'")

    monkeypatch.setattr(FastEngine, "warmup", refuse)
    started = start_engine(
        "fast",
        loaded_transformers(model, tokenizer),
        batch_size=2,
        warmup_generate=[GenerateRequest("Hi", 2)],
    )
    assert started.engine.name == "plain"
    assert started.fallback == (
        "fast engine: it failed in its set-up (TypeError: SlotCache.update() got an "
        "unexpected keyword argument 'kwargs'); ran plain"
    )
    assert model.config._attn_implementation != "slmtui_fast_gqa"


def test_a_fast_engine_that_cannot_even_be_built_gives_way_to_plain(
    family_model: tuple[str, Any, Any], monkeypatch: pytest.MonkeyPatch
):
    """A transformers release that moved an API the engine uses when it is constructed."""
    _, model, tokenizer = family_model

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ImportError("cannot import name 'AttentionInterface' from 'transformers'")

    monkeypatch.setattr(FastEngine, "__init__", refuse)
    started = start_engine(
        "fast",
        loaded_transformers(model, tokenizer),
        batch_size=2,
        warmup_generate=[GenerateRequest("Hi", 2)],
    )
    assert started.engine.name == "plain"
    assert started.fallback is not None and "ImportError: cannot import name" in started.fallback


def test_out_of_memory_in_the_fast_warm_up_is_not_hidden_by_the_fallback(
    family_model: tuple[str, Any, Any], monkeypatch: pytest.MonkeyPatch
):
    _, model, tokenizer = family_model

    def oom(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FastEngine, "warmup", oom)
    with pytest.raises(torch.OutOfMemoryError):
        start_engine(
            "fast",
            loaded_transformers(model, tokenizer),
            batch_size=2,
            warmup_generate=[GenerateRequest("Hi", 2)],
        )


def test_a_run_on_a_refused_model_stores_plain_with_the_reason(
    gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from slmtui.worker.runner import run_spec

    monkeypatch.setenv("SLMTUI_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "arc.jsonl"
    docs = [
        {
            "id": f"q{i}",
            "question": f"Which planet is number {i}?",
            "choices": {"text": ["Mars", "Venus"], "label": ["A", "B"]},
            "answerKey": "B",
        }
        for i in range(2)
    ]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    spec = RunSpec(
        model=ModelRef("tiny-gpt2", str(gpt2_dir), "local"),
        task="arc_easy",
        options=TaskOptions(data_file=str(data), mode="generate"),
        engine="fast",
        dtype="float32",
        batch_size=2,
    )
    from slmtui.worker import loading

    loads: list[str] = []
    load_model = loading.load_model

    def counted(*args: Any, **kwargs: Any) -> Any:
        loads.append(args[0].name)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", counted)
    metrics = run_spec(spec, "r1", lambda event: None)
    assert metrics is not None and metrics["n_samples"] == 2
    assert loads == ["tiny-gpt2"]  # plain ran on the model fast was given: no second load
    assert metrics["engine"] == "plain" and metrics["engine_requested"] == "fast"
    assert "architecture 'gpt2'" in metrics["engine_fallback"]
    assert metrics["engine_fallback"] in metrics["notes"]
    # every key the run reports is a documented RunMetrics field
    assert set(metrics) - FIELD_NAMES == set()
