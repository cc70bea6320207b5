"""Text sources -> streams of documents (numpy/python only, no jax).

`tfds:NAME[/CONFIG][:SPLIT]` reads a prepared TFDS dataset (`jaxlm.data.tfds`). `text:GLOB`
reads UTF-8 files, one document per file. `jsonl:GLOB` reads one document per line from
the field `data.text_field`. `parquet:GLOB` and `hf:PATH[:SPLIT]` (a Hugging Face dataset
folder) read one document per row of the string column `data.text_field`
(`jaxlm.data.columnar`). Invalid UTF-8 in text and jsonl files is an error unless
`data.invalid_utf8=replace`, which replaces it with U+FFFD and logs how often (Parquet and
Arrow string columns are UTF-8 by their type).

A *document stream* is an iterable of (starts a document, text) pairs: a document is the
text of a pair that starts one followed by the text of the pairs up to the next start. Text
files are read and decoded in blocks of about a megabyte, so a stream holds a bounded amount
of text at a time whatever the size of the corpus or of one document; `Splits` gives a
source's train and validation documents that way (the token cache and tokenizer training
read them so).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from jaxlm.config import DataConfig
from jaxlm.data import columnar
from jaxlm.data.tfds import prepared_files, read_tfds, valid_split
from jaxlm.errors import DataError

logger = logging.getLogger(__name__)
_BLOCK_BYTES = 1 << 20  # text files are read and decoded in blocks of this many bytes
_FFFD = "\ufffd".encode("utf-8")  # a U+FFFD that is in the text itself, not a replacement


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # tfds | text | jsonl | parquet | hf | tokens (pre-tokenized: jaxlm.data.token_files)
    target: str  # dataset name (with /config), glob, or folder (hf)
    split: str | None = None


FORMS = "tfds:NAME[/CONFIG][:SPLIT], text:GLOB, jsonl:GLOB, parquet:GLOB, hf:PATH[:SPLIT] or tokens:GLOB"


def parse_source(spec: str) -> SourceSpec:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("tfds", "text", "jsonl", "parquet", "hf", "tokens") or not rest:
        raise DataError(f"data source '{spec}' must look like {FORMS}")
    if kind == "tfds":
        name, _, split = rest.partition(":")
        return SourceSpec(kind, name, split or None)
    if kind == "hf":
        return SourceSpec(kind, *columnar.parse_hf(rest))
    return SourceSpec(kind, rest)


def parse_mixture(source: str) -> list[tuple[str, float]]:
    """`SOURCE[@WEIGHT]; SOURCE[@WEIGHT]; ...` -> [(source, weight)], weights default 1."""
    out = []
    for entry in filter(None, (e.strip() for e in source.split(";"))):
        spec, at, weight = entry.rpartition("@")
        try:
            w = float(weight) if at else 1.0
        except ValueError:
            spec, w = entry, 1.0  # an '@' that is part of a path
        else:
            spec = spec.strip() if at else entry
        if not w > 0:
            raise DataError(f"mixture weight of '{spec}' must be > 0, got {weight}")
        parse_source(spec)
        out.append((spec, w))
    if not out:
        raise DataError("data.source is empty")
    if len({s for s, _ in out}) < len(out):
        raise DataError(f"data.source '{source}' names a source twice; give it one weight")
    return out


def _files(pattern: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataError(f"no files match '{pattern}'")
    return files


def _utf8_error(where: str, e: UnicodeDecodeError, offset: int = 0) -> DataError:
    return DataError(f"{where} is not valid UTF-8 ({e.reason} at byte {offset + e.start}); fix the file or set "
                     f"data.invalid_utf8=replace to replace invalid bytes with U+FFFD")


def decode(raw: bytes, where: str, invalid_utf8: str = "error", warn: bool = True) -> str:
    """UTF-8 text; invalid bytes raise DataError, or with invalid_utf8='replace' become U+FFFD and are counted
    (logged when `warn`)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if invalid_utf8 != "replace":
            raise _utf8_error(where, e) from None
    text = raw.decode("utf-8", errors="replace")
    if warn:
        replaced = text.count("\ufffd") - raw.count(_FFFD)
        logger.warning("%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD", where, replaced)
    return text


