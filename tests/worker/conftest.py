"""A tiny random Llama and a tiny tokenizer, built offline, for worker and engine tests.

The tokenizer is byte-level BPE with no merges over printable ASCII and newline: every character
is one token and decoding gives the text back exactly, so stop strings and token counts can be
checked by hand. It adds BOS like Llama's and has no pad token (the loader must fall back to EOS).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from slmtui.protocol import Event, parse_event

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ("<s>", "</s>", "<unk>")


def build_tokenizer(path: Path) -> None:
    """Save a PreTrainedTokenizerFast (one token per printable character) to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 mapped characters
    mapping = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    assert set(mapping.values()) == set(byte_to_char)
    chars = [mapping[b] for b in [10, *range(32, 127)]]
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def build_model(path: Path, vocab_size: int, seed: int = 0) -> None:
    """Save a random 2-layer Llama (hidden 32) in float32 to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider logits than the default init: fewer near-ties
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny model and tokenizer (a 'local' model source)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tokenizer(path)
    build_model(path, vocab_size=len(SPECIALS) + 96)
    return path


SPECIAL_PENALTY = 1e4
"""Subtracted from the special tokens' logits in ``tiny_model``: its text is all characters."""


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) loaded the worker's way (float32, CPU, left padding, pad = EOS).

    A forward hook keeps the model from ever choosing a special token (BOS, EOS, UNK), so every
    generated token is one visible character; a test wanting EOS adds more than
    ``SPECIAL_PENALTY`` to its logit.
    """
    import torch

    from slmtui.spec import ModelRef
    from slmtui.worker.loading import load_model

    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a busy CI box
    loaded = load_model(ModelRef("tiny", str(tiny_model_dir), "local"), dtype="float32")
    penalty = torch.zeros(loaded.model.config.vocab_size)
    penalty[: len(SPECIALS)] = -SPECIAL_PENALTY
    loaded.model.lm_head.register_forward_hook(lambda module, args, out: out + penalty)
    return loaded.model, loaded.tokenizer


# -- running the real worker ------------------------------------------------------------------


@dataclass
class WorkerRun:
    returncode: int
    events: list[Event]
    stderr: str

    def of_type(self, type_: str) -> list[Event]:
        return [e for e in self.events if e.type == type_]


class Worker:
    """Runs ``python -m slmtui.worker`` offline, with its cache in a temporary folder."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.env = dict(os.environ)
        self.env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            SLMTUI_CACHE_DIR=str(tmp_path / "cache"),
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",  # a tiny model: threads only contend on a busy CI box
        )
        self.env.pop("CUDA_VISIBLE_DEVICES", None)

    def argv(self, spec_json: str, prefix: list[str] | None = None) -> list[str]:
        prefix = prefix or [sys.executable, "-m", "slmtui.worker"]
        return [*prefix, "--spec-json", spec_json, "--run-id", "r1"]

    def run(
        self, spec_json: str, *, prefix: list[str] | None = None, timeout_s: float = 120
    ) -> WorkerRun:
        """Run to the end; every stdout line must parse as an event (ProtocolError otherwise)."""
        proc = subprocess.run(
            self.argv(spec_json, prefix),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            timeout=timeout_s,
        )
        events = [parse_event(line) for line in proc.stdout.splitlines()]
        return WorkerRun(proc.returncode, events, proc.stderr)

    def start(self, spec_json: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(spec_json),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
            cwd=REPO,
        )


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    return Worker(tmp_path)
