"""Pre-tokenized corpora: `tokens:GLOB` sources, read as token ids without a tokenizer pass.

File formats, by extension and `data.tokens_format`:

- `.bin`, format `llmc` (the default): llm.c's and modded-nanogpt's shards: a header of 256
  little-endian int32 (magic 20240520, version 1 for uint16 tokens or 2 for uint32, the token
  count), then the tokens. The magic, the version and the count against the file's size are
  checked.
- `.bin`, format `raw`: headerless tokens of `data.tokens_dtype` (nanoGPT's `train.bin`, uint16).
- `.npy`: a one-dimensional integer array, memory-mapped, never unpickled (`allow_pickle=False`).

The files of a source, in sorted order, are one stream. Its documents are the runs that start
with the tokenizer's end-of-text id, the convention of llm.c's and modded-nanogpt's data scripts
(`[eot] + encode(text)` per document) and of jaxlm's own cache, so a held-out fraction cuts at
the same document as it does for the text. The tokenizer the files were made with is
`data.tokens_tokenizer` (default `data.tokenizer`); it must be the run's, and every id must be
below its vocabulary size.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import numpy as np

from jaxlm.errors import DataError

LLMC_MAGIC = 20240520
LLMC_VERSIONS = {1: np.uint16, 2: np.uint32}
HEADER_INTS = 256
_CHUNK = 1 << 24  # tokens scanned at a time (EOS positions, the largest id, copies)


def files(pattern: str) -> list[str]:
    found = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not found:
        raise DataError(f"no files match '{pattern}'")
    return found


def open_tokens(path: str, fmt: str = "llmc", dtype: str = "uint16") -> np.ndarray:
    """The tokens of one file as a read-only memory map (see the module docstring)."""
    size = os.path.getsize(path)
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # object arrays need pickle, which is refused
            raise DataError(f"{path}: {e} (object arrays are refused; save integer token ids)") from None
        except Exception as e:
            raise DataError(f"{path} is not a readable .npy file ({e})") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"{path} holds a {arr.dtype} array of shape {arr.shape}, not one row of integer ids")
        return arr
    if fmt == "raw":
        item = np.dtype(dtype).itemsize
        if size % item:
            raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens (data.tokens_dtype)")
        return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    if size < 4 * HEADER_INTS:
        raise DataError(f"{path}: {size} bytes, shorter than llm.c's 1024-byte header (a headerless file needs "
                        "data.tokens_format=raw)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != LLMC_MAGIC:
        raise DataError(f"{path}: magic {header[0]} is not llm.c's {LLMC_MAGIC} (a headerless file needs "
                        "data.tokens_format=raw)")
    if int(header[1]) not in LLMC_VERSIONS:
        raise DataError(f"{path}: llm.c version {header[1]} is not one of {sorted(LLMC_VERSIONS)}")
    kind = np.dtype(LLMC_VERSIONS[int(header[1])])
    count = int(header[2])
    if size != 4 * HEADER_INTS + count * kind.itemsize:
        raise DataError(f"{path}: the header counts {count:,} tokens ({4 * HEADER_INTS + count * kind.itemsize:,} "
                        f"bytes in all) but the file has {size:,} bytes")
    return np.memmap(path, dtype=kind, mode="r", offset=4 * HEADER_INTS, shape=(count,))


def chunks(arrays: list[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """(offset in the stream, chunk) over the files' tokens, `_CHUNK` at a time."""
    offset = 0
    for arr in arrays:
        for i in range(0, len(arr), _CHUNK):
            part = np.asarray(arr[i:i + _CHUNK])
            yield offset + i, part
        offset += len(arr)


def scan(arrays: list[np.ndarray], eos_id: int, vocab_size: int, names: list[str]) -> np.ndarray:
    """The offsets of the documents' starts (each EOS id; 0 when the stream does not start with one),
    after checking every id is below `vocab_size`."""
    starts = []
    base = 0
    for arr, name in zip(arrays, names):
        for i in range(0, len(arr), _CHUNK):
            part = np.asarray(arr[i:i + _CHUNK])
            if part.size and int(part.max()) >= vocab_size:
                at = i + int(np.argmax(part >= vocab_size))
                raise DataError(f"{name}: token id {int(arr[at])} at position {at:,} is not below the vocabulary "
                                f"size {vocab_size} of the tokenizer (data.tokens_tokenizer / data.tokenizer)")
            if part.size and int(part.min()) < 0:
                raise DataError(f"{name}: negative token id at position {i + int(np.argmax(part < 0)):,}")
            starts.append(base + i + np.flatnonzero(part == eos_id))
        base += len(arr)
    out = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    if base and (out.size == 0 or out[0] != 0):
        out = np.concatenate([[0], out])
    return out.astype(np.int64)


def copy_range(arrays: list[np.ndarray], lo: int, hi: int, out, dtype: np.dtype) -> int:
    """Write tokens [lo, hi) of the stream to the open file `out` as `dtype`; tokens written."""
    n = 0
    for offset, part in chunks(arrays):
        a, b = max(lo - offset, 0), min(hi - offset, len(part))
        if a < b:
            out.write(part[a:b].astype(dtype, copy=False).tobytes())
            n += b - a
    return n