def text_chunks(path: str, invalid_utf8: str = "error", warn: bool = True) -> Iterator[str]:
    """The text of a UTF-8 file in consecutive pieces of about `_BLOCK_BYTES`, decoded as `decode`
    decodes the whole file (the same errors, with the byte offset in the file; the same count
    of replaced sequences, logged once at the end when `warn`)."""
    replace = invalid_utf8 == "replace"
    decoder = codecs.getincrementaldecoder("utf-8")("replace" if replace else "strict")
    offset = replaced = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK_BYTES)
            held = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _utf8_error(path, e, offset - len(held)) from None
            if replace:
                used = len(held) + len(block) - len(decoder.getstate()[0])
                replaced += text.count("\ufffd") - (held + block)[:used].count(_FFFD)
            offset += len(block)
            if text:
                yield text
            if not block:
                break
    if replaced and warn:
        logger.warning("%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD", path, replaced)


def split_chunks(chunks: Iterable[str], sep: str) -> Iterator[tuple[bool, str]]:
    """Text given in consecutive chunks, split at `sep` as `str.split` splits it, as a document
    stream: every part (empty ones too) starts with a pair (True, text), and only a chunk's
    last len(sep) - 1 characters are held back (a separator may continue in the next one)."""
    keep, carry, pending = len(sep) - 1, "", True
    for chunk in chunks:
        *done, last = (carry + chunk).split(sep)
        for part in done:
            if part or pending:
                yield pending, part
            pending = True
        emit = len(last) - keep
        if emit > 0:
            yield pending, last[:emit]
            pending = False
            last = last[emit:]
        carry = last
    if carry or pending:
        yield pending, carry


def by_document(stream: Iterable[tuple[bool, str]]) -> Iterator[Iterator[str]]:
    """The documents of a document stream, each an iterator over its pieces of text (read them in order)."""
    number = -1

    def key(pair: tuple[bool, str]) -> int:
        nonlocal number
        number += pair[0]
        return number

    return ((text for _, text in group) for _, group in itertools.groupby(stream, key))


def join_documents(stream: Iterable[tuple[bool, str]]) -> list[str]:
    """The documents of a document stream as whole strings (all in memory: for small uses)."""
    return ["".join(doc) for doc in by_document(stream)]


def _text_docs(path: str, invalid_utf8: str, separator: str, warn: bool = True) -> Iterator[tuple[bool, str]]:
    """One document per file, or per `separator`-delimited part of it, streamed in blocks."""
    chunks = text_chunks(path, invalid_utf8, warn)
    if separator:
        yield from split_chunks(chunks, separator)
        return
    yield True, ""
    for chunk in chunks:
        yield False, chunk


def _jsonl_docs(path: str, field: str, invalid_utf8: str, warn: bool = True,
                skip: int = 0) -> Iterator[tuple[bool, str]]:
    """One document per non-blank line; the first `skip` are only counted (yielded empty, JSON not parsed)."""
    n = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode(raw, f"{path}:{lineno}", invalid_utf8, warn)
            if not line.strip():
                continue
            n += 1
            if n <= skip:
                yield True, ""
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{lineno} has no field '{field}' (set data.text_field)")
            yield True, str(record[field])


@dataclass
class Scan:
    """What a first pass over one read of a source found; documents are counted before empty
    ones are dropped, as the held-out fraction counts them."""
    units: list[tuple[str, int, int]]  # (file, or TFDS split, its documents, its characters)
    documents: int
    chars: int
    first_text: int  # number of the first document that holds text; -1: none does
    last_text: int
    marks: list[list[list[int]]]  # per unit: [document, characters before it] where a build chunk starts
    # (documents numbered from 0 in the unit; `jaxlm.data.build`)


def _scan_unit(docs: Iterable[tuple[bool, str]], chunk_chars: int) -> dict:
    """Documents, characters, first and last document with text, and chunk marks of one unit: a
    document starts a new chunk when the chunk before it holds at least `chunk_chars` characters."""
    n = chars = since = 0
    first = last = -1
    marks = []
    for start, text in docs:
        if start:
            if since >= chunk_chars:
                marks.append([n, chars])
                since = 0
            n += 1
        if text:
            chars += len(text)
            since += len(text)
            first = n - 1 if first < 0 else first
            last = n - 1
    return {"docs": n, "chars": chars, "first": first, "last": last, "marks": marks}


@dataclass(frozen=True)
class _Range:
    """Documents [lo, hi) of one read of a source (`read`: a TFDS split, None for files); with
    `chars`, characters [chars[0], chars[1]) of its only document."""
    read: str | None
    lo: int = 0
    hi: int = sys.maxsize
    chars: tuple[int, int] | None = None


