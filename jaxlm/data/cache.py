"""Token cache: tokenize once, reuse while the source and the tokenizer are unchanged.

Layout under the cache root (`data.cache_dir`, `$JAXLM_CACHE_DIR` or ~/.cache/jaxlm):

    tokenizers/<key>.model          a tokenizer trained on a source (key: source + settings)
    tokens/<key>/manifest.json      what the entry holds (key: source + tokenizer + split)
    tokens/<key>/tokens.bin         the EOS-joined token stream, uint16 or uint32
    tokens/<key>.parts-<plan>/      a text build in progress: its committed chunks, NNNNNN.bin + .json

Every source of a mixture (and a separate validation source) has its own entries, so a
new mixture of known sources tokenizes nothing. Reads are memory-mapped.

A build streams its source (`sources.Splits`): a first pass counts documents and
characters (which documents are held out, the sampling stride of tokenizer training, where
the build's chunks start), then text is read, encoded and written chunk by chunk
(`jaxlm.data.build`), so its memory does not grow with the corpus. Encoding runs on all the
cores the process may use (sentencepiece threads, `tokenizers`' encode_batch). The processes
of a run (`distributed.Group`) whose cache root is one shared folder share a missing text
entry's build: the first pass file by file, the encoding chunk by chunk, each into the
build's parts folder; process 0 then joins the chunks into the entry. The tokens are the
same bytes whatever the number of processes, and an interrupted build keeps its committed
chunks for the relaunch. A pre-tokenized source (`tokens:`) is copied by process 0.

Runs that do not know of each other, on several hosts sharing the file system, may build
the same entry at once: each encodes the chunks it finds uncommitted (the same bytes as
the other's). Every file is written under its own temporary name,
`<name>.tmp-<host>-<pid>-<random>`, and renamed into place, so an interrupted build leaves
nothing that is ever read. A build removes only stale temporaries of its key: of a process of this host that is gone,
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

import numpy as np

from jaxlm.config import DataConfig, default_cache_root
from jaxlm.data import build, sources, token_files
from jaxlm.data.build import token_dtype
from jaxlm.data.tokenizer import (TEMPORARY, Tokenizer, host_name, load_tokenizer, temporary_name, temporary_owner,
                                  train_tokenizer)
from jaxlm.errors import DataError

FORMAT_VERSION = 2
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


def get_tokenizer(cfg: DataConfig, train_parts: list[Part], log=print) -> Tokenizer:
    if cfg.tokenizer or cfg.tokens_tokenizer:
        return load_tokenizer(cfg.tokenizer or cfg.tokens_tokenizer, cfg.eos_token, cfg.bos_token)
    if cfg.format == "sft":
        raise DataError("data.format=sft fine-tunes with a model's tokenizer: set data.tokenizer, or "
                        "checkpoint.init_from (its run's tokenizer)")
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


def _check_tokens_tokenizer(cfg: DataConfig, part: Part, tok: Tokenizer) -> None:
    """A tokens: source's declared tokenizer (data.tokens_tokenizer) must be the run's."""
    if cfg.tokens_tokenizer and load_tokenizer(cfg.tokens_tokenizer, cfg.eos_token, cfg.bos_token).sha256 != tok.sha256:
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
    return _write_manifest(directory, part, tok, split, documents=int(last - first) + (lo not in starts),
                           tokens=n_tokens, bytes=n_bytes)


def _write_manifest(directory: str, part: Part, tok: Tokenizer, split: str, **counts) -> dict:
    """Write and return an entry's manifest: what it was built from, and its documents, tokens and bytes."""
    manifest = {"format": FORMAT_VERSION, "split": split, "source": part.source, "role": part.role,
                "source_fingerprint": part.fingerprint, "tokenizer_sha256": tok.sha256,
                "vocab_size": tok.vocab_size, "dtype": token_dtype(tok).name, **counts}
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


def _shared_root(group, root: str) -> bool:
    """Whether every process of `group` sees the same `root` (a file process 0 makes there)."""
    probe = group.broadcast("probe", lambda: os.path.basename(_touch(root)))
    seen = group.gather("probed", os.path.exists(os.path.join(root, probe)))
    group.barrier("probe seen")
    if group.owner:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, probe))
    return all(seen)


def _touch(root: str) -> str:
    os.makedirs(root, exist_ok=True)
    path = temporary_name(os.path.join(root, ".probe"))
    open(path, "w").close()
    return path


