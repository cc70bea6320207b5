import numpy as np
import pytest

from jaxlm.config import DataConfig
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

    cfg = DataConfig(source=source, cache_dir=str(cache_dir), tokenizer_vocab=vocab)
    (part,), _, _ = cache.parts(cfg)
    logs = []
    tok = cache.get_tokenizer(cfg, [part], logs.append)
    train, manifest = cache.tokens(cfg, tok, part, "train", logs.append)
    return np.array(train), manifest, logs, part


def test_token_cache_is_built_once_and_reused(small_corpus, tmp_path):
    first, manifest, logs, _ = _cache_run(small_corpus, tmp_path / "c")
    assert any(m.startswith("token cache: built train") for m in logs)
    again, manifest2, logs2, part = _cache_run(small_corpus, tmp_path / "c")
    assert any(m.startswith("token cache: reusing train") for m in logs2) and not any(m.startswith("token cache: built") for m in logs2)
    assert part._docs is None  # the source text was not even read
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


def test_encoding_in_pieces_gives_the_ids_of_whole_documents():
    from jaxlm.data.cache import encode_documents, splits_at_spaces

    docs = [shared_data("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:300_000],
            shared_data("wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")[:300_000],
            shared_data("gutenberg-en/valid.txt").read_text(encoding="utf-8")[:300_000],
            "  leading spaces,\ttabs,   runs of   spaces\n \n and ünïcödé ✓ " * 50]
    tok = train_tokenizer(docs, vocab_size=1000)
    assert splits_at_spaces(tok) and not splits_at_spaces(train_tokenizer(docs, 1000, model_type="unigram"))
    pieces = np.concatenate([ids for ids, _, _ in encode_documents(tok, docs, piece_chars=97)])
    whole = np.concatenate([ids for ids, _, _ in encode_documents(tok, docs, piece_chars=None)])
    expected = [i for d in docs for i in [EOS_ID] + tok.sp.encode(d)]
    assert whole.tolist() == expected and pieces.dtype == np.uint16
    np.testing.assert_array_equal(pieces, whole)


def test_tokenizers_that_merge_across_spaces_encode_whole_documents():
    import io

    import sentencepiece as spm

    from jaxlm.data.cache import encode_documents, splits_at_spaces
    from jaxlm.data.tokenizer import Tokenizer

    text = ["the cat sat on the mat and the dog sat on the log " * 40]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=model, vocab_size=18,
                                   add_dummy_prefix=True, minloglevel=2)
    tok = Tokenizer(model.getvalue())
    assert not splits_at_spaces(tok)
    (ids, n_bytes, _), = encode_documents(tok, text, piece_chars=10)
    assert ids.tolist() == [tok.eos_id] + tok.sp.encode(text[0]) and n_bytes == len(text[0])


def test_mixtures_separators_and_a_separate_validation_source(tmp_path):
    from jaxlm.data import cache
    from jaxlm.data.sources import parse_mixture

    assert parse_mixture("text:a.txt") == [("text:a.txt", 1.0)]
    assert parse_mixture(" text:a/*.txt@3 ; jsonl:b@x.jsonl ;text:c@0.5") == [
        ("text:a/*.txt", 3.0), ("jsonl:b@x.jsonl", 1.0), ("text:c", 0.5)]
    for bad, msg in [("text:a@0", "must be > 0"), ("text:a;text:a@2", "names a source twice"), (" ; ", "empty"),
                     ("text:a;web:b", "must look like")]:
        with pytest.raises(DataError, match=msg):
            parse_mixture(bad)
    (tmp_path / "books.txt").write_text("book one\n\n\n\nbook two\n\n\n\nbook three")
    (tmp_path / "notes.txt").write_text("a note")
    (tmp_path / "held.txt").write_text("held out text")
    cfg = DataConfig(source=f"text:{tmp_path}/books.txt@2; text:{tmp_path}/notes.txt",
                     valid_source=f"text:{tmp_path}/held.txt", doc_separator="\n\n\n\n")
    train, weights, valid = cache.parts(cfg)
    assert [p.docs for p in train] == [(["book one", "book two", "book three"], []), (["a note"], [])]
    assert weights == [2.0, 1.0] and [p.docs for p in valid] == [([], ["held out text"])]
    # without a validation source each source holds out its own whole documents
    train, _, valid = cache.parts(DataConfig(source=cfg.source, doc_separator="\n\n\n\n", valid_fraction=0.4))
    assert train[0].docs == (["book one", "book two"], ["book three"]) and valid is train
    fps = {p.fingerprint for p in train} | {cache.Part(cfg, cfg.source.split(";")[0].split("@")[0]).fingerprint}
    assert len(fps) == 3  # sources and roles differ, so do their cache entries


@pytest.mark.slow
def test_books_experiment_builds_its_cache_at_5_mb_per_s_then_reuses_it(tmp_path):
    import pathlib
    import re
    import time

    from jaxlm.config import load_config
    from jaxlm.train import prepare_data

    books = shared_data("gutenberg-en")
    exp = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "books.yaml"
    cfg = load_config(str(exp), [f"data.source=text:{books}/train_*.txt", f"data.valid_source=text:{books}/valid.txt",
                                 f"data.cache_dir={tmp_path}"])
    logs = []
    data = prepare_data(cfg, log=logs.append)
    built = [m for m in logs if m.startswith("token cache: built train")]
    assert built and "125 train / 10 valid documents" in logs[-1], logs
    rate = float(re.search(r"\(([\d.]+) MB/s of text\)", built[0]).group(1))
    print(f"books: train cache built at {rate} MB/s; {logs[-1]}")
    assert rate >= 5.0
    assert data.train_bytes == sum((books / f"train_{i:02d}.txt").stat().st_size for i in range(5)) - 120 * 4
    t0 = time.perf_counter()
    again = prepare_data(cfg, log=logs.append)
    assert time.perf_counter() - t0 < 2.0 and "token cache: reusing train" in logs[-3]
    np.testing.assert_array_equal(again.train_streams[0][-1000:], data.train_streams[0][-1000:])
