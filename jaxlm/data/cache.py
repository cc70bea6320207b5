"""Token cache: tokenize once, reuse while the source and the tokenizer are unchanged.

Layout under the cache root (`data.cache_dir`, `$JAXLM_CACHE_DIR` or ~/.cache/jaxlm):

    tokenizers/<key>.model          a tokenizer trained on a source (key: source + settings)
    tokens/<key>/manifest.json      what the entry holds (key: source + tokenizer + split)
    tokens/<key>/tokens.bin         the EOS-joined token stream, uint16 or uint32

Every source of a mixture (and a separate validation source) has its own entries, so a
new mixture of known sources tokenizes nothing. Reads are memory-mapped.

A build streams its source (`sources.Splits`): a first pass counts documents and
characters (which documents are held out, the sampling stride of tokenizer training),
then text is read, encoded and written group by group, so its memory does not grow with
the corpus. Encoding runs on all cores (sentencepiece threads). Long documents, and a
single document of any size, are cut into pieces of about `_PIECE_CHARS` characters right
before a space, where a tokenizer that splits words at whitespace (and adds no dummy
prefix) cannot merge across, so the ids are the same as encoding the whole document
(`Tokenizer.splits_at_spaces`). Other tokenizers (tokenizer.json files among them) encode whole documents: each document is then held
in memory whole (with its ids), so memory grows with the longest document.

Several processes, on several hosts sharing the file system, may build the same entry at
once. Each writes into its own temporary directory, `<key>.tmp-<host>-<pid>-<random>`,
and renames it into place, so an interrupted build leaves nothing that is ever read. A
build removes only stale temporaries of its key: of a process of this host that is gone,
or untouched for `STALE_AFTER_S`. When another builder renamed its entry into place first,
a build discards its own and uses that one. An entry that fails its manifest check is
moved aside (to a temporary name) before the new one is renamed in, then deleted, so a
reader never sees a partly replaced entry. A trained tokenizer is published the same way:
the first process to link its file into place wins and the others load that file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np

from jaxlm.config import DataConfig, default_cache_root
from jaxlm.data import sources, token_files
from jaxlm.data.tokenizer import (TEMPORARY, Tokenizer, host_name, load_tokenizer, temporary_name, temporary_owner,
                                  train_tokenizer)
from jaxlm.errors import DataError

FORMAT_VERSION = 2
_GROUP_CHARS = 1 << 20  # text per encode call: bounds memory (its ids as Python lists) and drives the progress bar
_PIECE_CHARS = 2048  # long documents are encoded in pieces of about this many characters
STALE_AFTER_S = 24 * 3600  # a temporary untouched this long is left over, whoever made it


def cache_root(cfg: DataConfig) -> str:
    return os.path.abspath(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else default_cache_root()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([FORMAT_VERSION, *parts]).encode()).hexdigest()[:24]


class Part:
    """One source: its fingerprint now; its (train, valid) documents, streamed, only if an entry misses.

    role "both": validation is the TFDS validation split or a held-out fraction;
    "train": every document trains (a separate validation source is set);
    "valid": every document validates (that separate source).
    `splits` streams the documents (`sources.Splits`); `docs` holds them whole in memory.
    """

    def __init__(self, cfg: DataConfig, source: str, role: str = "both"):
        self.cfg, self.source, self.role = cfg, source, role
        self.fingerprint = sources.fingerprint(cfg, source, role)
        self.kind = sources.parse_source(source).kind
        self.splits = sources.Splits(cfg, source, role)
        self.token_scan = None  # tokens: sources: (tokenizer sha256, the files' arrays, document starts)
        self._docs = None

    @property
    def docs(self) -> tuple[list[str], list[str]]:
        """(train, valid) documents as whole strings, all in memory: for small uses (the validation
        text of `jaxlm tokenizer train`); the cache streams `splits` instead."""
        if self._docs is None:
            self.splits.check()
            self._docs = self.splits.documents("train"), self.splits.documents("valid")
        return self._docs


def parts(cfg: DataConfig) -> tuple[list[Part], list[float], list[Part]]:
    """(training parts, their mixture weights, validation parts)."""
    mixture = sources.parse_mixture(cfg.source)
    role = "train" if cfg.valid_source else "both"
    train = [Part(cfg, src, role) for src, _ in mixture]
    valid = [Part(cfg, cfg.valid_source, "valid")] if cfg.valid_source else train
    return train, [w for _, w in mixture], valid


def train_on(cfg: DataConfig, train_parts: list[Part]) -> Tokenizer:
    """A tokenizer trained with the data.tokenizer_* settings on the training documents of `train_parts`.

    The documents are streamed (their total length, which sets the sampling stride, from a
    first pass), so memory does not grow with the sources beyond the sample itself.
    """
    for p in train_parts:
        p.splits.check()
    total = sum(p.splits.chars("train") for p in train_parts)
    stream = itertools.chain.from_iterable(p.splits.stream("train") for p in train_parts)
    return train_tokenizer(stream, cfg.tokenizer_vocab, cfg.tokenizer_type, cfg.tokenizer_max_bytes,
                           total_chars=total)


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


def get_tokenizer(cfg: DataConfig, train_parts: list[Part], log=print) -> Tokenizer:
    if cfg.tokenizer or cfg.tokens_tokenizer:
        return load_tokenizer(cfg.tokenizer or cfg.tokens_tokenizer, cfg.eos_token)
    pre = [p.source for p in train_parts if p.kind == "tokens"]
    if pre:
        raise DataError(f"{', '.join(pre)}: pre-tokenized sources need the tokenizer their ids come from; set "
                        "data.tokens_tokenizer (or data.tokenizer)")
    key = _key("tokenizer", [p.fingerprint for p in train_parts], cfg.tokenizer_vocab, cfg.tokenizer_type,
               cfg.tokenizer_max_bytes)
    ext = ".json" if cfg.tokenizer_type == "bytelevel" else ".model"
    path = os.path.join(cache_root(cfg), "tokenizers", key + ext)
    if os.path.isfile(path):
        log(f"tokenizer: reusing {path}")
        return load_tokenizer(path)
    t0 = time.perf_counter()
    tok = train_on(cfg, train_parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale(os.path.dirname(path), key + ext)
    if not _publish(tok, path):
        log(f"tokenizer: another process trained {path} first; using it")
        return load_tokenizer(path)
    log(f"tokenizer: trained {cfg.tokenizer_type} vocab {tok.vocab_size} in {time.perf_counter() - t0:.1f}s")
    return tok


def _publish(tok: Tokenizer, path: str) -> bool:
    """Put `tok` at `path` unless another process got there first (then False: that file stays).

    The file is written under a unique temporary name and hard-linked into place, which
    fails when `path` exists; where the file system has no hard links, os.replace (the
    last writer wins).
    """
    tmp = tok.write_temporary(path)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _last_touched(path: str) -> float:
    """The newest modification time of `path` and, for a directory, of what it holds."""
    try:
        times = [os.stat(path).st_mtime]
        if os.path.isdir(path):
            times += [e.stat().st_mtime for e in os.scandir(path)]
    except OSError:  # removed meanwhile
        return time.time()
    return max(times)


def is_stale(path: str, now: float | None = None) -> bool:
    """Whether the temporary `path` is left over: made by a process of this host that is no
    longer alive, or untouched for STALE_AFTER_S (a name without host and pid, from an older
    jaxlm, only by age). Another live process's build is never stale."""
    owner = temporary_owner(os.path.basename(path))
    if owner and owner[0] == host_name() and owner[1] != os.getpid() and not _alive(owner[1]):
        return True
    return (time.time() if now is None else now) - _last_touched(path) > STALE_AFTER_S