def _build_tokens_entry(tok: Tokenizer, part: Part, split: str, entry: str, label: str) -> None:
    """Copy one split of a pre-tokenized source into place (one process)."""
    tmp = temporary_name(entry)
    os.makedirs(tmp)
    try:
        _write_token_entry(tmp, tok, part, split, label)
        _install(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _assemble(parts: build.Parts, chunks: list[build.Chunk], part: Part, tok: Tokenizer, split: str,
              entry: str) -> bool:
    """Process 0: join the committed chunks into a temporary entry, write its manifest, rename it
    into place and remove the parts folder. True when another builder's entry got there first."""
    tmp = temporary_name(entry)
    os.makedirs(tmp)
    try:
        try:
            totals = build.assemble(parts, chunks, tmp)
        except DataError:
            if _open_entry(entry) is not None:  # another builder finished (and removed the parts) first
                shutil.rmtree(tmp, ignore_errors=True)
                return True
            raise
        _write_manifest(tmp, part, tok, split, **totals)
        found = _install(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(parts.dir, ignore_errors=True)
    return found is not None


def _build_text_entry(cfg: DataConfig, tok: Tokenizer, part: Part, split: str, key: str, entry: str, label: str,
                      group, log) -> None:
    """Encode one split of a text source into place, its chunks shared between the processes of `group`."""
    part.splits.group = group  # the first pass is shared too
    try:
        part.splits.check()
        chunks = build.plan(part.splits, split)
    finally:
        part.splits.group = None
    root = os.path.dirname(entry)
    name = f"{key}.parts-{_key('parts', cfg.build_chunk_mb, build._GROUP_CHARS, build._PIECE_CHARS)[:8]}"
    parts = build.Parts(os.path.join(root, name), token_dtype(tok))
    for left in {n.partition(TEMPORARY)[0] for n in os.listdir(parts.dir) if TEMPORARY in n}:
        remove_stale(parts.dir, left)  # chunks of an interrupted build that were never committed
    mine = build.share(len(chunks), group.index, group.count)
    if group.count > 1:
        which = f"chunks {mine.start}-{mine.stop - 1}" if len(mine) else "none"
        log(f"token cache: process {group.index} encodes {which} of the {len(chunks)} chunks of {label}")
    done = group.each("encoded", lambda: build.encode_share(tok, part.splits, split, chunks, mine, parts, label,
                                                            sys.stderr.isatty()))
    kept = len(chunks) - sum(d["chunks"] for d in done)
    lost = group.each("assembled", lambda: _assemble(parts, chunks, part, tok, split, entry) if group.owner else None)
    if lost[0]:
        log(f"token cache: another process built {label} first; using {entry}")
    if kept:
        log(f"token cache: {kept} of the {len(chunks)} chunks of {label} were kept from an interrupted build")
    if group.count > 1:
        me = done[group.index]
        log(f"token cache: process {group.index} encoded {me['chunks']} chunks, {me['bytes'] / 1e6:.1f} MB of text "
            f"in {me['seconds']:.1f}s ({me['bytes'] / 1e6 / max(me['seconds'], 1e-9):.2f} MB/s)")


def tokens(cfg: DataConfig, tok: Tokenizer, part: Part, split: str, log=print, group=None) -> tuple[np.ndarray, dict]:
    """(memory-mapped token stream, manifest) of one split of one source, built if missing.

    With a `distributed.Group` of several processes whose cache root is one shared folder,
    they build a missing text entry together (`jaxlm.data.build`); without one, or when the
    processes do not share the folder, each builds it alone.
    """
    from jaxlm.distributed import Group

    key = _key("tokens", part.fingerprint, tok.sha256, split, *([tok.eos_id] if tok.kind != "sentencepiece" else []),
               *([tok.start_id] if tok.start_id != tok.eos_id else []))
    root = os.path.join(cache_root(cfg), "tokens")
    entry = os.path.join(root, key)
    label = f"{split} of {part.source}"
    if group is None or group.count == 1:
        group = Group.solo()
    elif not _shared_root(group, root):
        log(f"token cache: the processes do not share {root}; each builds what it misses alone (put "
            "data.cache_dir on a file system every host sees to share the work)")
        group = Group.solo()
    found = _open_entry(entry)
    if group.broadcast("cached", lambda: found is not None):
        found = found or _open_entry(entry)  # another run may have put it in place since this process looked
        if found is None:
            raise DataError(f"token cache entry {entry} cannot be read by process {group.index}")
        log(f"token cache: reusing {label} ({found[1]['tokens']:,} tokens) from {entry}")
        return found
    if os.path.isdir(entry):
        log(f"token cache: {entry} does not match its manifest; rebuilding")
    t0 = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    if group.owner:
        remove_stale(root, key)  # leftovers of interrupted builds, never a live one
    if part.kind == "tokens":
        _check_tokens_tokenizer(cfg, part, tok)
        group.each("copied", lambda: _build_tokens_entry(tok, part, split, entry, label) if group.owner else None)
    else:
        _build_text_entry(cfg, tok, part, split, key, entry, label, group, log)
    found = _open_entry(entry)
    if found is None:
        raise DataError(f"token cache entry {entry} cannot be read by process {group.index} after its build")
    dt = time.perf_counter() - t0
    n_bytes, n_tokens = found[1]["bytes"], found[1]["tokens"]
    speed = f"{n_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s of text" if n_bytes else f"{n_tokens / max(dt, 1e-9):,.0f} tokens/s"
    log(f"token cache: built {label} in {dt:.1f}s ({speed}), {n_tokens:,} tokens -> {entry}")
    return found
