"""Text sources -> lists of documents (numpy/python only, no jax).

`tfds:NAME[/CONFIG][:SPLIT]` reads a prepared TFDS dataset (array_record data dirs through
`tfds.data_source`, which needs no TensorFlow; tfrecord dirs through `tfds.load`, which
does). `text:GLOB` reads UTF-8 files, one document per file. `jsonl:GLOB` reads one
document per line from the field `data.text_field`. Invalid UTF-8 is an error unless
`data.invalid_utf8=replace`, which replaces it with U+FFFD and logs how often.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass

from jaxlm.config import DataConfig
from jaxlm.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # tfds | text | jsonl
    target: str  # dataset name (with /config) or glob
    split: str | None = None


def parse_source(spec: str) -> SourceSpec:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("tfds", "text", "jsonl") or not rest:
        raise DataError(f"data source '{spec}' must look like tfds:NAME[/CONFIG][:SPLIT], text:GLOB or jsonl:GLOB")
    if kind == "tfds":
        name, _, split = rest.partition(":")
        return SourceSpec(kind, name, split or None)
    return SourceSpec(kind, rest)


def _tfds_dir(cfg: DataConfig) -> str | None:
    return cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or None


def read_tfds(name: str, split: str, cfg: DataConfig) -> list[str]:
    import tensorflow_datasets as tfds

    data_dir = _tfds_dir(cfg)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, bad config
        raise DataError(f"TFDS dataset '{name}' is not known to tensorflow-datasets: {e}") from None
    if not builder.is_prepared():
        where = data_dir or "TFDS's default data dir (~/tensorflow_datasets)"
        raise DataError(
            f"TFDS dataset '{name}' is not prepared in {where}. Point TFDS_DATA_DIR (or data.tfds_data_dir) "
            f"at a data dir that holds it, or prepare it on a machine with internet with "
            f"`tfds build {name} --data_dir DIR` (array_record format needs no TensorFlow to read)")
    if split not in builder.info.splits:
        raise DataError(f"TFDS dataset '{name}' has no split '{split}'; it has {', '.join(builder.info.splits)}")
    feature = cfg.text_field
    if feature not in builder.info.features:
        raise DataError(f"TFDS dataset '{name}' has no feature '{feature}'; set data.text_field to one of "
                        f"{', '.join(builder.info.features)}")
    if getattr(builder.info.file_format, "value", builder.info.file_format) == "array_record":
        records = builder.as_data_source(split=split)
        examples = (records[i] for i in range(len(records)))
    else:
        if importlib.util.find_spec("tensorflow") is None:
            raise DataError(f"TFDS dataset '{name}' in {builder.data_dir} is in tfrecord format, which needs "
                            f"TensorFlow to read: pip install tensorflow-cpu, or use an array_record data dir")
        examples = tfds.as_numpy(builder.as_dataset(split=split))
    out = []
    for ex in examples:
        text = ex[feature]
        out.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return out


def _files(pattern: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataError(f"no files match '{pattern}'")
    return files


def decode(raw: bytes, where: str, invalid_utf8: str = "error") -> str:
    """UTF-8 text; invalid bytes raise DataError, or with invalid_utf8='replace' become U+FFFD and are counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if invalid_utf8 != "replace":
            raise DataError(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start}); fix the file or set "
                            f"data.invalid_utf8=replace to replace invalid bytes with U+FFFD") from None
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
    logger.warning("%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD", where, replaced)
    return text


def read_text(pattern: str, invalid_utf8: str = "error") -> list[str]:
    docs = []
    for path in _files(pattern):
        with open(path, "rb") as f:
            docs.append(decode(f.read(), path, invalid_utf8))
    return docs


def read_jsonl(pattern: str, field: str, invalid_utf8: str = "error") -> list[str]:
    docs = []
    for path in _files(pattern):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = decode(raw, f"{path}:{lineno}", invalid_utf8)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or field not in record:
                    raise DataError(f"{path}:{lineno} has no field '{field}' (set data.text_field)")
                docs.append(str(record[field]))
    return docs


def read(spec: SourceSpec, cfg: DataConfig, split: str | None = None) -> list[str]:
    if spec.kind == "tfds":
        return read_tfds(spec.target, split or spec.split or "train", cfg)
    if spec.kind == "text":
        return read_text(spec.target, cfg.invalid_utf8)
    return read_jsonl(spec.target, cfg.text_field, cfg.invalid_utf8)


def _hold_out(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Whole documents for validation; a single document is cut once at a paragraph break."""
    if len(docs) >= 2:
        n_valid = max(1, round(len(docs) * fraction))
        return docs[:-n_valid], docs[-n_valid:]
    text = docs[0]
    cut = int(len(text) * (1 - fraction))
    brk = text.rfind("\n\n", 0, cut)
    cut = brk + 2 if brk > 0 else cut
    return [text[:cut]], [text[cut:]]


def load_splits(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train documents, validation documents), both non-empty."""
    spec = parse_source(cfg.source)
    train = read(spec, cfg)
    if cfg.valid_source:
        valid = read(parse_source(cfg.valid_source), cfg, split=None)
    elif spec.kind == "tfds" and spec.split in (None, "train"):
        import tensorflow_datasets as tfds

        splits = tfds.builder(spec.target, data_dir=_tfds_dir(cfg)).info.splits
        name = next((s for s in ("validation", "valid", "test") if s in splits), None)
        valid = read(spec, cfg, split=name) if name else None
        if valid is None:
            train, valid = _hold_out(train, cfg.valid_fraction)
    else:
        train, valid = _hold_out(train, cfg.valid_fraction)
    train = [d for d in train if d]
    valid = [d for d in valid if d]
    if not train:
        raise DataError(f"data source '{cfg.source}' holds no text")
    if not valid:
        raise DataError(f"the validation split of '{cfg.valid_source or cfg.source}' holds no text")
    return train, valid


def fingerprint(cfg: DataConfig) -> str:
    """A hash of what the splits are read from, computed without reading the text.

    Files count by path, size and modification time; a TFDS dataset by its prepared
    version directory's file names and sizes. Any change to a source changes the hash.
    """
    h = hashlib.sha256()
    h.update(json.dumps([cfg.source, cfg.valid_source, cfg.valid_fraction, cfg.text_field]).encode())
    for source in filter(None, (cfg.source, cfg.valid_source)):
        spec = parse_source(source)
        if spec.kind == "tfds":
            import tensorflow_datasets as tfds

            builder = tfds.builder(spec.target, data_dir=_tfds_dir(cfg))
            root = str(builder.data_dir)
            files = sorted(os.listdir(root)) if os.path.isdir(root) else []
            h.update(json.dumps([root] + [(f, os.path.getsize(os.path.join(root, f))) for f in files]).encode())
        else:
            for path in _files(spec.target):
                st = os.stat(path)
                h.update(json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()