def remove_stale(directory: str, name: str) -> list[str]:
    """Remove the stale temporaries of `name` (`name.tmp-*`) in `directory`; returns their names."""
    removed, now = [], time.time()
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if entry.startswith(name + TEMPORARY) and is_stale(path, now):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):  # another process removed it first
                    os.remove(path)
            removed.append(entry)
    return removed


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


def _pieces(stream: Iterable[tuple[bool, str]], piece_chars: int | None) -> Iterator[tuple[bool, str]]:
    """A document stream regrouped into (starts a document, piece) to encode: each document in
    pieces of about `piece_chars` characters cut right before a space (`_cut`; the text not yet
    cut is carried into the next pair), or whole with `piece_chars=None`."""
    if not piece_chars:
        for doc in sources.by_document(stream):
            yield True, "".join(doc)
        return
    start, buf = True, None
    for new, text in stream:
        if new and buf is not None:
            yield start, buf
        if new or buf is None:
            start, buf = True, text
        else:
            buf += text
        if len(buf) > piece_chars:
            *done, buf = _cut(buf, piece_chars)
            for piece in done:
                yield start, piece
                start = False
    if buf is not None:
        yield start, buf


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _encode_group(tok: Tokenizer, pieces: list[str], starts: list[bool]) -> np.ndarray:
    """The ids of consecutive pieces, with EOS before each piece that starts a document."""
    ids = tok.encode(pieces)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), token_dtype(tok), count=int(lengths.sum()))
    offsets = np.cumsum(lengths) - lengths
    return np.insert(flat, offsets[np.asarray(starts, bool)], tok.eos_id)


