"""A GGUF SentencePiece-BPE vocabulary (Gemma's) rebuilt as BPE: on a hand-made vocabulary here,
and against llama.cpp's own ids on the real Gemma-3-270M file when both are installed."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from slmtui.catalog import get_offline_model, is_installed
from slmtui.worker import loading
from slmtui.worker.gguf_tokenizer import (
    BYTE,
    CONTROL,
    USER_DEFINED,
    needs_rebuild,
    rebuild,
    spm_merges,
)

NORMAL = 1


def unigram_reading(pieces: list[tuple[str, float]]) -> Any:
    """What transformers makes of a GGUF "llama" vocabulary with scores: a Unigram."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": p,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, (p, _) in enumerate(pieces[:3])
        ],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "Unigram",
            "unk_id": 2,
            "vocab": [list(p) for p in pieces],
            "byte_fallback": True,
        },
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


# ids: 0 <bos>, 1 <eos>, 2 <unk>, 3 <0x41> ("A" as a byte), 4 "▁▁" (user-defined), then pieces
# whose score is minus their merge rank, as Gemma's file stores them
PIECES = [
    ("<bos>", -1000.0),
    ("<eos>", -1000.0),
    ("<unk>", -1000.0),
    ("<0x41>", 0.0),
    ("▁▁", -1000.0),
    ("▁", -900.0),
    ("a", -901.0),
    ("b", -902.0),
    ("c", -903.0),
    ("ab", -5.0),
    ("bc", -1.0),
    ("▁a", -3.0),
    ("▁abc", -10.0),
    ("abc", -2.0),
]
TYPES = [CONTROL, CONTROL, CONTROL, BYTE, USER_DEFINED] + [NORMAL] * 9


def test_merges_follow_the_merged_pieces_scores():
    vocab = {p: i for i, (p, _) in enumerate(PIECES)}
    scores = {p: s for (p, s), t in zip(PIECES, TYPES, strict=True) if t == NORMAL}
    merges = spm_merges(vocab, scores)
    assert merges.index(("b", "c")) < merges.index(("a", "bc")) < merges.index(("▁", "a"))
    assert merges.index(("▁", "a")) < merges.index(("a", "b")) < merges.index(("▁a", "bc"))


def test_the_unigram_reading_is_rebuilt_as_spm_bpe():
    reading = unigram_reading(PIECES)
    assert needs_rebuild(reading)
    # the Unigram takes the highest-scored cover: "▁a" + "bc" (-4) over "▁abc" (-10)
    assert reading.tokenize(" abc") == ["▁a", "bc"]
    bpe = rebuild(reading, TYPES)
    assert not needs_rebuild(bpe)
    # SentencePiece BPE: b+c (rank 1) first, then a+bc (2), then ▁+abc: one piece
    assert bpe(" abc")["input_ids"] == [0, 12]
    assert bpe("  abc")["input_ids"] == [0, 4, 13]  # "▁▁" is matched whole, before BPE
    assert bpe("A")["input_ids"] == [0, 3]  # byte fallback
    assert bpe.decode(bpe(" abc  abc")["input_ids"], skip_special_tokens=True) == " abc  abc"


def test_a_checkpoint_converted_before_the_fix_gets_its_tokenizer_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / loading.CHECKPOINT_MARKER).write_text(json.dumps({"dtype": "float32"}))
    unigram_reading(PIECES).save_pretrained(target)  # what a checkpoint converted before holds
    rebuilt = rebuild(unigram_reading(PIECES), TYPES)
    calls: list[Path] = []
    monkeypatch.setattr(loading, "_gguf_tokenizer", lambda path: (calls.append(path), rebuilt)[1])
    monkeypatch.setattr(loading, "checkpoint_dir", lambda path: target)
    notes: list[str] = []
    assert loading.gguf_checkpoint(gguf, notes) == target
    assert calls == [gguf] and "tokenizer rebuilt" in notes[0]
    assert json.loads((target / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    marker = json.loads((target / loading.CHECKPOINT_MARKER).read_text())
    assert marker["tokenizer"] == loading.TOKENIZER_VERSION and marker["dtype"] == "float32"
    loading.gguf_checkpoint(gguf, notes)
    assert calls == [gguf]  # up to date: not again
    other = tmp_path / "bpe-ckpt"  # a checkpoint whose tokenizer was right (SmolLM2's BPE)
    other.mkdir()
    (other / loading.CHECKPOINT_MARKER).write_text(json.dumps({"dtype": "float32"}))
    rebuilt.save_pretrained(other)
    monkeypatch.setattr(loading, "checkpoint_dir", lambda path: other)
    loading.gguf_checkpoint(gguf, notes)
    assert calls == [gguf]  # stamped, the GGUF never opened
    stamped = json.loads((other / loading.CHECKPOINT_MARKER).read_text())
    assert stamped["tokenizer"] == loading.TOKENIZER_VERSION


GEMMA = get_offline_model("gemma-3-270m")
SHARED_DATA = Path(os.environ.get("SLMTUI_TEST_DATA", "/work/shared/data"))


@pytest.mark.slow
@pytest.mark.skipif(not is_installed(GEMMA), reason="Gemma-3-270M's packages are not installed")
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
def test_gemma_ids_are_llama_cpps_on_real_text():
    """Gemma-3-270M's GGUF: the rebuilt tokenizer gives llama.cpp's ids (BOS included) on text
    with spaces, runs of spaces, newlines, tabs, digits and non-Latin scripts, and on the dev
    items of the five tasks when they are present."""
    import llama_cpp

    from slmtui.catalog import offline_model_path

    path = offline_model_path(GEMMA.name, install=False)
    tokenizer = loading._gguf_tokenizer(path)
    reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    texts = [
        "Question: what is 2+2?\nAnswer:",
        "  two  spaces\nnew line\ttab\n\n",
        "Ünïcödé 日本語 🙂 — “quotes”",
        "x = [1, 2, 3]; print(x[-1])",
    ]
    for task in ("gsm8k", "hellaswag", "squad_v2", "imdb", "arc_easy"):
        data = SHARED_DATA / task / "dev.jsonl"
        if data.is_file():
            for line in data.read_text().splitlines()[:20]:
                item = json.loads(line)
                texts.append(" ".join(v for v in item.values() if isinstance(v, str))[:1500])
    for text in texts:
        expected = reference.tokenize(text.encode(), add_bos=True, special=False)
        assert tokenizer(text)["input_ids"] == expected, text[:80]
