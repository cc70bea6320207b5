"""Tokenizers: train one on a sample of the training text, or load a file.

`load_tokenizer` reads a sentencepiece `.model` (`Tokenizer`) or a Hugging Face
`tokenizer.json`, or a folder holding one (`jaxlm.data.tokenizer_json.JsonTokenizer`); both
offer vocab_size, eos_id, sha256, encode, decode and save. Trained sentencepiece tokenizers
(`data.tokenizer_type` bpe or unigram) are lossless (identity normalisation, whitespace kept,
byte fallback) and use fixed ids for the special tokens: pad 0, unk 1, bos 2, eos 3;
`bytelevel` trains a GPT-2-style byte-level BPE `tokenizer.json` instead.

Files are written under a unique temporary name (`temporary_name`: host, pid and a random
tag, so processes on several hosts sharing a file system never write the same temporary)
and renamed into place, so a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import uuid
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

from jaxlm.data.sources import by_document, split_chunks
from jaxlm.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_MAX_PIECE_INPUT = 1 << 15  # longest training "sentence" (a paragraph), in bytes
TEMPORARY = ".tmp-"  # marks temporary names: <final name>.tmp-<host>-<pid>-<random>


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: `taskset`, SLURM's binding), the encoder's threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_name() -> str:
    """This host's name as temporary names carry it (characters other than letters, digits, '.' and '-' become '_')."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def temporary_name(path: str) -> str:
    """A unique name next to `path` to write it under: `<path>.tmp-<host>-<pid>-<random>`."""
    return f"{path}{TEMPORARY}{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) that made the temporary `name` (a base name from `temporary_name`); None for other names."""
    _, sep, tag = name.partition(TEMPORARY)
    parts = tag.rsplit("-", 2)
    if not sep or len(parts) != 3 or not parts[0] or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def write_temporary(data: bytes, path: str) -> str:
    """Write `data` to a new unique temporary name next to `path`; returns that name."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def save_bytes(data: bytes, path: str) -> None:
    """Write `data` to `path` through a unique temporary file, then os.replace."""
    tmp = write_temporary(data, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


class Tokenizer:
    """A sentencepiece model."""

    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def data(self) -> bytes:
        return self.proto

    @property
    def splits_at_spaces(self) -> bool:
        """Whether cutting text right before a space (after a non-space) never changes its ids.

        True for BPE models that split words at whitespace, keep the text as it is and add no
        dummy prefix (the tokenizers jaxlm trains): no piece holds a space after its first
        character, so no merge crosses such a cut. Unigram models are left out: their
        best segmentation of a word can change with the length of the text around it (seen
        on tinyshakespeare).
        """
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(self.proto)
        n, t = m.normalizer_spec, m.trainer_spec
        return (t.model_type == pb.TrainerSpec.BPE and n.name == "identity" and not n.add_dummy_prefix
                and not n.remove_extra_whitespaces and n.escape_whitespaces and t.split_by_whitespace
                and not t.treat_whitespace_as_suffix and not m.denormalizer_spec.precompiled_charsmap)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def eos_token(self) -> str:
        return self.sp.id_to_piece(self.eos_id)

    # The token in front of every document and prompt: EOS for the models jaxlm pretrains, an imported
    # model's own start token with data.bos_token (`set_start`).
    start = None

    @property
    def start_id(self) -> int:
        return self.eos_id if self.start is None else self.sp.piece_to_id(self.start)

    @property
    def start_token(self) -> str:
        return self.eos_token if self.start is None else self.start

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=usable_cores())

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).ravel()])

    def save(self, path: str) -> None:
        """Write the model to `path` (through a unique temporary file, then os.replace)."""
        save_bytes(self.proto, path)

    def write_temporary(self, path: str) -> str:
        return write_temporary(self.proto, path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def tokenizer_from_bytes(data: bytes, eos_token: str = "", where: str = "tokenizer", bos_token: str = ""):
    """A `tokenizer.json` (its bytes start with '{') or a sentencepiece model, from its bytes; `bos_token`:
    the start token when it is not EOS (data.bos_token)."""
    if data.lstrip()[:1] == b"{":
        from jaxlm.data.tokenizer_json import JsonTokenizer

        tok = JsonTokenizer(data, eos_token, where)
    else:
        try:
            tok = Tokenizer(data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError for bad protos
            raise DataError(f"'{where}' is not a sentencepiece model: {e}") from None
    return set_start(tok, bos_token, where)


def set_start(tok, bos_token: str, where: str = "tokenizer"):
    """`tok` with `bos_token` as the token in front of every document and prompt ('' = EOS)."""
    if not bos_token or bos_token == tok.eos_token:
        return tok
    known = tok.sp.piece_to_id(bos_token) if tok.kind == "sentencepiece" else tok.fast.token_to_id(bos_token)
    if known is None or (tok.kind == "sentencepiece" and tok.sp.id_to_piece(known) != bos_token):
        raise DataError(f"data.bos_token={bos_token!r} is not a token of '{where}'")
    tok.start = bos_token
    return tok


def tokenizer_file(path: str) -> str:
    """`path`, or the tokenizer.json (else tokenizer.model) inside the folder `path`."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise DataError(f"tokenizer folder '{path}' holds no tokenizer.json or tokenizer.model")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file '{path}' does not exist")
    return path


