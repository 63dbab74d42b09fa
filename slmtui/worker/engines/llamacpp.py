"""The llama.cpp engine: a GGUF file run at its own quantisation (llama-cpp-python).

load
    The GGUF file itself (an offline catalog model or a ``.gguf`` path), opened by llama.cpp: no
    transformers model, no conversion, no dequantisation. ``weights`` says "gguf Q4_1 as stored
    (llama.cpp)", ``weight_bytes`` is llama.cpp's size of the model's tensors, ``dtype`` the
    file's type. The context holds ``CONTEXT_TOKENS`` (the model's trained length when that is
    shorter); llama.cpp allocates its KV cache for it at load. Threads: ``OMP_NUM_THREADS`` when
    set, else every CPU this process may run on (``threads``). ``gpus = 0`` runs on the CPU;
    ``gpus = 1`` offloads every layer (``n_gpu_layers=-1``) and needs a build with a GPU backend,
    else the load is refused (a CPU build never pretends to be a GPU run). ``quantize`` and
    ``dtype`` do not apply, and several GPUs are not offered: the profile refuses them
    (``slmtui.spec.ENGINE_NEEDS``), and so does ``load``.

generate
    One request at a time (``batch_size`` 1; another setting is noted), greedy: the argmax of
    llama.cpp's logits at every step. A stop string (checked on the last ``stop_window`` tokens'
    text), the request's token budget or one of llama.cpp's end-of-generation tokens ends it;
    the output is cut and counted by plain's rule (``finish_generation``). A prompt longer than
    the context less its budget keeps its last tokens (noted).

loglikelihood
    Each (context, continuation) pair is tokenised as plain does it (``split_pair``) and
    evaluated with logits requested for the continuation's positions only (llama.cpp's
    per-token output flags; ``logits_all`` would compute and copy every position's); the sum of
    the continuation tokens' log-softmax (float64) is its log-probability, ``greedy`` whether
    each of them is the argmax (lm-evaluation-harness's conventions). An input longer than the
    context keeps its last tokens, as plain's does beyond the model's window. ``tokens_in``
    counts a request's input tokens as the fast engine does: its context once, and each
    continuation but its last token (which is only predicted).

llama.cpp's KV cache is kept between requests: a prompt that shares a prefix with the one
before evaluates only the rest (llama-cpp-python's own completion does the same); the run notes
how many prompt tokens that spared. Warm-up ends with an empty cache, so the window starts cold.
Tokens are llama.cpp's own, from the GGUF's vocabulary (for SmolLM2-135M they are the converted
tokenizer's, which tests/e2e/test_llamacpp_real_model.py checks).

``LlamaRuntime`` is the only code that touches llama_cpp (imported in ``load``, never at module
import): the tests run the engine on a fake of the few calls it makes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slmtui.tasks.base import (
    GenerateRequest,
    GenerateResponse,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
)
from slmtui.worker.engines.base import Completed, Engine, LoadedModel, LoadError, Step
from slmtui.worker.engines.plain import (
    finish_generation,
    first_stop,
    pair_texts,
    split_pair,
    stop_window,
    warmup_generations,
)

if TYPE_CHECKING:
    from slmtui.spec import RunSpec

CONTEXT_TOKENS = 4096
"""Tokens llama.cpp's context (and KV cache) holds, unless the model was trained on fewer."""
BATCH_TOKENS = 512
"""Most tokens in one ``llama_decode`` call (llama-cpp-python's default ``n_batch``)."""
INSTALL_HINT = (
    "pip install 'slmtui[llamacpp]' (llama-cpp-python builds llama.cpp from source: "
    "a C++ compiler and cmake)"
)
GPU_BUILD_HINT = (
    "CMAKE_ARGS='-DGGML_CUDA=on' pip install --no-cache-dir --force-reinstall "
    "llama-cpp-python (needs the CUDA toolkit)"
)


