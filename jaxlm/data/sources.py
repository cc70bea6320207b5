"""Text sources -> lists of documents (numpy/python only, no jax).

`tfds:NAME[/CONFIG][:SPLIT]` reads a prepared TFDS dataset. Array_record data dirs go
through `builder.as_data_source`; tfrecord data dirs through `builder.as_dataset` when
TensorFlow is installed, else through the pure-Python reader in `jaxlm.data.tfrecord`
with each record decoded by TFDS's own TF-free `features.deserialize_example_np` (the
same parser `as_data_source` uses). A dataset that is not prepared is an error, unless
`data.tfds_download=true`, which runs TFDS's `download_and_prepare` (array_record
format; needs network and TensorFlow). `text:GLOB` reads UTF-8 files, one document per
file. `jsonl:GLOB` reads one document per line from the field `data.text_field`. Invalid
UTF-8 is an error unless `data.invalid_utf8=replace`, which replaces it with U+FFFD and
logs how often.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import inspect
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from jaxlm.config import DataConfig
from jaxlm.data import tfrecord
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


def _tfds_dir(cfg: DataConfig) -> str | None:
    return cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _have_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _prepare_tfds(builder, name: str, data_dir: str | None) -> None:
    """Download and prepare a TFDS dataset (array_record where TFDS can choose the format)."""
    where = data_dir or "TFDS's default data dir (~/tensorflow_datasets)"
    if not _have_tensorflow():
        raise DataError(f"TFDS dataset '{name}' is not prepared in {where}, and preparing it "
                        f"(data.tfds_download=true) needs TensorFlow: pip install -e \".[prepare]\"")
    kwargs = {}
    if "file_format" in inspect.signature(builder.download_and_prepare).parameters:
        kwargs["file_format"] = "array_record"  # later reads then need no TensorFlow
    logger.info("preparing TFDS dataset %s in %s", name, where)
    try:
        builder.download_and_prepare(**kwargs)
    except Exception as e:  # no network, a moved URL, a full disk ...
        raise DataError(
            f"could not download and prepare TFDS dataset '{name}' in {where}: {type(e).__name__}: {e}. "
            f"Prepare it on a machine with internet with `tfds build {name} --data_dir DIR --file_format "
            f"array_record`, copy DIR here and point TFDS_DATA_DIR (or data.tfds_data_dir) at it") from None


def _tfrecord_examples(builder, split: str) -> Iterator[dict]:
    """The examples of a tfrecord split without TensorFlow: shard files read in pure Python,
    records decoded by TFDS's numpy example parser."""
    features = builder.info.features
    for fi in builder.info.splits[split].file_instructions:
        count = 0
        for record in itertools.islice(tfrecord.read_records(fi.filename), fi.skip, fi.skip + fi.take):
            count += 1
            yield features.deserialize_example_np(record)
        if count < fi.take:
            raise DataError(f"TFRecord file {fi.filename} holds {fi.skip + count} records, but the dataset "
                            f"info of '{builder.name}' says it has at least {fi.skip + fi.take}")


def read_tfds(name: str, split: str, cfg: DataConfig) -> list[str]:
    import tensorflow_datasets as tfds

    data_dir = _tfds_dir(cfg)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, bad config
        raise DataError(f"TFDS dataset '{name}' is not known to tensorflow-datasets: {e}") from None
    if not builder.is_prepared():
        if cfg.tfds_download:
            _prepare_tfds(builder, name, data_dir)
            builder = tfds.builder(name, data_dir=data_dir)  # the dataset info as prepared
            if not builder.is_prepared():
                raise DataError(f"TFDS dataset '{name}' is still not prepared in {builder.data_dir} after "
                                f"download_and_prepare")
        else:
            where = data_dir or "TFDS's default data dir (~/tensorflow_datasets)"
            raise DataError(
                f"TFDS dataset '{name}' is not prepared in {where}. Point TFDS_DATA_DIR (or data.tfds_data_dir) "
                f"at a data dir that holds it, set data.tfds_download=true to download and prepare it here "
                f"(needs network and TensorFlow), or prepare it on a machine with internet with "
                f"`tfds build {name} --data_dir DIR --file_format array_record` (needs no TensorFlow to read)")
    if split not in builder.info.splits:
        raise DataError(f"TFDS dataset '{name}' has no split '{split}'; it has {', '.join(builder.info.splits)}")
    feature = cfg.text_field
    if feature not in builder.info.features:
        raise DataError(f"TFDS dataset '{name}' has no feature '{feature}'; set data.text_field to one of "
                        f"{', '.join(builder.info.features)}")
    if getattr(builder.info.file_format, "value", builder.info.file_format) == "array_record":
        records = builder.as_data_source(split=split)
        examples = (records[i] for i in range(len(records)))
    elif _have_tensorflow():
        examples = tfds.as_numpy(builder.as_dataset(split=split))
    else:
        examples = _tfrecord_examples(builder, split)
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


def read_text(pattern: str, invalid_utf8: str = "error", separator: str = "") -> list[str]:
    """One document per file, or per `separator`-delimited part of each file."""
    docs = []
    for path in _files(pattern):
        with open(path, "rb") as f:
            text = decode(f.read(), path, invalid_utf8)
        docs.extend(text.split(separator) if separator else [text])
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
        return read_text(spec.target, cfg.invalid_utf8, cfg.doc_separator)
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


def _valid_split(cfg: DataConfig, name: str) -> str | None:
    import tensorflow_datasets as tfds

    splits = tfds.builder(name, data_dir=_tfds_dir(cfg)).info.splits
    return next((s for s in ("validation", "valid", "test") if s in splits), None)


def load_splits(cfg: DataConfig, source: str | None = None, role: str = "both") -> tuple[list[str], list[str]]:
    """(train documents, validation documents) of one source (default: data.source).

    role "both": validation is the TFDS validation split (if the source is a TFDS train
    split that has one) or a held-out fraction of whole documents; "train": all of it
    trains; "valid": all of it validates (a TFDS source without a split reads its
    validation split).
    """
    source = source or cfg.source
    spec = parse_source(source)
    if role == "valid":
        split = spec.split or (_valid_split(cfg, spec.target) if spec.kind == "tfds" else None)
        train, valid = [], read(spec, cfg, split=split)
    else:
        train = read(spec, cfg)
        valid = []
        if role == "both":
            name = _valid_split(cfg, spec.target) if spec.kind == "tfds" and spec.split in (None, "train") else None
            if name:
                valid = read(spec, cfg, split=name)
            else:
                train, valid = _hold_out(train, cfg.valid_fraction)
    train = [d for d in train if d]
    valid = [d for d in valid if d]
    if role != "valid" and not train:
        raise DataError(f"data source '{source}' holds no text")
    if role != "train" and not valid:
        raise DataError(f"the validation split of '{source}' holds no text")
    return train, valid


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
    spec = parse_source(source)
    if spec.kind == "tfds":
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(spec.target, data_dir=_tfds_dir(cfg))
        except Exception as e:  # unknown name, bad config
            raise DataError(f"TFDS dataset '{spec.target}' is not known to tensorflow-datasets: {e}") from None
        root = str(builder.data_dir)
        files = sorted(os.listdir(root)) if os.path.isdir(root) else []
        h.update(json.dumps([root] + [(f, os.path.getsize(os.path.join(root, f))) for f in files]).encode())
    else:
        for path in _files(spec.target):
            st = os.stat(path)
            h.update(json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()
