"""The llamacpp engine on a fake of the llama_cpp calls it makes: loading a GGUF file, greedy
generation cut and counted by plain's rules, log-likelihood arithmetic, the KV cache kept for a
shared prefix, and refusals. The real library runs in tests/e2e/test_llamacpp_real_model.py."""

from __future__ import annotations

import ctypes
import math
import struct
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from slmtui.spec import ModelRef, RunSpec
from slmtui.tasks.base import GenerateRequest, LoglikelihoodRequest
from slmtui.worker.engines import get_engine, start_engine
from slmtui.worker.engines.base import LoadError
from slmtui.worker.engines.llamacpp import (
    LlamaCppEngine,
    LlamaRuntime,
    continuation_logprob,
    thread_count,
)
from slmtui.worker.loading import gguf_header

BOS, EOS = 0, 1
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = 2 + len(CHARS)


def char_id(c: str) -> int:
    return 2 + CHARS.index(c)


@dataclass
class FakeBatch:
    n: int
    n_tokens: int = 0
    token: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    n_seq_id: list[int] = field(default_factory=list)
    seq_id: list[list[int]] = field(default_factory=list)
    logits: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token, self.pos, self.n_seq_id = [0] * self.n, [0] * self.n, [0] * self.n
        self.seq_id, self.logits = [[0] for _ in range(self.n)], [False] * self.n


class FakeModel:
    """A character model: after a prompt it was given a reply for, it writes that reply
    (logit 10 for the reply's next character, 0 elsewhere) and then EOS; otherwise the logits
    come from ``bigram`` (last character -> (next character, its logit)), else all 0."""

    def __init__(self) -> None:
        self.replies: dict[str, str] = {}
        self.bigram: dict[str, tuple[str, float]] = {}

    def row(self, history: list[int]) -> np.ndarray:
        row = np.zeros(VOCAB, dtype=np.float32)
        text = "".join(CHARS[t - 2] for t in history if t >= 2)
        for prompt, reply in sorted(self.replies.items(), key=lambda kv: -len(kv[0])):
            if text.startswith(prompt) and reply.startswith(text[len(prompt) :]):
                done = len(text) - len(prompt)
                row[char_id(reply[done]) if done < len(reply) else EOS] = 10.0
                return row
        if text and text[-1] in self.bigram:
            char, logit = self.bigram[text[-1]]
            row[char_id(char)] = logit
        return row


