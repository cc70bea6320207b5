"""Encoding a text split into the token cache, in chunks that one process or all of a run's share.

Documents are encoded group by group of about `_GROUP_CHARS` characters, each document on its
own and preceded by EOS, so the ids of a document never depend on what is encoded with it.
Long documents, and a single document of any size, are cut into pieces of about
`_PIECE_CHARS` characters right before a space, where a tokenizer that splits words at
whitespace (and adds no dummy prefix) cannot merge across, so the ids are the same as
encoding the whole document (`Tokenizer.splits_at_spaces`). Other tokenizers (tokenizer.json
files among them) encode whole documents: each document is then held in memory whole (with
its ids), so memory grows with the longest document.

A build cuts the split into chunks at document boundaries, about `data.build_chunk_mb` MB of
text each (the marks of the first pass, `sources.Scan`), so the chunks depend on the source
alone, never on the number of processes. Process i of P encodes the contiguous run of chunks
[ceil(i*n/P), ceil((i+1)*n/P)), reading each of its files once from the first document it needs, and
commits each chunk into the build's parts folder as NNNNNN.bin (its EOS-joined ids) and then
NNNNNN.json (what it holds), each written under a temporary name and renamed into place.
When every process is done, process 0 joins the chunks in order into the entry's tokens.bin
(`assemble`); since every document is encoded on its own, that is the same token stream, byte
for byte, as a build by one process. A build that is interrupted keeps its committed chunks,
and a relaunch, with any number of processes, encodes only the missing ones. Training never
reads a parts folder.

One document is one unit of work: a source that is a single document (Tiny Shakespeare) is
encoded by one process.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator

import numpy as np

from jaxlm.data import sources
from jaxlm.data.tokenizer import Tokenizer, temporary_name
from jaxlm.errors import DataError

_GROUP_CHARS = 1 << 20  # text per encode call: bounds memory (its ids as Python lists) and drives the progress bar
_PIECE_CHARS = 2048  # long documents are encoded in pieces of about this many characters


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


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
    """The ids of consecutive pieces, with EOS before each piece that starts a document (EOS and the start
    token when the tokenizer's start token is another: data.bos_token)."""
    ids = tok.encode(pieces)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), token_dtype(tok), count=int(lengths.sum()))
    at = (np.cumsum(lengths) - lengths)[np.asarray(starts, bool)]
    if tok.start_id == tok.eos_id:
        return np.insert(flat, at, tok.eos_id)
    return np.insert(flat, np.repeat(at, 2), np.tile(np.array([tok.eos_id, tok.start_id], flat.dtype), len(at)))


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


# -- chunks ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chunk:
    """Documents [lo, hi) of one file (or TFDS split) whose first document is number `first`;
    `unit` None: the only document of the split, cut at characters (read through the split's range)."""
    unit: str | None
    first: int
    lo: int
    hi: int
    chars: int  # about how many characters it holds (for progress only)

    def describe(self) -> list:
        return [self.unit, self.first, self.lo, self.hi]


def plan(splits: sources.Splits, split: str) -> list[Chunk]:
    """The chunks of `split`, in stream order: a pure function of the source and data.build_chunk_mb."""
    r = splits.range(split)
    if r is None:
        return []
    scan = splits.scan(r.read)
    if r.chars:
        return [Chunk(None, 0, r.lo, r.hi, r.chars[1] - r.chars[0])]
    chunks, first = [], 0
    for (unit, n, chars), marks in zip(scan.units, scan.marks):
        bounds = [(first, 0), *((first + m, c) for m, c in marks), (first + n, chars)]
        for (a, ca), (b, cb) in zip(bounds, bounds[1:]):
            lo, hi = max(a, r.lo), min(b, r.hi)
            if lo < hi:
                chunks.append(Chunk(unit, first, lo, hi, cb - ca))
        first += n
    return chunks


