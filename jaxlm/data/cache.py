"""Token cache: tokenize once, reuse while the source and the tokenizer are unchanged.

Layout under the cache root (`data.cache_dir`, `$JAXLM_CACHE_DIR` or ~/.cache/jaxlm):

    tokenizers/<key>.model          a tokenizer trained on a source (key: source + settings)
    tokens/<key>/manifest.json      what the entry holds (key: source + tokenizer + split)
    tokens/<key>/tokens.bin         the EOS-joined token stream, uint16 or uint32

An entry is built in a temporary directory and renamed into place, so an interrupted
build leaves nothing that is ever read; stale temporary directories are removed on the
next build. Reads are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid

import numpy as np

from jaxlm.config import DataConfig
from jaxlm.data import sources
from jaxlm.data.loader import token_stream
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
_ENCODE_CHUNK_BYTES = 4 << 20  # text per encode call: bounds memory and drives the progress bar


def cache_root(cfg: DataConfig) -> str:
    return os.path.abspath(os.path.expanduser(
        cfg.cache_dir or os.environ.get("JAXLM_CACHE_DIR") or os.path.join("~", ".cache", "jaxlm")))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([FORMAT_VERSION, *parts]).encode()).hexdigest()[:24]


class Splits:
    """Reads the source documents at most once, and only if some cache entry misses."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._docs = None

    @property
    def docs(self) -> tuple[list[str], list[str]]:
        if self._docs is None:
            self._docs = sources.load_splits(self.cfg)
        return self._docs


def get_tokenizer(cfg: DataConfig, fingerprint: str, splits: Splits, log=print) -> Tokenizer:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    key = _key("tokenizer", fingerprint, cfg.tokenizer_vocab, cfg.tokenizer_type, cfg.tokenizer_max_bytes)
    path = os.path.join(cache_root(cfg), "tokenizers", key + ".model")
    if os.path.isfile(path):
        log(f"tokenizer: reusing {path}")
        return load_tokenizer(path)
    t0 = time.perf_counter()
    tok = train_tokenizer(splits.docs[0], cfg.tokenizer_vocab, cfg.tokenizer_type, cfg.tokenizer_max_bytes)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)
    log(f"tokenizer: trained {cfg.tokenizer_type} vocab {tok.vocab_size} in {time.perf_counter() - t0:.1f}s")
    return tok


def _encode(tok: Tokenizer, docs: list[str], label: str, log) -> tuple[np.ndarray, int]:
    from tqdm import tqdm

    total = sum(len(d) for d in docs)
    ids: list[list[int]] = []
    n_bytes = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {label}", leave=False,
              disable=total < _ENCODE_CHUNK_BYTES) as bar:
        chunk: list[str] = []
        size = 0
        for d in docs + [None]:
            if d is not None:
                chunk.append(d)
                size += len(d)
            if chunk and (d is None or size >= _ENCODE_CHUNK_BYTES):
                ids.extend(tok.encode(chunk))  # sentencepiece spreads a list over all cores
                n_bytes += sum(len(c.encode("utf-8")) for c in chunk)
                bar.update(size)
                chunk, size = [], 0
    return token_stream(ids, tok.eos_id), n_bytes


def tokens(cfg: DataConfig, tok: Tokenizer, fingerprint: str, split: str, splits: Splits,
           log=print) -> tuple[np.ndarray, dict]:
    """(memory-mapped token stream, manifest) of one split, built if missing."""
    key = _key("tokens", fingerprint, tok.sha256, split)
    root = os.path.join(cache_root(cfg), "tokens")
    entry = os.path.join(root, key)
    manifest_path = os.path.join(entry, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        arr = np.memmap(os.path.join(entry, "tokens.bin"), dtype=manifest["dtype"], mode="r")
        if len(arr) == manifest["tokens"]:
            log(f"token cache: reusing {split} ({manifest['tokens']:,} tokens) from {entry}")
            return arr, manifest
        log(f"token cache: {entry} does not match its manifest; rebuilding")
    t0 = time.perf_counter()
    docs = splits.docs[0 if split == "train" else 1]
    stream, n_bytes = _encode(tok, docs, split, log)
    manifest = {"format": FORMAT_VERSION, "split": split, "source": cfg.source, "valid_source": cfg.valid_source,
                "source_fingerprint": fingerprint, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                "dtype": stream.dtype.name, "documents": len(docs), "tokens": int(len(stream)), "bytes": n_bytes}
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of interrupted builds
        if name.startswith(key + ".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = f"{entry}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    stream.tofile(os.path.join(tmp, "tokens.bin"))
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    if os.path.isdir(entry):  # an entry that failed its check above
        shutil.rmtree(entry)
    os.rename(tmp, entry)
    dt = time.perf_counter() - t0
    log(f"token cache: built {split} in {dt:.1f}s ({n_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s of text), "
        f"{len(stream):,} tokens -> {entry}")
    return np.memmap(os.path.join(entry, "tokens.bin"), dtype=manifest["dtype"], mode="r"), manifest