class FakeContext:
    def __init__(self, model: FakeModel, n_ctx: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.cache: list[int] = []
        self.out = np.zeros((1, VOCAB), dtype=np.float32)
        self.calls: list[tuple[int, int]] = []
        """(tokens, outputs) of every decode."""


class FakeLlama:
    made: ClassVar[list[FakeLlama]] = []

    def __init__(self, *, model_path: str, n_ctx: int, n_gpu_layers: int, **kwargs: Any) -> None:
        self.model_path, self.kwargs, self.n_gpu_layers = model_path, kwargs, n_gpu_layers
        self.model = FakeModel()
        self.ctx = FakeContext(self.model, n_ctx)
        self.closed = False
        FakeLlama.made.append(self)

    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def n_vocab(self) -> int:
        return VOCAB

    def token_bos(self) -> int:
        return BOS

    def token_eos(self) -> int:
        return EOS

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        decoded = text.decode()
        ids = [BOS] if add_bos else []
        i = 0
        while i < len(decoded):
            if special and decoded.startswith("</s>", i):
                ids.append(EOS)
                i += 4
            else:
                ids.append(char_id(decoded[i]))
                i += 1
        return ids

    def detokenize(
        self, tokens: list[int], prev_tokens: Any = None, special: bool = False
    ) -> bytes:
        specials = {BOS: "<s>", EOS: "</s>"}
        text = "".join(CHARS[t - 2] if t >= 2 else (specials[t] if special else "") for t in tokens)
        return text.encode()

    def close(self) -> None:
        self.closed = True


def fake_llama_cpp(gpu_offload: bool = False) -> types.ModuleType:
    lib = types.ModuleType("llama_cpp")
    lib.__version__ = "0.3.36-fake"  # type: ignore[attr-defined]
    lib.Llama = FakeLlama  # type: ignore[attr-defined]

    def decode(ctx: FakeContext, batch: FakeBatch) -> int:
        rows = []
        for i in range(batch.n_tokens):
            assert batch.pos[i] == len(ctx.cache), "a token at a position the cache does not hold"
            assert batch.n_seq_id[i] == 1 and batch.seq_id[i][0] == 0
            if len(ctx.cache) >= ctx.n_ctx:
                return 1  # no KV slot
            ctx.cache.append(batch.token[i])
            if batch.logits[i]:
                rows.append(ctx.model.row(ctx.cache))
        ctx.calls.append((batch.n_tokens, len(rows)))
        ctx.out = np.stack(rows) if rows else np.zeros((1, VOCAB), dtype=np.float32)
        return 0

    def seq_rm(memory: FakeContext, seq: int, p0: int, p1: int) -> bool:
        assert seq == 0 and p1 == -1
        del memory.cache[p0:]
        return True

    lib.llama_decode = decode  # type: ignore[attr-defined]
    lib.llama_get_logits = lambda ctx: ctx.out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # type: ignore[attr-defined]
    lib.llama_batch_init = lambda n, embd, seqs: FakeBatch(n)  # type: ignore[attr-defined]
    lib.llama_batch_free = lambda batch: None  # type: ignore[attr-defined]
    lib.llama_get_memory = lambda ctx: ctx  # type: ignore[attr-defined]
    lib.llama_memory_seq_rm = seq_rm  # type: ignore[attr-defined]
    lib.llama_memory_clear = lambda memory, data: memory.cache.clear()  # type: ignore[attr-defined]
    lib.llama_model_get_vocab = lambda model: model  # type: ignore[attr-defined]
    lib.llama_vocab_is_eog = lambda vocab, token: token == EOS  # type: ignore[attr-defined]
    lib.llama_supports_gpu_offload = lambda: gpu_offload  # type: ignore[attr-defined]
    lib.llama_model_size = lambda model: 98_000_000  # type: ignore[attr-defined]
    lib.llama_print_system_info = lambda: b"CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 |"  # type: ignore[attr-defined]
    return lib


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, context_length: int = 8192) -> Path:
    """A GGUF header with no tensors: a llama, its trained context, file type Q4_1."""
    kv = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1) + _string("<s>"),
        _string("llama.context_length") + struct.pack("<II", 4, context_length),
        _string("general.file_type") + struct.pack("<II", 4, 3),
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))
    return path


