"""TFDS sources: tfrecord data dirs read without TensorFlow, and data.tfds_download."""

import dataclasses
import shutil

import pytest
from conftest import shared_data

from jaxlm.config import DataConfig
from jaxlm.data import tfds as tfds_source
from jaxlm.data.tfds import read_tfds
from jaxlm.errors import DataError

TRAIN, VALID = 1_003_854, 55_770


@pytest.fixture
def no_tensorflow(monkeypatch):
    """Take the TF-free paths even where TensorFlow is installed."""
    monkeypatch.setattr(tfds_source, "_have_tensorflow", lambda: False)


@pytest.fixture
def tiny_shakespeare_builder_cls():
    import tensorflow_datasets as tfds

    return tfds.builder_cls("tiny_shakespeare")


def test_tfrecord_dir_reads_like_array_record_dir_without_tensorflow(no_tensorflow):
    text = shared_data("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    assert len(text) == TRAIN + 2 * VALID
    expected = {"train": text[:TRAIN], "validation": text[TRAIN:TRAIN + VALID], "test": text[-VALID:]}
    tfrecord_cfg = DataConfig(tfds_data_dir=str(shared_data("tensorflow_datasets")))
    array_record_cfg = dataclasses.replace(tfrecord_cfg, tfds_data_dir=str(shared_data("tensorflow_datasets_array_record")))
    for split, want in expected.items():
        from_tfrecord = read_tfds("tiny_shakespeare", split, tfrecord_cfg)
        from_array_record = read_tfds("tiny_shakespeare", split, array_record_cfg)
        assert from_tfrecord == from_array_record == [want], split


@pytest.mark.parametrize("keep", ["half", 6, 0])  # inside the data, inside the header, an empty shard
def test_truncated_tfrecord_shard_names_the_file(tmp_path, no_tensorflow, keep):
    shutil.copytree(shared_data("tensorflow_datasets/tiny_shakespeare"), tmp_path / "tiny_shakespeare")
    (shard,) = (tmp_path / "tiny_shakespeare").glob("*/tiny_shakespeare-train.tfrecord-*")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2 if keep == "half" else keep)
    cfg = DataConfig(tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match=str(shard)):
        read_tfds("tiny_shakespeare", "train", cfg)
    assert [len(d) for d in read_tfds("tiny_shakespeare", "validation", cfg)] == [VALID]  # other shards still read


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError, match=r"TFDS_DATA_DIR.*data\.tfds_download=true.*--file_format array_record"):
        read_tfds("tiny_shakespeare", "train", DataConfig(tfds_data_dir=str(tmp_path)))


def test_download_without_tensorflow_asks_for_the_prepare_extra(tmp_path, no_tensorflow, monkeypatch,
                                                                  tiny_shakespeare_builder_cls):
    def must_not_run(self, **kwargs):
        raise AssertionError("download_and_prepare ran without TensorFlow")

    monkeypatch.setattr(tiny_shakespeare_builder_cls, "download_and_prepare", must_not_run)
    cfg = DataConfig(tfds_data_dir=str(tmp_path), tfds_download=True)
    with pytest.raises(DataError, match=r'needs TensorFlow: pip install -e "\.\[prepare\]"'):
        read_tfds("tiny_shakespeare", "train", cfg)


def test_failed_download_names_data_dir_and_tfds_build(tmp_path, monkeypatch, tiny_shakespeare_builder_cls):
    formats = []

    def offline(self, *, file_format=None, **kwargs):
        formats.append(file_format)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tfds_source, "_have_tensorflow", lambda: True)
    monkeypatch.setattr(tiny_shakespeare_builder_cls, "download_and_prepare", offline)
    cfg = DataConfig(tfds_data_dir=str(tmp_path), tfds_download=True)
    with pytest.raises(DataError) as err:
        read_tfds("tiny_shakespeare", "train", cfg)
    msg = str(err.value)
    for part in ("'tiny_shakespeare'", str(tmp_path), "TFDS_DATA_DIR", "OSError: Network is unreachable",
                 "`tfds build tiny_shakespeare --data_dir DIR --file_format array_record`"):
        assert part in msg
    assert formats == ["array_record"]


def test_download_then_reads_the_prepared_dataset(tmp_path, monkeypatch, tiny_shakespeare_builder_cls):
    prepared = shared_data("tensorflow_datasets_array_record/tiny_shakespeare")

    def copy_prepared(self, **kwargs):  # stands in for the network
        shutil.copytree(prepared, tmp_path / "tiny_shakespeare")

    monkeypatch.setattr(tfds_source, "_have_tensorflow", lambda: True)
    monkeypatch.setattr(tiny_shakespeare_builder_cls, "download_and_prepare", copy_prepared)
    docs = read_tfds("tiny_shakespeare", "validation", DataConfig(tfds_data_dir=str(tmp_path), tfds_download=True))
    assert [len(d) for d in docs] == [VALID]