RUN_FILES = ("tokenizer.json", "tokenizer.model")  # a run directory's copy of its tokenizer, by kind


def run_tokenizer_file(run_dir: str) -> str | None:
    """The tokenizer file a run directory holds (tokenizer.json or tokenizer.model), or None."""
    return next((os.path.join(run_dir, n) for n in RUN_FILES if os.path.isfile(os.path.join(run_dir, n))), None)


def load_tokenizer(path: str, eos_token: str = "", bos_token: str = ""):
    """The tokenizer in a file (sentencepiece .model or tokenizer.json) or a folder holding one."""
    path = tokenizer_file(path)
    with open(path, "rb") as f:
        return tokenizer_from_bytes(f.read(), eos_token, path, bos_token)


def _head(pieces: Iterable[str], n: int) -> str:
    """The first `n` characters of text given in pieces."""
    head = ""
    for piece in pieces:
        head += piece[:n - len(head)]
        if len(head) >= n:
            break
    return head


def _paragraphs(stream: Iterable[tuple[bool, str]], total_chars: int, max_bytes: int):
    """Paragraphs (with their trailing newlines, so the tokenizer learns them) up to max_bytes.

    Documents are visited in an evenly strided order (the stride from `total_chars`, the
    length of the whole stream) so a cap samples the whole corpus. The same paragraphs
    as `doc.split("\n\n")` of each whole document, each cut to `_MAX_PIECE_INPUT`.
    """
    total = 0
    stride = max(1, total_chars // max(max_bytes, 1))
    for i, doc in enumerate(by_document(stream)):
        if stride > 1 and i % stride:
            continue
        for para in by_document(split_chunks(doc, "\n\n")):
            piece = (_head(para, _MAX_PIECE_INPUT) + "\n\n")[:_MAX_PIECE_INPUT]
            total += len(piece)
            if total > max_bytes:
                return
            yield piece


def train_tokenizer(docs, vocab_size: int, model_type: str = "bpe", max_bytes: int = 20_000_000,
                    total_chars: int | None = None):
    """Train on a sample of `docs` (at most `max_bytes`) and return the tokenizer.

    `docs`: a list of documents; or, with `total_chars` (their length in characters, which
    sets the sampling stride), a document stream of (starts a document, text) pairs as
    `jaxlm.data.sources` reads them, which is read only as far as the sample goes.
    """
    if total_chars is None:
        docs = list(docs)
        total_chars = sum(map(len, docs))
        docs = ((True, d) for d in docs)
    if model_type == "bytelevel":
        from jaxlm.data.tokenizer_json import train_bytelevel

        return train_bytelevel(_paragraphs(docs, total_chars, max_bytes), vocab_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_paragraphs(docs, total_chars, max_bytes), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=_MAX_PIECE_INPUT,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=True,
            num_threads=usable_cores(), minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed ({e}); adjust data.tokenizer_vocab (byte fallback needs "
                        f"at least 260 plus the distinct characters; a small corpus supports only a small vocabulary)") from None
    return Tokenizer(model.getvalue())
