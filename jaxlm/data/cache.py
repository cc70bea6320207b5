"""Token cache: tokenize once, reuse while the source and the tokenizer are unchanged.

Layout under the cache root (`data.cache_dir`, `$JAXLM_CACHE_DIR` or ~/.cache/jaxlm):

    tokenizers/<key>.model          a tokenizer trained on a source (key: source + settings)
    tokens/<key>/manifest.json      what the entry holds (key: source + tokenizer + split)
    tokens/<key>/tokens.bin         the EOS-joined token stream, uint16 or uint32

Every source of a mixture (and a separate validation source) has its own entries, so a
new mixture of known sources tokenizes nothing. An entry is written into a temporary
directory and renamed into place, so an interrupted build leaves nothing that is ever
read; stale temporary directories are removed on the next build. Reads are memory-mapped.

Encoding runs on all cores (sentencepiece threads). Long documents are cut into pieces of
about `_PIECE_CHARS` characters right before a space, where a tokenizer that splits words
at whitespace (and adds no dummy prefix) cannot merge across, so the ids are the same as
encoding the whole document (`splits_at_spaces`); other tokenizers encode whole documents.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import uuid

import numpy as np

from jaxlm.config import DataConfig, default_cache_root
from jaxlm.data import sources
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 2
_GROUP_CHARS = 4 << 20  # text per encode call: bounds memory and drives the progress bar
_PIECE_CHARS = 2048  # long documents are encoded in pieces of about this many characters


def cache_root(cfg: DataConfig) -> str:
    return os.path.abspath(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else default_cache_root()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([FORMAT_VERSION, *parts]).encode()).hexdigest()[:24]


class Part:
    """One source: its fingerprint now, its (train, valid) documents only if an entry misses.

    role "both": validation is the TFDS validation split or a held-out fraction;
    "train": every document trains (a separate validation source is set);
    "valid": every document validates (that separate source).
    """

    def __init__(self, cfg: DataConfig, source: str, role: str = "both"):
        self.cfg, self.source, self.role = cfg, source, role
        self.fingerprint = sources.fingerprint(cfg, source, role)
        self._docs = None

    @property
    def docs(self) -> tuple[list[str], list[str]]:
        if self._docs is None:
            self._docs = sources.load_splits(self.cfg, self.source, self.role)
        return self._docs


def parts(cfg: DataConfig) -> tuple[list[Part], list[float], list[Part]]:
    """(training parts, their mixture weights, validation parts)."""
    mixture = sources.parse_mixture(cfg.source)
    role = "train" if cfg.valid_source else "both"
    train = [Part(cfg, src, role) for src, _ in mixture]
    valid = [Part(cfg, cfg.valid_source, "valid")] if cfg.valid_source else train
    return train, [w for _, w in mixture], valid


def train_on(cfg: DataConfig, train_parts: list[Part]) -> Tokenizer:
    """A tokenizer trained with the data.tokenizer_* settings on the training documents of `train_parts`."""
    docs = [d for p in train_parts for d in p.docs[0]]
    return train_tokenizer(docs, cfg.tokenizer_vocab, cfg.tokenizer_type, cfg.tokenizer_max_bytes)


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


def get_tokenizer(cfg: DataConfig, train_parts: list[Part], log=print) -> Tokenizer:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    key = _key("tokenizer", [p.fingerprint for p in train_parts], cfg.tokenizer_vocab, cfg.tokenizer_type,
               cfg.tokenizer_max_bytes)
    path = os.path.join(cache_root(cfg), "tokenizers", key + ".model")
    if os.path.isfile(path):
        log(f"tokenizer: reusing {path}")
        return load_tokenizer(path)
    t0 = time.perf_counter()
    tok = train_on(cfg, train_parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)
    log(f"tokenizer: trained {cfg.tokenizer_type} vocab {tok.vocab_size} in {time.perf_counter() - t0:.1f}s")
    return tok


def splits_at_spaces(tok: Tokenizer) -> bool:
    """Whether cutting text right before a space (after a non-space) never changes its ids.

    True for BPE models that split words at whitespace, keep the text as it is and add no
    dummy prefix (the tokenizers jaxlm trains): no piece holds a space after its first
    character, so no merge crosses such a cut. Unigram models are left out: their
    best segmentation of a word can change with the length of the text around it (seen
    on tinyshakespeare).
    """
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(tok.proto)
    n, t = m.normalizer_spec, m.trainer_spec
    return (t.model_type == sentencepiece_model_pb2.TrainerSpec.BPE and n.name == "identity" and not n.add_dummy_prefix and not n.remove_extra_whitespaces
            and n.escape_whitespaces and t.split_by_whitespace and not t.treat_whitespace_as_suffix
            and not m.denormalizer_spec.precompiled_charsmap)


def _cut(doc: str, size: int) -> list[str]:
    """`doc` in consecutive pieces of about `size` characters, each cut right before a space."""
    out, start = [], 0
    while len(doc) - start > size:
        cut = doc.find(" ", start + size)
        while cut > 0 and doc[cut - 1] == " ":
            cut = doc.find(" ", cut + 1)
        if cut < 0:
            break
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


def encode_documents(tok: Tokenizer, docs: list[str], piece_chars: int | None = _PIECE_CHARS):
    """Yield (EOS-joined ids of a group of documents, their UTF-8 bytes, their characters).

    Each document is preceded by EOS. `piece_chars=None` encodes whole documents.
    """
    if piece_chars and not splits_at_spaces(tok):
        piece_chars = None
    dtype = token_dtype(tok)
    eos = tok.eos_id
    group: list[str] = []
    size = 0
    for d in itertools.chain(docs, [None]):
        if d is not None:
            group.append(d)
            size += len(d)
        if not group or (d is not None and size < _GROUP_CHARS):
            continue
        pieces = [_cut(g, piece_chars) if piece_chars else [g] for g in group]
        ids = tok.sp.encode([p for ps in pieces for p in ps], num_threads=os.cpu_count() or 1)
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum()))
        per_doc = np.add.reduceat(lengths, np.cumsum([0] + [len(ps) for ps in pieces[:-1]]))
        starts = np.concatenate([[0], np.cumsum(per_doc)[:-1]])
        out = np.insert(flat, starts, eos).astype(dtype, copy=False)
        yield out, sum(len(g.encode("utf-8")) for g in group), size
        group, size = [], 0


def tokens(cfg: DataConfig, tok: Tokenizer, part: Part, split: str, log=print) -> tuple[np.ndarray, dict]:
    """(memory-mapped token stream, manifest) of one split of one source, built if missing."""
    key = _key("tokens", part.fingerprint, tok.sha256, split)
    root = os.path.join(cache_root(cfg), "tokens")
    entry = os.path.join(root, key)
    manifest_path = os.path.join(entry, "manifest.json")
    label = f"{split} of {part.source}"
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        arr = np.memmap(os.path.join(entry, "tokens.bin"), dtype=manifest["dtype"], mode="r")
        if len(arr) == manifest["tokens"]:
            log(f"token cache: reusing {label} ({manifest['tokens']:,} tokens) from {entry}")
            return arr, manifest
        log(f"token cache: {entry} does not match its manifest; rebuilding")
    t0 = time.perf_counter()
    docs = part.docs[0 if split == "train" else 1]
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of interrupted builds
        if name.startswith(key + ".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = f"{entry}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    from tqdm import tqdm

    total_chars = sum(len(d) for d in docs)
    n_tokens = n_bytes = 0
    with open(os.path.join(tmp, "tokens.bin"), "wb") as f, \
            tqdm(total=total_chars, unit="char", unit_scale=True, desc=f"tokenizing {label}", leave=False,
                 disable=total_chars < _GROUP_CHARS or not sys.stderr.isatty()) as bar:
        for ids, nb, nc in encode_documents(tok, docs):
            f.write(ids.tobytes())
            n_tokens += len(ids)
            n_bytes += nb
            bar.update(nc)
    manifest = {"format": FORMAT_VERSION, "split": split, "source": part.source, "role": part.role,
                "source_fingerprint": part.fingerprint, "tokenizer_sha256": tok.sha256,
                "vocab_size": tok.vocab_size, "dtype": token_dtype(tok).name, "documents": len(docs),
                "tokens": n_tokens, "bytes": n_bytes}
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    if os.path.isdir(entry):  # an entry that failed its check above
        shutil.rmtree(entry)
    os.rename(tmp, entry)
    dt = time.perf_counter() - t0
    log(f"token cache: built {label} in {dt:.1f}s ({n_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s of text), "
        f"{n_tokens:,} tokens -> {entry}")
    return np.memmap(os.path.join(entry, "tokens.bin"), dtype=manifest["dtype"], mode="r"), manifest
