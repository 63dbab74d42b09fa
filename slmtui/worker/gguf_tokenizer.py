"""A GGUF file's SentencePiece-BPE tokenizer (Gemma's) rebuilt as the BPE it is.

transformers (5.17 to 5.24) reads a GGUF tokenizer of model "llama" with scores but no merges
as a Unigram model over those scores. Gemma 3's scores are merge ranks, not log-probabilities,
so the Unigram picks the wrong pieces ("Question" became "▁Q", "ue", "st", "ion"), its saved form
reloads as single characters, and no BOS is added: Gemma-3-270M then answers with noise. llama.cpp
reads the same file right. This module rebuilds the tokenizer as a byte-fallback BPE whose merges
come from the vocabulary and its scores (SentencePiece's BPE: a higher score merges first), with
spaces as "▁" and BOS in front, the layout of Gemma's own ``tokenizer.json``. The test checks the
ids against llama.cpp's on real text.
"""

from __future__ import annotations

import json
from typing import Any

TOKENIZER_VERSION = 2
"""Written into a converted checkpoint's marker: checkpoints made before it get the fix."""


def needs_rebuild(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is the Unigram-over-merge-ranks reading of a GGUF BPE vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "Unigram":
        return False
    return bool(model.get("byte_fallback")) and any(
        piece.startswith("<0x") for piece, _ in model["vocab"][:1024]
    )


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece-BPE vocabulary: every split of a piece into two pieces,
    the higher-scored merged piece first (ties: shorter left part, then ids)."""
    merges: list[tuple[float, int, int, int, str, str]] = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, len(left), vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


CONTROL, USER_DEFINED, BYTE = 3, 4, 6
"""GGUF ``tokenizer.ggml.token_type`` values (llama.cpp's): the rest are normal pieces."""


def gguf_token_types(path: Any) -> list[int]:
    """``tokenizer.ggml.token_type`` of a GGUF file (the ``gguf`` package reads it)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.ggml.token_type"]
    return [int(field.parts[i][0]) for i in field.data]


def rebuild(tokenizer: Any, token_types: list[int]) -> Any:
    """``tokenizer`` as a byte-fallback BPE with Gemma's normaliser, decoder and BOS template:
    control pieces special added tokens, user-defined pieces (runs of spaces or newlines) added
    tokens matched before BPE, as SentencePiece and llama.cpp do (a user-defined piece that is
    also a normal piece, Gemma's tab, is left to BPE as llama.cpp leaves it); ids and chat
    template kept."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pieces = spec["model"]["vocab"]
    if len(token_types) != len(pieces):
        raise ValueError(f"{len(token_types)} token types for {len(pieces)} pieces")
    # a piece listed twice takes its last id, as llama.cpp's token map does (Gemma's tab)
    vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
    plain_scores = {
        piece: float(score)
        for (piece, score), kind in zip(pieces, token_types, strict=True)
        if kind not in (CONTROL, USER_DEFINED, BYTE)
    }
    spec["added_tokens"] = [
        {
            "id": index,
            "content": piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": kind == USER_DEFINED,
            "special": kind == CONTROL,
        }
        for index, ((piece, _), kind) in enumerate(zip(pieces, token_types, strict=True))
        if kind == CONTROL or (kind == USER_DEFINED and piece not in plain_scores)
    ]
    unk = tokenizer.unk_token or "<unk>"
    spec["model"] = {
        "type": "BPE",
        "dropout": None,
        "unk_token": unk,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [list(pair) for pair in spm_merges(vocab, plain_scores)],
    }
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    bos = tokenizer.bos_token
    if bos is not None:
        bos_id = vocab[bos]
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        add_bos_token=bos is not None,
    )
    template = getattr(tokenizer, "chat_template", None)
    if template:
        fast.chat_template = template
    return fast
