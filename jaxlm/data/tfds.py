"""TFDS sources (`tfds:NAME[/CONFIG][:SPLIT]`): a prepared dataset's split as a list of texts.

Array_record data dirs go through `builder.as_data_source`; tfrecord data dirs through
`builder.as_dataset` when TensorFlow is installed, else through the pure-Python reader in
`jaxlm.data.tfrecord` with each record decoded by TFDS's own TF-free
`features.deserialize_example_np` (the same parser `as_data_source` uses). A dataset that
is not prepared is an error, unless `data.tfds_download=true`, which runs TFDS's
`download_and_prepare` (array_record format; needs network and TensorFlow).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
import os
from collections.abc import Iterator

from jaxlm.config import DataConfig
from jaxlm.data import tfrecord
from jaxlm.errors import DataError

logger = logging.getLogger(__name__)


def _tfds_dir(cfg: DataConfig) -> str | None:
    return cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, bad config
        raise DataError(f"TFDS dataset '{name}' is not known to tensorflow-datasets: {e}") from None


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
    builder = _builder(name, data_dir)
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


def valid_split(cfg: DataConfig, name: str) -> str | None:
    """The split of a TFDS dataset that validates: validation, valid or test, if it has one."""
    import tensorflow_datasets as tfds

    splits = tfds.builder(name, data_dir=_tfds_dir(cfg)).info.splits
    return next((s for s in ("validation", "valid", "test") if s in splits), None)


def prepared_files(cfg: DataConfig, name: str) -> list:
    """[version directory, (file, size), ...] of a dataset as prepared: what its fingerprint covers."""
    root = str(_builder(name, _tfds_dir(cfg)).data_dir)
    files = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return [root] + [(f, os.path.getsize(os.path.join(root, f))) for f in files]
