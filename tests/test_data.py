import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data.loader import TrainBatches, eval_batches, token_stream
from jaxlm.data.sources import load_splits, parse_source, read_tfds
from jaxlm.data.tokenizer import EOS_ID, PAD_ID, load_tokenizer, train_tokenizer
from jaxlm.errors import DataError

from conftest import shared_data


def test_tokenizer_is_lossless_with_fixed_special_ids(tmp_path):
    docs = ["To be, or not to be:\n\nthat is the question.\n  Whether 'tis nobler — in the mind 42", "x" * 50]
    tok = train_tokenizer(docs * 20, vocab_size=300)
    assert tok.vocab_size == 300 and tok.eos_id == EOS_ID and tok.sp.pad_id() == PAD_ID
    weird = "Ünïcödé ✓ and tabs\tand\n\nnewlines  "
    for text in docs + [weird]:
        assert tok.decode(tok.encode([text])[0]) == text
    tok.save(str(tmp_path / "t.model"))
    assert load_tokenizer(str(tmp_path / "t.model")).sha256 == tok.sha256


def test_bad_tokenizer_file(tmp_path):
    p = tmp_path / "bad.model"
    p.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        load_tokenizer(str(p))
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))


def test_batches_are_a_function_of_seed_and_step_for_any_process_count():
    tokens = np.arange(10_000, dtype=np.uint16)
    for step in range(50):
        full = TrainBatches(tokens, 8, 16, seed=3).batch_at(step)
        for procs in (2, 4):
            parts = [TrainBatches(tokens, 8, 16, seed=3, process_index=i, process_count=procs).batch_at(step)
                     for i in range(procs)]
            np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), full["inputs"])
    a, b = TrainBatches(tokens, 8, 16, seed=3), TrainBatches(tokens, 8, 16, seed=4)
    assert not np.array_equal(a.batch_at(0)["inputs"], b.batch_at(0)["inputs"])
    np.testing.assert_array_equal(a.batch_at(7)["targets"][:, :-1], a.batch_at(7)["inputs"][:, 1:])


def test_eval_batches_score_every_token_exactly_once():
    tokens = np.arange(1, 1000, dtype=np.uint16)  # 998 targets: not a multiple of 32*3
    seen = []
    for b in eval_batches(tokens, batch_size=3, seq_len=32):
        assert b["inputs"].shape == (3, 32)
        seen.extend(b["targets"][b["mask"] == 1].tolist())
    assert sorted(seen) == list(range(2, 1000))


def test_token_stream_starts_each_document_with_eos():
    s = token_stream([[5, 6], [7]], EOS_ID)
    assert s.tolist() == [EOS_ID, 5, 6, EOS_ID, 7] and s.dtype == np.uint16