def encode_stream(tok: Tokenizer, stream: Iterable[tuple[bool, str]], piece_chars: int | None = _PIECE_CHARS):
    """Yield (EOS-joined ids of a group of text, its UTF-8 bytes, its characters) for a document
    stream (`jaxlm.data.sources`), group by group of about `_GROUP_CHARS` characters.

    Each document is preceded by EOS. `piece_chars=None`, or a tokenizer for which cuts
    before spaces are not safe (`splits_at_spaces`), encodes whole documents.
    """
    if piece_chars and not tok.splits_at_spaces:
        piece_chars = None
    group: list[str] = []
    starts: list[bool] = []
    size = 0
    for start, piece in itertools.chain(_pieces(stream, piece_chars), [(None, None)]):
        if piece is not None:
            group.append(piece)
            starts.append(start)
            size += len(piece)
        if not group or (piece is not None and size < _GROUP_CHARS):
            continue
        yield _encode_group(tok, group, starts), sum(map(_utf8_len, group)), size
        group, starts, size = [], [], 0


def _open_entry(entry: str) -> tuple[np.ndarray, dict] | None:
    """(memory-mapped token stream, manifest) of a complete entry; None if it is missing or
    does not match its manifest."""
    try:
        with open(os.path.join(entry, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        arr = np.memmap(os.path.join(entry, "tokens.bin"), dtype=manifest["dtype"], mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (arr, manifest) if len(arr) == manifest.get("tokens") else None


def _write_entry(directory: str, tok: Tokenizer, part: Part, split: str, label: str) -> dict:
    """Encode one split of `part` into `directory` (tokens.bin, then manifest.json); its manifest."""
    from tqdm import tqdm

    shown = sys.stderr.isatty()
    total_chars = part.splits.chars(split) if shown else 0  # may read part of the source once more
    n_docs = n_tokens = n_bytes = 0

    def counted(stream):
        nonlocal n_docs
        for start, text in stream:
            n_docs += start
            yield start, text

    with open(os.path.join(directory, "tokens.bin"), "wb") as f, \
            tqdm(total=total_chars, unit="char", unit_scale=True, desc=f"tokenizing {label}", leave=False,
                 disable=total_chars < _GROUP_CHARS or not shown) as bar:
        for ids, nb, nc in encode_stream(tok, counted(part.splits.stream(split))):
            f.write(ids.tobytes())
            n_tokens += len(ids)
            n_bytes += nb
            bar.update(nc)
    manifest = {"format": FORMAT_VERSION, "split": split, "source": part.source, "role": part.role,
                "source_fingerprint": part.fingerprint, "tokenizer_sha256": tok.sha256,
                "vocab_size": tok.vocab_size, "dtype": token_dtype(tok).name, "documents": n_docs,
                "tokens": n_tokens, "bytes": n_bytes}
    with open(os.path.join(directory, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _check_tokens_tokenizer(cfg: DataConfig, part: Part, tok: Tokenizer) -> None:
    """A tokens: source's declared tokenizer (data.tokens_tokenizer) must be the run's."""
    if cfg.tokens_tokenizer and load_tokenizer(cfg.tokens_tokenizer, cfg.eos_token).sha256 != tok.sha256:
        raise DataError(f"{part.source} was made with data.tokens_tokenizer={cfg.tokens_tokenizer}, which is not the "
                        f"run's tokenizer ({cfg.tokenizer or 'the run directory copy'}); token ids would mean other "
                        "text")


def _write_token_entry(directory: str, tok: Tokenizer, part: Part, split: str, label: str) -> dict:
    """Copy one split of a pre-tokenized source into `directory` (`jaxlm.data.token_files`): the held-out
    fraction is the last documents, as for text; UTF-8 bytes are counted (by decoding) for validation only."""
    cfg = part.cfg
    if part.token_scan is None or part.token_scan[0] != tok.sha256:  # one scan serves both splits
        paths = token_files.files(sources.parse_source(part.source).target)
        arrays = [token_files.open_tokens(p, cfg.tokens_format, cfg.tokens_dtype) for p in paths]
        part.token_scan = tok.sha256, arrays, token_files.scan(arrays, tok.eos_id, tok.vocab_size, paths)
    _, arrays, starts = part.token_scan
    total, n = sum(len(a) for a in arrays), len(starts)
    if not total:
        raise DataError(f"data source '{part.source}' holds no tokens")
    lo, hi = 0, total
    if part.role == "both":
        if n >= 2:
            cut = int(starts[max(0, n - max(1, round(n * cfg.valid_fraction)))])
        else:
            cut = int(total * (1 - cfg.valid_fraction))
        lo, hi = (0, cut) if split == "train" else (cut, total)
    first, last = np.searchsorted(starts, [lo, hi])
    dtype = token_dtype(tok)
    with open(os.path.join(directory, "tokens.bin"), "wb") as f:
        n_tokens = token_files.copy_range(arrays, lo, hi, f, dtype)
    n_bytes = 0
    if split == "valid":
        bounds = [lo, *[int(s) for s in starts[first:last] if s > lo], hi]
        ids = np.fromfile(os.path.join(directory, "tokens.bin"), dtype=dtype)
        for a, b in zip(bounds, bounds[1:]):
            doc = ids[a - lo:b - lo]
            doc = doc[1:] if len(doc) and doc[0] == tok.eos_id else doc
            n_bytes += len(tok.decode(doc).encode("utf-8"))
    manifest = {"format": FORMAT_VERSION, "split": split, "source": part.source, "role": part.role,
                "source_fingerprint": part.fingerprint, "tokenizer_sha256": tok.sha256,
                "vocab_size": tok.vocab_size, "dtype": dtype.name, "documents": int(last - first) + (lo not in starts),
                "tokens": n_tokens, "bytes": n_bytes}
    with open(os.path.join(directory, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _install(tmp: str, entry: str, tries: int = 5) -> tuple[np.ndarray, dict] | None:
    """Rename the finished temporary directory `tmp` to `entry`. None when it is in place; the
    entry of another builder that got there first (then `tmp` is removed). An entry there
    that fails its manifest check is moved aside first and deleted after the rename."""
    aside = []
    try:
        for _ in range(tries):
            try:
                os.rename(tmp, entry)
                return None
            except OSError as e:  # an entry is there: non-empty directories are never replaced
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            found = _open_entry(entry)
            if found is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return found
            aside.append(temporary_name(entry))
            try:
                os.rename(entry, aside[-1])
            except FileNotFoundError:  # another process moved it aside meanwhile
                aside.pop()
        raise DataError(f"could not rename {tmp} to {entry}: other processes keep replacing it; "
                        f"give this run its own data.cache_dir")
    finally:
        for path in aside:
            shutil.rmtree(path, ignore_errors=True)


def tokens(cfg: DataConfig, tok: Tokenizer, part: Part, split: str, log=print) -> tuple[np.ndarray, dict]:
    """(memory-mapped token stream, manifest) of one split of one source, built if missing."""
    key = _key("tokens", part.fingerprint, tok.sha256, split, *([tok.eos_id] if tok.kind != "sentencepiece" else []))
    root = os.path.join(cache_root(cfg), "tokens")
    entry = os.path.join(root, key)
    label = f"{split} of {part.source}"
    found = _open_entry(entry)
    if found is not None:
        log(f"token cache: reusing {label} ({found[1]['tokens']:,} tokens) from {entry}")
        return found
    if os.path.isdir(entry):
        log(f"token cache: {entry} does not match its manifest; rebuilding")
    t0 = time.perf_counter()
    if part.kind == "tokens":
        _check_tokens_tokenizer(cfg, part, tok)
    else:
        part.splits.check()
    os.makedirs(root, exist_ok=True)
    remove_stale(root, key)  # leftovers of interrupted builds, never a live one
    tmp = temporary_name(entry)
    os.makedirs(tmp)
    try:
        write = _write_token_entry if part.kind == "tokens" else _write_entry
        manifest = write(tmp, tok, part, split, label)
        found = _install(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if found is not None:
        log(f"token cache: another process built {label} first; using {entry}")
        return found
    dt = time.perf_counter() - t0
    n_bytes, n_tokens = manifest["bytes"], manifest["tokens"]
    speed = f"{n_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s of text" if n_bytes else f"{n_tokens / max(dt, 1e-9):,.0f} tokens/s"
    log(f"token cache: built {label} in {dt:.1f}s ({speed}), {n_tokens:,} tokens -> {entry}")
    return np.memmap(os.path.join(entry, "tokens.bin"), dtype=manifest["dtype"], mode="r"), manifest