class Splits:
    """The train and validation documents of one source in a role, read from the source on
    every pass as document streams, so memory does not grow with the source.

    role "both": validation is the TFDS validation split (if the source is a TFDS train split
    that has one) or a held-out fraction: the last round(n * data.valid_fraction) of its n
    documents, whole; a single document is cut once, at the last paragraph break before that
    point. "train": all of it trains; "valid": all of it validates (a TFDS source without a
    split reads its validation split). Which documents are held out comes from a first pass
    (`scan`) that counts documents and characters and keeps no text. Text files are read in
    blocks, so even a single document of any size streams; TFDS splits are read whole into
    memory (kept for later passes) and then streamed the same way.
    """

    def __init__(self, cfg: DataConfig, source: str | None = None, role: str = "both"):
        self.cfg, self.source, self.role = cfg, source or cfg.source, role
        self.spec = parse_source(self.source)
        self._scans: dict[str | None, Scan] = {}
        self._ranges: dict[str, _Range | None] = {}
        self._chars: dict[str, int] = {}
        self._tfds: dict[str, list[str]] = {}
        self.group = None  # a distributed.Group: scans are then shared between its processes, file by file

    def _docs(self, unit: str, warn: bool = False, skip: int = 0) -> Iterator[tuple[bool, str]]:
        """All documents of one file (or TFDS split), empty ones included; `skip`: see `_jsonl_docs`."""
        spec, cfg = self.spec, self.cfg
        if spec.kind == "tfds":
            if unit not in self._tfds:
                self._tfds[unit] = read_tfds(spec.target, unit, cfg)
            return ((True, d) for d in self._tfds[unit])
        if spec.kind == "text":
            return _text_docs(unit, cfg.invalid_utf8, cfg.doc_separator, warn)
        if spec.kind in ("parquet", "hf"):
            return columnar.docs(unit, cfg.text_field, skip)
        return _jsonl_docs(unit, cfg.text_field, cfg.invalid_utf8, warn, skip)

    def scan(self, read: str | None = None) -> Scan:
        """Count the documents and characters of one read (a TFDS split, None for files), once.
        Bad input (invalid UTF-8, JSON) fails here, before anything is built."""
        if read not in self._scans:
            kind, target = self.spec.kind, self.spec.target
            units = [read] if kind == "tfds" else columnar.hf_files(target, read) if kind == "hf" else _files(target)
            chunk = max(1, int(self.cfg.build_chunk_mb * 1e6))
            scan = lambda unit: _scan_unit(self._docs(unit, warn=True), chunk)  # noqa: E731
            found = self.group.map("scan", units, scan) if self.group else [scan(u) for u in units]
            rows, n, chars, first, last = [], 0, 0, -1, -1
            for unit, f in zip(units, found):
                if f["first"] >= 0:
                    first = n + f["first"] if first < 0 else first
                    last = n + f["last"]
                rows.append((unit, f["docs"], f["chars"]))
                n, chars = n + f["docs"], chars + f["chars"]
            self._scans[read] = Scan(rows, n, chars, first, last, [f["marks"] for f in found])
        return self._scans[read]

    def range(self, split: str) -> _Range | None:
        """What `split` reads: documents [lo, hi) of one read (see `_Range`); None: nothing."""
        return self._range(split)

    def _range(self, split: str) -> _Range | None:
        if split not in self._ranges:
            self._ranges[split] = self._find_range(split)
        return self._ranges[split]

    def _valid_split(self) -> str | None:
        """The split a TFDS or hf: source validates on, if it has one."""
        if self.spec.kind == "tfds":
            return valid_split(self.cfg, self.spec.target)
        return columnar.hf_valid_split(self.spec.target)

    def _find_range(self, split: str) -> _Range | None:
        """What `split` ("train" or "valid") reads in this role; None: nothing."""
        spec = self.spec
        by_split = spec.kind in ("tfds", "hf")  # reads are named splits, not one set of files
        default = (spec.split or "train") if by_split else None
        if self.role == "valid":
            if split != "valid":
                return None
            return _Range((spec.split or self._valid_split() or "train") if by_split else None)
        if self.role == "train":
            return _Range(default) if split == "train" else None
        name = self._valid_split() if by_split and spec.split in (None, "train") else None
        if name:
            return _Range(default if split == "train" else name)
        scan = self.scan(default)
        if scan.documents >= 2:
            first_valid = max(0, scan.documents - max(1, round(scan.documents * self.cfg.valid_fraction)))
            return _Range(default, 0, first_valid) if split == "train" else _Range(default, first_valid)
        if scan.documents == 1:
            cut = self._single_cut(default)
            return _Range(default, 0, 1, (0, cut) if split == "train" else (cut, scan.chars))
        return None

    def _single_cut(self, read: str | None) -> int:
        """Where the only document of `read` is cut: at int(chars * (1 - data.valid_fraction)),
        moved back to just after the last paragraph break ("\\n\\n") before it, if any."""
        cut = int(self.scan(read).chars * (1 - self.cfg.valid_fraction))
        brk, pos, tail = -1, 0, ""
        for _, text in self._select(_Range(read, 0, 1)):
            if pos >= cut:
                break
            window, at = tail + text, pos - len(tail)  # a break may straddle two pieces
            found = window.rfind("\n\n", 0, cut - at)
            brk = at + found if found >= 0 else brk
            pos, tail = pos + len(text), text[-1:]
        return brk + 2 if brk > 0 else cut

    def _select(self, r: _Range) -> Iterator[tuple[bool, str]]:
        """The non-empty documents in `r` as a document stream; files wholly outside it are not read."""
        first = 0
        for unit, n_docs, _ in self.scan(r.read).units:
            if first >= r.hi:
                return
            if first + n_docs > r.lo:
                yield from self._pick(unit, first, r)
            first += n_docs

    def _pick(self, unit: str, first: int, r: _Range) -> Iterator[tuple[bool, str]]:
        """The non-empty documents in `r` of one file whose first document is number `first`."""
        return ((start, text) for _, start, text in self.pick_numbered(unit, first, r))

    def pick_numbered(self, unit: str, first: int, r: _Range) -> Iterator[tuple[int, bool, str]]:
        """`_pick` with the number of the document each pair belongs to."""
        i, pos, pending = first - 1, 0, False
        lo_c, hi_c = r.chars or (0, 0)
        for start, text in self._docs(unit, skip=max(0, r.lo - first)):
            if start:
                i, pos, pending = i + 1, 0, True
            if i >= r.hi:
                return
            if i < r.lo or not text:
                continue
            if r.chars:
                pos, text = pos + len(text), text[max(lo_c - pos, 0):max(hi_c - pos, 0)]
            if text:
                yield i, pending, text
                pending = False
            if r.chars and pos >= hi_c:
                return

    def stream(self, split: str) -> Iterator[tuple[bool, str]]:
        """The non-empty documents of `split` ("train" or "valid") as a document stream."""
        r = self._range(split)
        return iter(()) if r is None else self._select(r)

    def documents(self, split: str) -> list[str]:
        """The documents of `split` as whole strings (all in memory: for small uses)."""
        return join_documents(self.stream(split))

    def chars(self, split: str) -> int:
        """Characters of `split`, exactly; the side of a held-out cut with fewer documents is read once more."""
        if split not in self._chars:
            r, n = self._range(split), 0
            if r is not None and r.chars:
                n = r.chars[1] - r.chars[0]
            elif r is not None:
                scan = self.scan(r.read)
                lo, hi = r.lo, min(r.hi, scan.documents)
                count = lambda ranges: sum(len(t) for rr in ranges for _, t in self._select(rr))  # noqa: E731
                if 2 * (hi - lo) >= scan.documents:
                    n = scan.chars - count([_Range(r.read, 0, lo), _Range(r.read, hi)])
                else:
                    n = count([r])
            self._chars[split] = n
        return self._chars[split]

    def check(self) -> None:
        """Raise DataError when a split the role needs holds no text (before anything is built)."""
        if self.role != "valid" and not self._has_text("train"):
            raise DataError(f"data source '{self.source}' holds no text")
        if self.role != "train" and not self._has_text("valid"):
            raise DataError(f"the validation split of '{self.source}' holds no text")

    def _has_text(self, split: str) -> bool:
        r = self._range(split)
        if r is None or r.chars:
            return r is not None and r.chars[1] > r.chars[0]
        scan = self.scan(r.read)
        return 0 <= scan.first_text < r.hi and scan.last_text >= r.lo


def fingerprint(cfg: DataConfig, source: str | None = None, role: str = "both") -> str:
    """A hash of what one source's splits are read from, computed without reading the text.

    It covers the source, its role and every setting that changes the documents. Files
    count by path, size and modification time; a TFDS dataset by its prepared version
    directory's file names and sizes. Any change to a source changes the hash.
    """
    source = source or cfg.source
    h = hashlib.sha256()
    h.update(json.dumps([source, role, cfg.valid_fraction if role == "both" else None, cfg.text_field,
                         cfg.doc_separator, cfg.invalid_utf8]).encode())
    if source.startswith("tokens:"):
        h.update(json.dumps([cfg.tokens_format, cfg.tokens_dtype]).encode())
    spec = parse_source(source)
    if spec.kind == "tfds":
        h.update(json.dumps(prepared_files(cfg, spec.target)).encode())
    else:
        paths = columnar.hf_fingerprint_files(spec.target) if spec.kind == "hf" else _files(spec.target)
        for path in paths:
            st = os.stat(path)
            h.update(json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()