def thread_count() -> int:
    """``OMP_NUM_THREADS`` when it is a whole number >= 1, else every CPU this process may use."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def continuation_logprob(rows: np.ndarray, target: Sequence[int]) -> tuple[float, bool]:
    """(sum of log p(target[i]) under the softmax of ``rows[i]``, whether every target token
    is its row's argmax). ``rows`` holds one row of logits per target token."""
    if not len(target):
        return 0.0, True
    logits = rows.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = logp[np.arange(len(target)), np.asarray(target)]
    greedy = bool((logits.argmax(axis=1) == np.asarray(target)).all())
    return float(picked.sum()), greedy


class LlamaRuntime:
    """The part of llama-cpp-python the engine uses: its tokenizer, and logits for chosen
    positions with the KV cache kept for a shared prefix.

    ``llm`` is a ``llama_cpp.Llama``; decoding goes through llama.h's own calls
    (``llama_decode`` on a ``llama_batch`` whose output flags mark the positions wanted).
    """

    def __init__(self, llm: Any, lib: Any, batch_tokens: int = BATCH_TOKENS) -> None:
        self.llm = llm
        self.lib = lib
        self.ctx = llm.ctx
        self.n_ctx = int(llm.n_ctx())
        self.n_vocab = int(llm.n_vocab())
        self.vocab = lib.llama_model_get_vocab(llm.model)
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch_tokens = batch_tokens
        self.batch = lib.llama_batch_init(batch_tokens, 0, 1)
        self.cached: list[int] = []
        """The tokens whose keys and values the context holds, position by position."""
        self.prompt_tokens = 0
        """Tokens asked for through ``logits`` (prompts and log-likelihood inputs)."""
        self.reused_tokens = 0
        """Of those, tokens served by the cache (a prefix shared with the previous call)."""

    # -- tokens ---------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        token = int(self.llm.token_bos())
        return token if token >= 0 else None

    @property
    def eos_id(self) -> int | None:
        token = int(self.llm.token_eos())
        return token if token >= 0 else None

    def tokenize(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``; ``special``: add the vocabulary's own BOS (and EOS) where it
        says to, as a transformers tokenizer's ``add_special_tokens``. Special-token text in
        ``text`` is read as that token, as transformers does."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=special, special=True))

    def detokenize(self, ids: Sequence[int], special: bool) -> str:
        """The text of ``ids``; without ``special``, control tokens (BOS, EOS) give no text."""
        raw = self.llm.detokenize(list(ids), special=special)
        return bytes(raw).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """An end-of-generation token (EOS, end-of-turn, ...) by the model's vocabulary."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # -- logits ---------------------------------------------------------------------------------

    def logits(self, tokens: Sequence[int], first: int) -> np.ndarray:
        """Logits (float32, one row per position) after each of ``tokens[first:]``, having
        evaluated ``tokens``; what the cache holds of their prefix is not evaluated again."""
        tokens = list(tokens)
        if not tokens or first >= len(tokens):
            return np.empty((0, self.n_vocab), dtype=np.float32)
        common = 0
        for held, token in zip(self.cached, tokens, strict=False):
            if held != token:
                break
            common += 1
        start = min(common, first, len(tokens) - 1)
        self._truncate(start)
        self.prompt_tokens += len(tokens)
        self.reused_tokens += start
        rows = np.empty((len(tokens) - first, self.n_vocab), dtype=np.float32)
        for at in range(start, len(tokens), self.batch_tokens):
            chunk = tokens[at : at + self.batch_tokens]
            wanted = [at + i >= first for i in range(len(chunk))]
            out = self._decode(chunk, at, wanted)
            if out is not None:
                begin = max(at, first) - first
                rows[begin : begin + len(out)] = out
        return rows

    def step(self, token: int) -> np.ndarray:
        """Append one token at the next position; its logits (a copy)."""
        out = self._decode([token], len(self.cached), [True])
        assert out is not None
        return out[0]

    def forget(self) -> None:
        """Empty the KV cache (the next call evaluates everything)."""
        self.lib.llama_memory_clear(self.memory, True)
        self.cached = []

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()

    def _truncate(self, keep: int) -> None:
        if keep < len(self.cached):
            self.lib.llama_memory_seq_rm(self.memory, 0, keep, -1)
            del self.cached[keep:]

    def _decode(self, chunk: list[int], at: int, wanted: list[bool]) -> np.ndarray | None:
        """One ``llama_decode`` of ``chunk`` at positions ``at``...; the logits of the positions
        ``wanted`` marks, in order (None when none is)."""
        batch = self.batch
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = at + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = wanted[i]
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            self.forget()  # a failed call may leave part of the batch in the cache
            raise RuntimeError(f"llama_decode returned {code} at position {at}")
        self.cached.extend(chunk)
        n_out = sum(wanted)
        if not n_out:
            return None
        logits = self.lib.llama_get_logits(self.ctx)
        return (
            np.ctypeslib.as_array(logits, shape=(n_out * self.n_vocab,))
            .reshape(n_out, self.n_vocab)
            .copy()
        )


def _cpu_features(lib: Any) -> str:
    """The CPU features the build uses ('AVX2 FMA F16C ...'), from llama.cpp's system info."""
    try:
        text = lib.llama_print_system_info().decode("utf-8", "replace")
    except Exception:
        return "features unknown"
    found = re.findall(r"([A-Z0-9_]+) = 1", text)
    return " ".join(found) or "features unknown"


class LlamaCppEngine(Engine):
    """llama.cpp on a GGUF file: greedy generation and log-likelihood, one request at a time."""

    name = "llamacpp"
    loader = "llamacpp"

    @classmethod
    def load(
        cls, spec: RunSpec, *, ctx: Any | None = None, on_step: Step | None = None
    ) -> LoadedModel:
        from slmtui.worker.loading import STEP_WEIGHTS, gguf_file_type, gguf_header, gguf_path

        ref = spec.model
        where = f"model '{ref.name}', engine llamacpp"
        if spec.quantize != "none":
            raise LoadError(
                f"{where}: runs the GGUF file at its own quantisation; quantize must be "
                f"'none', not '{spec.quantize}'"
            )
        if spec.dtype != "auto":
            raise LoadError(
                f"{where}: computes with the GGUF file's own types; dtype must be 'auto', "
                f"not '{spec.dtype}'"
            )
        if spec.gpus > 1 or (ctx is not None and ctx.is_distributed):
            raise LoadError(f"{where}: runs on the CPU or one GPU, not {spec.gpus} GPUs")
        path = gguf_path(ref)
        if not path.is_file():
            raise LoadError(f"{where}: GGUF file {path} does not exist")
        try:
            import llama_cpp
        except ImportError as exc:
            raise LoadError(
                f"{where}: needs llama_cpp (llama-cpp-python), which does not import ({exc}); "
                f"{INSTALL_HINT}"
            ) from None
        gpu = spec.gpus == 1
        if gpu and not llama_cpp.llama_supports_gpu_offload():
            raise LoadError(
                f"{where}: this llama-cpp-python is a CPU build (no GPU backend); use gpus = 0, "
                f"or install a GPU build: {GPU_BUILD_HINT}"
            )
        if on_step is not None:
            on_step(STEP_WEIGHTS)
        architecture = gguf_header(path, ("general.architecture",)).get("general.architecture")
        trained = gguf_header(path, (f"{architecture}.context_length",)).get(
            f"{architecture}.context_length"
        )
        n_ctx = CONTEXT_TOKENS
        if isinstance(trained, int) and trained > 0:
            n_ctx = min(CONTEXT_TOKENS, trained)
        threads = thread_count()
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=BATCH_TOKENS,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=-1 if gpu else 0,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LoadError(f"{where}: llama.cpp failed to load {path}: {first}") from exc
        runtime = LlamaRuntime(llm, llama_cpp)
        file_type = gguf_file_type(path)
        version = getattr(llama_cpp, "__version__", None)
        placed = "every layer on the GPU" if gpu else f"on the CPU, {threads} threads"
        build = "GPU build" if llama_cpp.llama_supports_gpu_offload() else "CPU build"
        notes = [
            f"llama.cpp (llama-cpp-python {version}, {build}: {_cpu_features(llama_cpp)}), "
            f"{placed}; context {runtime.n_ctx} tokens"
        ]
        metrics = {
            "weights": f"gguf {file_type or '(type unknown)'} as stored (llama.cpp)",
            "weight_bytes": int(llama_cpp.llama_model_size(llm.model)),
            "quantize": "none",
            "quantize_scheme": None,
            "device": "cuda:0" if gpu else "cpu",
            "threads": None if gpu else threads,
            "llama_cpp_version": version,
        }
        # torch holds nothing of this model: its memory counters are the CPU's (on a GPU,
        # NVML's per-process figure is MEM).
        return LoadedModel(
            runtime,
            runtime,
            torch.device("cpu"),
            file_type or "gguf",
            str(path),
            notes,
            metrics,
            loader=cls.loader,
        )

    def __init__(self, model: LlamaRuntime, tokenizer: Any, *, batch_size: int | str) -> None:
        super().__init__(model, tokenizer, batch_size=1)
        self.runtime = model
        self._notes: list[str] = []
        if batch_size not in ("auto", 1):
            self._notes.append(
                f"batch_size {batch_size}: the llamacpp engine answers one request at a time"
            )
        self._encoded: dict[tuple[str, bool], list[int]] = {}
        self._windows: dict[tuple[str, ...], int] = {}
        self.truncated = 0
        """Prompts or log-likelihood inputs that kept only their last tokens."""
        model.forget()
        model.prompt_tokens = model.reused_tokens = 0

    def batch_size_used(self, requested: int | str) -> int:
        return 1

    @property
    def notes(self) -> list[str]:
        """Facts for the result: the batch size, truncations, the prompt tokens the cache spared."""
        notes = list(self._notes)
        if self.truncated:
            notes.append(
                f"{self.truncated} inputs longer than llama.cpp's context "
                f"({self.runtime.n_ctx} tokens, less the answer's budget) kept their last tokens"
            )
        rt = self.runtime
        if rt.reused_tokens:
            notes.append(
                f"llama.cpp kept its KV cache between requests: {rt.reused_tokens:,} of "
                f"{rt.prompt_tokens:,} prompt tokens (a prefix shared with the request before) "
                "were not evaluated again"
            )
        return notes

    # -- before the window ----------------------------------------------------------------------

    def prepare(
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Tokenise every prompt, pair and stop string now, outside the window."""
        for request in generate:
            self._encode(request.prompt, True)
            self._window(request)
        for ll in loglikelihood:
            for continuation in ll.continuations:
                for text, special in pair_texts(ll.context, continuation):
                    self._encode(text, special)

    def warmup(
        self,
        generate: Sequence[GenerateRequest],
        loglikelihood: Sequence[LoglikelihoodRequest],
    ) -> None:
        """Run the given requests once (generation capped at a few tokens), then empty the cache
        so that the measured window starts cold."""
        for _ in self.generate(warmup_generations(generate)):
            pass
        for _ in self.loglikelihood(loglikelihood):
            pass
        self.runtime.forget()
        self.runtime.prompt_tokens = self.runtime.reused_tokens = 0
        self.truncated = 0

    # -- generate -------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> Iterator[Completed]:
        rt = self.runtime
        for index, request in enumerate(requests):
            ids = self._encode(request.prompt, True) or [self._empty_context()]
            room = rt.n_ctx - request.max_new_tokens
            room = room if room > 0 else rt.n_ctx - 1
            if len(ids) > room:
                ids = ids[-room:]
                self.truncated += 1
            window = self._window(request)
            started = time.perf_counter()
            logits = rt.logits(ids, len(ids) - 1)[-1]
            out: list[int] = []
            stopped_at: int | None = None
            ttft_s: float | None = None
            while True:
                token = int(np.argmax(logits))
                out.append(token)
                self.live_tokens += 1
                if ttft_s is None:
                    ttft_s = time.perf_counter() - started
                if rt.is_end(token) or len(out) >= request.max_new_tokens:
                    break
                if len(ids) + len(out) >= rt.n_ctx:
                    break  # the context is full (a budget larger than the context)
                if request.stop:
                    tail = rt.detokenize(out[-min(window, len(out)) :], special=True)
                    if first_stop(tail, request.stop) is not None:
                        stopped_at = len(out)
                        break
                logits = rt.step(token)
            elapsed_s = time.perf_counter() - started
            text, tokens_out = finish_generation(
                request,
                out,
                stopped_at,
                is_end=rt.is_end,
                decode=lambda ids: rt.detokenize(ids, special=False),
            )
            steps = len(out)
            yield Completed(
                index=index,
                response=GenerateResponse(text=text, tokens_out=tokens_out),
                tokens_in=len(ids),
                tokens_out=tokens_out,
                ttft_s=ttft_s,
                batch=index,
                itl_s=(elapsed_s - ttft_s) / (steps - 1)
                if ttft_s is not None and steps > 1
                else None,
            )

    # -- loglikelihood --------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> Iterator[Completed]:
        rt = self.runtime
        for index, request in enumerate(requests):
            logprobs: list[float] = []
            greedy: list[bool] = []
            tokens_in = 0
            contexts: set[tuple[int, ...]] = set()
            for continuation in request.continuations:
                context_ids, continuation_ids = self.encode_pair(request.context, continuation)
                if tuple(context_ids) not in contexts:
                    contexts.add(tuple(context_ids))
                    tokens_in += len(context_ids)
                tokens_in += max(len(continuation_ids) - 1, 0)
                whole = context_ids + continuation_ids
                if len(whole) > rt.n_ctx + 1:
                    whole = whole[-(rt.n_ctx + 1) :]
                    self.truncated += 1
                inputs = whole[:-1]
                n_cont = min(len(continuation_ids), len(inputs))
                rows = rt.logits(inputs, len(inputs) - n_cont)
                logprob, is_greedy = continuation_logprob(rows, whole[len(whole) - n_cont :])
                logprobs.append(logprob)
                greedy.append(is_greedy)
            yield Completed(
                index=index,
                response=LoglikelihoodResponse(logprobs=tuple(logprobs), greedy=tuple(greedy)),
                tokens_in=tokens_in,
                tokens_out=0,
            )

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as lm-evaluation-harness splits them."""
        return split_pair(context, continuation, self._encode, self._empty_context())

    def _empty_context(self) -> int:
        """What stands for an empty context or prompt: BOS, else EOS (as plain)."""
        for token in (self.runtime.bos_id, self.runtime.eos_id):
            if token is not None:
                return token
        return 0

    # -- shared ---------------------------------------------------------------------------------

    def _encode(self, text: str, special: bool) -> list[int]:
        key = (text, special)
        ids = self._encoded.get(key)
        if ids is None:
            ids = self.runtime.tokenize(text, special)
            self._encoded[key] = ids
        return list(ids)

    def _window(self, request: GenerateRequest) -> int:
        key = tuple(request.stop)
        window = self._windows.get(key)
        if window is None:
            window = stop_window(request, lambda s: len(self.runtime.tokenize(s, False)))
            self._windows[key] = window
        return window
