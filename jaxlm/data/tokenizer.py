"""Sentencepiece tokenizer: train one on a sample of the training text, or load a .model file.

Trained tokenizers are lossless (identity normalisation, whitespace kept, byte fallback)
and use fixed ids for the special tokens: pad 0, unk 1, bos 2, eos 3.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import sentencepiece as spm

from jaxlm.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_MAX_PIECE_INPUT = 1 << 15  # longest training "sentence" (a paragraph), in bytes


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).ravel()])

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.proto)
        os.replace(tmp, path)


def load_tokenizer(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file '{path}' does not exist")
    with open(path, "rb") as f:
        proto = f.read()
    try:
        return Tokenizer(proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError for bad protos
        raise DataError(f"'{path}' is not a sentencepiece model: {e}") from None


def _paragraphs(docs: list[str], max_bytes: int):
    """Paragraphs (with their trailing newlines, so the tokenizer learns them) up to max_bytes.

    Documents are visited in an evenly strided order so a cap samples the whole corpus.
    """
    total = 0
    stride = max(1, sum(len(d) for d in docs) // max(max_bytes, 1))
    for i, doc in enumerate(docs):
        if stride > 1 and i % stride:
            continue
        for para in doc.split("\n\n"):
            piece = (para + "\n\n")[:_MAX_PIECE_INPUT]
            total += len(piece)
            if total > max_bytes:
                return
            yield piece


def train_tokenizer(docs: list[str], vocab_size: int, model_type: str = "bpe",
                    max_bytes: int = 20_000_000) -> Tokenizer:
    """Train on a sample of `docs` (at most `max_bytes`) and return the tokenizer."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_paragraphs(docs, max_bytes), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=_MAX_PIECE_INPUT,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=True,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed ({e}); adjust data.tokenizer_vocab (byte fallback needs "
                        f"at least 260 plus the distinct characters; a small corpus supports only a small vocabulary)") from None
    return Tokenizer(model.getvalue())