@pytest.fixture
def lib(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake = fake_llama_cpp()
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    FakeLlama.made = []
    return fake


def spec_for(path: Path, **kwargs: Any) -> RunSpec:
    ref = ModelRef("tiny-gguf", str(path), "gguf")
    return RunSpec(model=ref, task="gsm8k", engine="llamacpp", **kwargs)


def started(lib: Any, tmp_path: Path, batch_size: int | str = 1, **kwargs: Any) -> LlamaCppEngine:
    loaded = LlamaCppEngine.load(spec_for(write_gguf(tmp_path / "m.gguf"), **kwargs))
    engine = start_engine("llamacpp", loaded, batch_size=batch_size).engine
    assert isinstance(engine, LlamaCppEngine)
    return engine


def fake_of(engine: LlamaCppEngine) -> FakeLlama:
    return engine.runtime.llm


# -- loading ------------------------------------------------------------------------------------


def test_the_gguf_loads_in_llama_cpp_and_the_run_says_so(
    lib: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert get_engine("llamacpp") is LlamaCppEngine
    path = write_gguf(tmp_path / "m.gguf", context_length=2048)
    loaded = LlamaCppEngine.load(spec_for(path))
    assert loaded.loader == "llamacpp" and loaded.device.type == "cpu"
    assert loaded.dtype_name == "Q4_1" and loaded.path == str(path)
    assert loaded.metrics == {
        "weights": "gguf Q4_1 as stored (llama.cpp)",
        "weight_bytes": 98_000_000,
        "quantize": "none",
        "quantize_scheme": None,
        "device": "cpu",
        "threads": 3,
        "llama_cpp_version": "0.3.36-fake",
    }
    assert loaded.notes == [
        "llama.cpp (llama-cpp-python 0.3.36-fake, CPU build: SSE3 AVX AVX2), on the CPU, "
        "3 threads; context 2048 tokens"
    ]
    (llm,) = FakeLlama.made
    assert llm.model_path == str(path) and llm.n_gpu_layers == 0
    assert llm.kwargs["n_threads"] == llm.kwargs["n_threads_batch"] == 3
    assert llm.n_ctx() == 2048  # the model's trained length is below CONTEXT_TOKENS


def test_the_header_reader_finds_strings_and_integers(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", context_length=131072)
    assert gguf_header(path, ("general.architecture", "llama.context_length", "nope")) == {
        "general.architecture": "llama",
        "llama.context_length": 131072,
    }


def test_refusals_at_load(lib: Any, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(LoadError, match="quantize must be 'none', not 'int8'"):
        LlamaCppEngine.load(spec_for(path, quantize="int8"))
    with pytest.raises(LoadError, match="dtype must be 'auto', not 'bfloat16'"):
        LlamaCppEngine.load(spec_for(path, dtype="bfloat16"))
    with pytest.raises(LoadError, match="runs on the CPU or one GPU, not 2 GPUs"):
        LlamaCppEngine.load(spec_for(path, gpus=2))
    with pytest.raises(LoadError, match=r"is a CPU build .* use gpus = 0"):
        LlamaCppEngine.load(spec_for(path, gpus=1))
    hub = RunSpec(model=ModelRef("Qwen", "Qwen/Qwen2.5-0.5B", "hub"), task="gsm8k")
    with pytest.raises(LoadError, match="is not a GGUF file"):
        LlamaCppEngine.load(hub)
    with pytest.raises(LoadError, match="does not exist"):
        LlamaCppEngine.load(spec_for(tmp_path / "missing.gguf"))


def test_a_gpu_build_offloads_every_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_llama_cpp(gpu_offload=True))
    FakeLlama.made = []
    loaded = LlamaCppEngine.load(spec_for(write_gguf(tmp_path / "m.gguf"), gpus=1))
    assert FakeLlama.made[0].n_gpu_layers == -1
    assert loaded.metrics["device"] == "cuda:0" and loaded.metrics["threads"] is None
    assert loaded.device.type == "cpu"  # torch holds nothing: no CUDA context from the runner


def test_without_llama_cpp_the_load_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(LoadError, match=r"needs llama_cpp .* pip install 'slmtui\[llamacpp\]'"):
        LlamaCppEngine.load(spec_for(write_gguf(tmp_path / "m.gguf")))


def test_threads_follow_omp_num_threads_else_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert thread_count() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    assert thread_count() == len(__import__("os").sched_getaffinity(0))


# -- generate -----------------------------------------------------------------------------------


def test_greedy_generation_stops_at_a_stop_string_and_counts_as_plain(
    lib: Any, tmp_path: Path
) -> None:
    engine = started(lib, tmp_path)
    llm = fake_of(engine)
    llm.model.replies = {"Q: 6*7?\nA:": " 42\n\nQ: next", "Hi": "!!!!!!!!", "Go": "ab"}
    requests = [
        GenerateRequest("Q: 6*7?\nA:", max_new_tokens=20, stop=("\n\n",)),
        GenerateRequest("Hi", max_new_tokens=3),
        GenerateRequest("Go", max_new_tokens=10),
    ]
    done = {c.index: c for c in engine.generate(requests)}
    # the stop string "\n\n" is completed by the 5th token (" 42\n\n"): 5 tokens, text cut
    assert done[0].response.text == " 42" and done[0].tokens_out == 5
    assert done[0].tokens_in == len("Q: 6*7?\nA:") + 1  # BOS + one token per character
    # the budget: 3 tokens, no stop
    assert done[1].response.text == "!!!" and done[1].tokens_out == 3
    # EOS after "ab": it counts, its text does not
    assert done[2].response.text == "ab" and done[2].tokens_out == 3
    assert all(c.batch == c.index and c.ttft_s is not None for c in done.values())
    assert done[1].itl_s is not None
    assert engine.live_tokens == 5 + 3 + 3


def test_the_cache_keeps_a_shared_prefix_and_warm_up_leaves_it_cold(
    lib: Any, tmp_path: Path
) -> None:
    engine = started(lib, tmp_path)
    llm = fake_of(engine)
    shared = "Q: 1+1=2\nQ: 2+2=4\n"
    llm.model.replies = {shared + "Q: 3+3=": "6", shared + "Q: 4+4=": "8"}
    first = GenerateRequest(shared + "Q: 3+3=", max_new_tokens=4)
    second = GenerateRequest(shared + "Q: 4+4=", max_new_tokens=4)
    engine.prepare([first, second], [])
    engine.warmup([first], [])
    assert llm.ctx.cache == [] and engine.runtime.prompt_tokens == 0
    llm.ctx.calls.clear()
    answers = [c.response.text for c in engine.generate([first, second])]
    assert answers == ["6", "8"]
    prompt = len(first.prompt) + 1
    shared_tokens = len(shared) + 1 + len("Q: ")
    # the first prompt in full, then its answer (one step: "6" then EOS); the second prompt
    # from where it parts from the first: the cache dropped the rest
    assert llm.ctx.calls == [(prompt, 1), (1, 1), (prompt - shared_tokens, 1), (1, 1)]
    assert engine.runtime.reused_tokens == shared_tokens
    assert any("were not evaluated again" in note for note in engine.notes)


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(lib: Any, tmp_path: Path) -> None:
    engine = started(lib, tmp_path)
    engine.runtime.n_ctx = 16
    llm = fake_of(engine)
    llm.ctx.n_ctx = 16
    long = "x" * 30
    (done,) = engine.generate([GenerateRequest(long, max_new_tokens=4)])
    assert done.tokens_in == 12
    assert engine.truncated == 1 and "kept their last tokens" in engine.notes[-1]


def test_batch_size_is_one_and_another_setting_is_noted(lib: Any, tmp_path: Path) -> None:
    engine = started(lib, tmp_path, batch_size=8)
    assert engine.batch_size == 1 and engine.batch_size_used(8) == 1
    assert engine.notes == ["batch_size 8: the llamacpp engine answers one request at a time"]
    assert started(lib, tmp_path, batch_size="auto").notes == []


# -- loglikelihood ------------------------------------------------------------------------------


def test_continuation_logprob_by_hand() -> None:
    rows = np.zeros((2, 4), dtype=np.float32)
    rows[0, 1] = 2.0
    logprob, greedy = continuation_logprob(rows, [1, 3])
    by_hand = (2.0 - math.log(math.exp(2.0) + 3)) + (-math.log(4))
    assert logprob == pytest.approx(by_hand, abs=1e-12)
    assert greedy is False  # token 3 is not the argmax of an all-zero row (token 0 is)
    assert continuation_logprob(rows[:1], [1]) == (
        pytest.approx(2.0 - math.log(math.exp(2) + 3)),
        True,
    )
    assert continuation_logprob(rows[:0], []) == (0.0, True)


def test_loglikelihood_sums_the_continuation_tokens_given_the_context(
    lib: Any, tmp_path: Path
) -> None:
    engine = started(lib, tmp_path)
    llm = fake_of(engine)
    llm.model.bigram = {"a": ("b", 2.0)}
    request = LoglikelihoodRequest(context="xa", continuations=("b", "bc", "q"))
    llm.ctx.calls.clear()
    (done,) = engine.loglikelihood([request])
    high = 2.0 - math.log(math.exp(2.0) + VOCAB - 1)  # the bigram's choice after "a"
    low = -math.log(math.exp(2.0) + VOCAB - 1)  # any other token after "a"
    uniform = -math.log(VOCAB)  # after "b": every logit 0
    assert done.response.logprobs == pytest.approx((high, high + uniform, low))
    assert done.response.greedy == (True, False, False)
    # as the fast engine counts: the context (BOS x a) once, each continuation but its last
    # token ("b" of "bc")
    assert done.tokens_in == 3 + 1 and done.tokens_out == 0
    # logits only where a continuation token is predicted; of the context only its last token
    # is fed again (its logits are not kept)
    assert llm.ctx.calls == [(3, 1), (2, 2), (1, 1)]


def test_an_empty_context_starts_from_bos(lib: Any, tmp_path: Path) -> None:
    engine = started(lib, tmp_path)
    assert engine.encode_pair("", "hi") == ([BOS], [char_id("h"), char_id("i")])
    assert engine.encode_pair("Answer: ", "yes") == (
        [BOS, *(char_id(c) for c in "Answer:")],
        [char_id(c) for c in " yes"],
    )


def test_the_runtime_evaluates_long_inputs_in_chunks(lib: Any, tmp_path: Path) -> None:
    llm = FakeLlama(model_path="m", n_ctx=64, n_gpu_layers=0)
    runtime = LlamaRuntime(llm, lib, batch_tokens=8)
    rows = runtime.logits(list(range(2, 22)), 15)
    assert rows.shape == (5, VOCAB)
    assert llm.ctx.calls == [(8, 0), (8, 1), (4, 4)]
    runtime.close()
    assert llm.closed


def test_an_empty_prompt_starts_from_bos(lib: Any, tmp_path: Path) -> None:
    engine = started(lib, tmp_path)
    fake_of(engine).model.bigram = {}
    engine.runtime.tokenize = lambda text, special: []  # type: ignore[method-assign]
    (done,) = engine.generate([GenerateRequest("", max_new_tokens=2)])
    assert done.tokens_in == 1 and done.tokens_out == 2