def test_text_source_holds_out_whole_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("para one.\n\npara two.\n\npara three.\n\npara four.\n")
    train, valid = load_splits(DataConfig(source=f"text:{tmp_path}/a.txt", valid_fraction=0.3))
    assert "".join(train) + "".join(valid) == (tmp_path / "a.txt").read_text()
    assert valid[0].startswith("para")


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="must look like"):
        parse_source("shakespeare.txt")
    with pytest.raises(DataError, match="no files match"):
        load_splits(DataConfig(source=f"text:{tmp_path}/none*.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        load_splits(DataConfig(source=f"text:{tmp_path}/empty.txt"))


@pytest.mark.parametrize("split,length", [("train", 1_003_854), ("validation", 55_770)])
def test_tfds_tiny_shakespeare_array_record(split, length):
    data_dir = shared_data("tensorflow_datasets_array_record")
    docs = read_tfds("tiny_shakespeare", split, DataConfig(tfds_data_dir=str(data_dir)))
    assert len(docs) == 1 and len(docs[0]) == length


def test_missing_tfds_dataset_names_data_dir(tmp_path):
    with pytest.raises(DataError, match="TFDS_DATA_DIR"):
        read_tfds("tiny_shakespeare", "train", DataConfig(tfds_data_dir=str(tmp_path)))


def _cache_run(source: str, cache_dir, vocab: int = 300):
    from jaxlm.data import cache
    from jaxlm.data.sources import fingerprint

    cfg = DataConfig(source=source, cache_dir=str(cache_dir), tokenizer_vocab=vocab)
    fp = fingerprint(cfg)
    splits = cache.Splits(cfg)
    logs = []
    tok = cache.get_tokenizer(cfg, fp, splits, logs.append)
    train, manifest = cache.tokens(cfg, tok, fp, "train", splits, logs.append)
    return np.array(train), manifest, logs, splits


def test_token_cache_is_built_once_and_reused(small_corpus, tmp_path):
    first, manifest, logs, _ = _cache_run(small_corpus, tmp_path / "c")
    assert any(m.startswith("token cache: built train") for m in logs)
    again, manifest2, logs2, splits = _cache_run(small_corpus, tmp_path / "c")
    assert any(m.startswith("token cache: reusing train") for m in logs2) and not any(m.startswith("token cache: built") for m in logs2)
    assert splits._docs is None  # the source text was not even read
    np.testing.assert_array_equal(first, again)
    assert manifest == manifest2 and manifest["tokens"] == len(first) and manifest["documents"] == 5
    assert manifest["bytes"] > 0 and manifest["dtype"] == "uint16"


def test_token_cache_rebuilds_when_tokenizer_or_source_changes(small_corpus, tmp_path):
    first, m1, _, _ = _cache_run(small_corpus, tmp_path / "c", vocab=300)
    other, m2, logs, _ = _cache_run(small_corpus, tmp_path / "c", vocab=400)
    assert any(m.startswith("token cache: built train") for m in logs) and m1["tokenizer_sha256"] != m2["tokenizer_sha256"]
    doc = tmp_path / "doc0.txt"
    doc.write_text(doc.read_text() + "an added line.\n")
    _, m3, logs, _ = _cache_run(small_corpus, tmp_path / "c", vocab=300)
    assert any(m.startswith("token cache: built train") for m in logs) and m3["source_fingerprint"] != m1["source_fingerprint"]


def test_interrupted_or_damaged_cache_is_never_used(small_corpus, tmp_path):
    import os

    first, _, _, _ = _cache_run(small_corpus, tmp_path / "c")
    root = tmp_path / "c" / "tokens"
    (entry,) = [p for p in root.iterdir() if ".tmp-" not in p.name]
    # a build killed halfway: only a temporary directory, never renamed into place
    os.rename(entry, str(entry) + ".tmp-dead")
    (tmp_path / "c" / "tokens" / (entry.name + ".tmp-dead") / "tokens.bin").write_bytes(b"\0" * 10)
    again, _, logs, _ = _cache_run(small_corpus, tmp_path / "c")
    assert any(m.startswith("token cache: built train") for m in logs)
    assert not any(".tmp-" in p.name for p in root.iterdir())  # the leftover was removed
    np.testing.assert_array_equal(first, again)
    # a truncated token file does not match its manifest and is rebuilt
    with open(entry / "tokens.bin", "r+b") as f:
        f.truncate(100)
    third, _, logs, _ = _cache_run(small_corpus, tmp_path / "c")
    assert any("does not match its manifest" in m for m in logs)
    np.testing.assert_array_equal(first, third)


def test_tfrecord_dir_without_tensorflow_says_how_to_read_it():
    import importlib.util

    data_dir = shared_data("tensorflow_datasets")
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: the tfrecord dir is readable")
    with pytest.raises(DataError, match="needs TensorFlow to read: pip install tensorflow-cpu"):
        read_tfds("tiny_shakespeare", "train", DataConfig(tfds_data_dir=str(data_dir)))


def test_invalid_utf8_is_rejected_or_replaced_and_counted(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe and \xc3 more \xef\xbf\xbd kept")
    with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8 .*data.invalid_utf8=replace"):
        load_splits(DataConfig(source=f"text:{tmp_path}/bad.txt"))
    from jaxlm.data.sources import read_text

    with caplog.at_level("WARNING"):
        (doc,) = read_text(f"{tmp_path}/bad.txt", invalid_utf8="replace")
    assert doc.count("\ufffd") == 4  # three replaced sequences plus one genuine U+FFFD
    assert "replaced 3 invalid UTF-8 sequence(s)" in caplog.text


def test_jsonl_source_and_its_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n{"text": "third"}\n')
    train, valid = load_splits(DataConfig(source=f"jsonl:{good}", valid_fraction=0.3))
    assert train == ["first doc", "second doc"] and valid == ["third"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"b.jsonl:2 is not valid JSON"):
        load_splits(DataConfig(source=f"jsonl:{tmp_path}/b.jsonl"))
    (tmp_path / "c.jsonl").write_text('{"body": "no text field"}\n{"body": "another"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1 has no field 'text' \(set data.text_field\)"):
        load_splits(DataConfig(source=f"jsonl:{tmp_path}/c.jsonl"))
    train, valid = load_splits(DataConfig(source=f"jsonl:{tmp_path}/c.jsonl", text_field="body"))
    assert train == ["no text field"] and valid == ["another"]
