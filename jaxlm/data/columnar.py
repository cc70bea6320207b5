"""Columnar corpora: Parquet files, and Hugging Face dataset folders, read with pyarrow alone.

`parquet:GLOB` reads one document per row of the string column `data.text_field`, one row
group at a time, so memory holds one row group's column, never the file.

`hf:PATH[:SPLIT]` reads a local Hugging Face dataset, with no network and without the
`datasets` library:

- a folder written by `Dataset.save_to_disk` (`state.json` and `data-*.arrow` files, Arrow's
  streaming format, read one record batch at a time), or by `DatasetDict.save_to_disk`
  (`dataset_dict.json` and one such folder per split);
- a Hub-style folder of `.parquet` (or `.arrow`) files, as `huggingface-cli download` leaves
  it. A file belongs to a split when a folder on its path is named after the split, or its
  name starts with the split's name and `-`, `_` or `.` (`data/train-00000-of-00004.parquet`,
  `test/0000.parquet`); a folder whose files name no split (FineWeb's
  `data/CC-MAIN-2024-10/000_00000.parquet`) is all `train`.

SPLIT defaults to `train`. A `train` read validates on the dataset's `validation` split (else
`valid`, else `test`) when it has one, like a TFDS source, and on a held-out fraction otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator

from jaxlm.errors import DataError

VALID_SPLITS = ("validation", "valid", "test")
_EXTENSIONS = (".parquet", ".arrow")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _check_text_column(path: str, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise DataError(f"{path} has no column '{field}' (set data.text_field; its columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column '{field}' holds {kind}, not text (set data.text_field)")


def parquet_docs(path: str, field: str, skip: int = 0) -> Iterator[tuple[bool, str]]:
    """One document per row of the string column `field` (a null is an empty document), read one
    row group at a time; row groups wholly inside the first `skip` rows are only counted (yielded
    empty, not read)."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged or non-Parquet file
        raise DataError(f"{path} is not a readable Parquet file ({_first_line(e)})") from None
    _check_text_column(path, f.schema_arrow, field)
    row = 0
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if row + n <= skip:
            yield from ((True, "") for _ in range(n))
        else:
            try:
                column = f.read_row_group(g, columns=[field]).column(0)
            except Exception as e:
                raise DataError(f"{path}: row group {g} cannot be read ({_first_line(e)})") from None
            for text in column.to_pylist():
                yield True, text or ""
        row += n


def arrow_docs(path: str, field: str, skip: int = 0) -> Iterator[tuple[bool, str]]:
    """The same for an Arrow IPC file (the streaming format `save_to_disk` writes, or the file
    format), one record batch at a time."""
    import pyarrow as pa

    try:
        source = pa.memory_map(path)
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches)), reader.schema
        else:
            reader = iter(reader), reader.schema
    except Exception as e:
        raise DataError(f"{path} is not a readable Arrow file ({_first_line(e)})") from None
    batches, schema = reader
    _check_text_column(path, schema, field)
    index = schema.get_field_index(field)
    row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{path}: a record batch cannot be read ({_first_line(e)})") from None
        n = batch.num_rows
        if row + n <= skip:
            yield from ((True, "") for _ in range(n))
        else:
            for text in batch.column(index).to_pylist():
                yield True, text or ""
        row += n


def docs(path: str, field: str, skip: int = 0) -> Iterator[tuple[bool, str]]:
    """The documents of one Parquet or Arrow file, by its extension."""
    return (arrow_docs if path.endswith(".arrow") else parquet_docs)(path, field, skip)


def parse_hf(target: str) -> tuple[str, str | None]:
    """`PATH[:SPLIT]` -> (PATH, SPLIT or None)."""
    path, sep, split = target.rpartition(":")
    if sep and path and re.fullmatch(r"[A-Za-z0-9_.-]+", split) and not os.path.exists(target):
        return path, split
    return target, None


def _saved_files(folder: str) -> list[str]:
    """The data files of a `save_to_disk` folder of one dataset, in its order."""
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    return [os.path.join(folder, d["filename"]) for d in state.get("_data_files", [])]


def _split_of(rel: str, names) -> str | None:
    parts = rel.split(os.sep)
    for name in names:
        if name in parts[:-1] or re.match(rf"{re.escape(name)}[-_.]", parts[-1]):
            return name
    return None


def _layout(path: str) -> dict[str, list[str]]:
    """split -> its files, for any of the three layouts."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise DataError(f"hf:{path}: no such folder (a dataset saved with save_to_disk, or a folder of Parquet files)")
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            names = json.load(f).get("splits", [])
        return {n: _saved_files(os.path.join(path, n)) for n in names}
    if os.path.exists(os.path.join(path, "state.json")):
        return {"train": _saved_files(path)}
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.endswith(_EXTENSIONS) and os.path.isfile(f))
    if not files:
        raise DataError(f"hf:{path} holds no .parquet or .arrow files, and no save_to_disk dataset")
    names = ("train",) + VALID_SPLITS
    out: dict[str, list[str]] = {}
    for f in files:
        out.setdefault(_split_of(os.path.relpath(f, path), names) or "train", []).append(f)
    return out


def hf_files(target: str, split: str | None) -> list[str]:
    """The files of one split (default train) of an `hf:` source."""
    path, named = parse_hf(target)
    layout = _layout(path)
    split = split or named or "train"
    if split not in layout or not layout[split]:
        raise DataError(f"hf:{path} has no split '{split}' (its splits: {', '.join(layout) or 'none'})")
    return layout[split]


def hf_valid_split(target: str) -> str | None:
    """The split an `hf:` source read at train validates on, if it has one."""
    path, named = parse_hf(target)
    if named not in (None, "train"):
        return None
    layout = _layout(path)
    return next((n for n in VALID_SPLITS if layout.get(n)), None)


def hf_fingerprint_files(target: str) -> list[str]:
    """Every file of an `hf:` source that its documents come from (all splits)."""
    path, _ = parse_hf(target)
    return sorted({f for files in _layout(path).values() for f in files})