def share(n: int, index: int, count: int) -> range:
    """The chunks process `index` of `count` encodes: a contiguous run, the runs as even as can be (the
    earlier processes take the longer runs: one chunk goes to process 0)."""
    return range(-(-index * n // count), -(-(index + 1) * n // count))


class Parts:
    """The committed chunks of one build, in its parts folder."""

    def __init__(self, directory: str, dtype: np.dtype):
        self.dir, self.dtype = directory, np.dtype(dtype)
        os.makedirs(directory, exist_ok=True)

    def path(self, k: int, ext: str) -> str:
        return os.path.join(self.dir, f"{k:06d}.{ext}")

    def record(self, k: int, chunk: Chunk) -> dict | None:
        """What chunk `k` holds, if it is committed (for this very chunk, whole); else None."""
        try:
            with open(self.path(k, "json"), encoding="utf-8") as f:
                rec = json.load(f)
            size = os.path.getsize(self.path(k, "bin"))
        except (OSError, ValueError):
            return None
        ok = (isinstance(rec, dict) and rec.get("chunk") == chunk.describe() and rec.get("dtype") == self.dtype.name
              and size == rec.get("tokens", -1) * self.dtype.itemsize)
        return rec if ok else None

    def write(self, k: int, chunk: Chunk, tok: Tokenizer, stream: Iterable[tuple[bool, str]], bar) -> dict:
        """Encode `stream` (chunk `k`'s documents) and commit it: the ids, then the record."""
        rec = {"chunk": chunk.describe(), "dtype": self.dtype.name, "documents": 0, "tokens": 0, "bytes": 0}

        def counted(pairs):
            for start, text in pairs:
                rec["documents"] += start
                yield start, text

        tmp = temporary_name(self.path(k, "bin"))
        try:
            with open(tmp, "wb") as f:
                for ids, nb, nc in encode_stream(tok, counted(stream)):
                    f.write(ids.tobytes())
                    rec["tokens"] += len(ids)
                    rec["bytes"] += nb
                    bar.update(nc)
            os.replace(tmp, self.path(k, "bin"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        tmp = temporary_name(self.path(k, "json"))
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f)
        os.replace(tmp, self.path(k, "json"))
        return rec


def _numbered(splits: sources.Splits, chunks: list[Chunk], ks: list[int], start: int,
              split: str) -> Iterator[tuple[int, bool, str]]:
    """(chunk number, starts a document, text) for chunks ks (consecutive, of one file), read from chunk `start` on."""
    first = chunks[ks[0]]
    if first.unit is None:
        return ((ks[0], s, t) for s, t in splits.stream(split))
    r = dataclasses.replace(splits.range(split), lo=chunks[start].lo, hi=chunks[ks[-1]].hi)
    los = [chunks[k].lo for k in ks]
    return ((ks[bisect.bisect_right(los, i) - 1], s, t) for i, s, t in splits.pick_numbered(first.unit, first.first, r))


def encode_share(tok: Tokenizer, splits: sources.Splits, split: str, chunks: list[Chunk], mine: range,
                 parts: Parts, label: str, show: bool) -> dict:
    """Encode and commit the chunks in `mine` that are not committed yet; what this process did."""
    from tqdm import tqdm

    t0, done = time.perf_counter(), {"chunks": 0, "bytes": 0, "tokens": 0}
    todo = {k for k in mine if parts.record(k, chunks[k]) is None}
    total = sum(chunks[k].chars for k in todo)
    with tqdm(total=total, unit="char", unit_scale=True, desc=f"tokenizing {label}", leave=False,
              disable=not show or total < _GROUP_CHARS) as bar:
        for _, run in itertools.groupby(mine, key=lambda k: (chunks[k].unit, chunks[k].first)):
            run = list(run)
            need = [k for k in run if k in todo]
            if not need:
                continue
            for k, items in itertools.groupby(_numbered(splits, chunks, run, need[0], split), key=lambda x: x[0]):
                if k in todo:
                    rec = parts.write(k, chunks[k], tok, ((s, t) for _, s, t in items), bar)
                    todo.discard(k)
                    done["chunks"] += 1
                    done["bytes"] += rec["bytes"]
                    done["tokens"] += rec["tokens"]
            for k in need:  # chunks whose documents are all empty
                if k in todo:
                    parts.write(k, chunks[k], tok, iter(()), bar)
                    todo.discard(k)
                    done["chunks"] += 1
    done["seconds"] = time.perf_counter() - t0
    return done


def assemble(parts: Parts, chunks: list[Chunk], directory: str) -> dict:
    """Join the committed chunks, in order, into `directory`/tokens.bin; their summed counts."""
    totals = {"documents": 0, "tokens": 0, "bytes": 0}
    with open(os.path.join(directory, "tokens.bin"), "wb") as out:
        for k, chunk in enumerate(chunks):
            rec = parts.record(k, chunk)
            if rec is None:
                raise DataError(f"chunk {k} of {len(chunks)} is missing from {parts.dir}: a process of the build "
                                "did not commit it; launch the same command again to encode what is missing")
            with open(parts.path(k, "bin"), "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            for name in totals:
                totals[name] += rec[name]
    return totals
