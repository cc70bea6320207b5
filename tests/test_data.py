import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data.sources import parse_source
from jaxlm.data.tfds import read_tfds
from jaxlm.data.tokenizer import EOS_ID, PAD_ID, load_tokenizer, train_tokenizer
from jaxlm.errors import DataError

from conftest import shared_data, write_corpus
from helpers import load_splits, write_fineweb_parquet


@pytest.fixture
def small_corpus(tmp_path):
    """Per test here, unlike the session's shared one: these tests change their corpus and its cache."""
    return write_corpus(tmp_path)


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
    assert part._docs is None and not part.splits._scans  # the source text was not even read
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


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_interrupted_or_damaged_cache_is_never_used(small_corpus, tmp_path):
    import os

    from jaxlm.data.tokenizer import host_name

    first, _, _, _ = _cache_run(small_corpus, tmp_path / "c")
    root = tmp_path / "c" / "tokens"
    (entry,) = [p for p in root.iterdir() if ".tmp-" not in p.name]
    # a build killed halfway on this host: only a temporary directory, never renamed into place
    dead = f"{entry}.tmp-{host_name()}-{_dead_pid()}-0123abcd"
    os.rename(entry, dead)
    (root / os.path.basename(dead) / "tokens.bin").write_bytes(b"\0" * 10)
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


def _read_text(path: str, invalid_utf8: str = "error") -> list[str]:
    """The file as one whole document, decoded block by block as text sources are."""
    from jaxlm.data import sources

    return ["".join(sources.text_chunks(path, invalid_utf8))]


@pytest.mark.parametrize("block", [1 << 20, 3])  # files are decoded in blocks: also blocks that cut characters
def test_invalid_utf8_is_rejected_or_replaced_and_counted(tmp_path, caplog, monkeypatch, block):
    from jaxlm.data import sources

    monkeypatch.setattr(sources, "_BLOCK_BYTES", block)
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe and \xc3 more \xef\xbf\xbd kept")
    with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8 \(invalid start byte at byte 10\).*"
                                        r"data.invalid_utf8=replace"):
        load_splits(DataConfig(source=f"text:{tmp_path}/bad.txt"))
    (tmp_path / "cut.txt").write_bytes("ünï ✓".encode() + b"\xe2\x9c")  # a character cut off at the end
    with pytest.raises(DataError, match=r"cut.txt is not valid UTF-8 \(unexpected end of data at byte 9\)"):
        _read_text(f"{tmp_path}/cut.txt")
    with caplog.at_level("WARNING"):
        (doc,) = _read_text(f"{tmp_path}/bad.txt", invalid_utf8="replace")
    assert doc == (tmp_path / "bad.txt").read_bytes().decode("utf-8", errors="replace")
    assert doc.count("\ufffd") == 4  # three replaced sequences plus one genuine U+FFFD
    assert caplog.text.count("replaced 3 invalid UTF-8 sequence(s)") == 1


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


def _stream(docs: list[str]):
    """Whole documents as a document stream."""
    return ((True, d) for d in docs)


def test_encoding_in_pieces_gives_the_ids_of_whole_documents():
    from jaxlm.data.build import encode_stream

    docs = [shared_data("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:300_000],
            shared_data("wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")[:300_000],
            shared_data("gutenberg-en/valid.txt").read_text(encoding="utf-8")[:300_000],
            "  leading spaces,\ttabs,   runs of   spaces\n \n and ünïcödé ✓ " * 50]
    tok = train_tokenizer(docs, vocab_size=1000)
    assert tok.splits_at_spaces and not train_tokenizer(docs, 1000, model_type="unigram").splits_at_spaces
    pieces = np.concatenate([ids for ids, _, _ in encode_stream(tok, _stream(docs), piece_chars=97)])
    whole = np.concatenate([ids for ids, _, _ in encode_stream(tok, _stream(docs), piece_chars=None)])
    expected = [i for d in docs for i in [EOS_ID] + tok.sp.encode(d)]
    assert whole.tolist() == expected and pieces.dtype == np.uint16
    np.testing.assert_array_equal(pieces, whole)


def test_tokenizers_that_merge_across_spaces_encode_whole_documents():
    import io

    import sentencepiece as spm

    from jaxlm.data.build import encode_stream
    from jaxlm.data.tokenizer import Tokenizer

    text = ["the cat sat on the mat and the dog sat on the log " * 40]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=model, vocab_size=18,
                                   add_dummy_prefix=True, minloglevel=2)
    tok = Tokenizer(model.getvalue())
    assert not tok.splits_at_spaces
    (ids, n_bytes, _), = encode_stream(tok, _stream(text), piece_chars=10)
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
def test_books_experiment_builds_its_cache_then_reuses_it(tmp_path):
    """The build rate is printed, not asserted (tools/bench_cache.py measures it); reuse is checked by
    what it logs and returns, and as a ratio to the build measured in the same test."""
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
    t0 = time.perf_counter()
    data = prepare_data(cfg, log=logs.append)
    build_s = time.perf_counter() - t0
    built = [m for m in logs if m.startswith("token cache: built train")]
    assert built and "125 train / 10 valid documents" in logs[-1], logs
    rate = float(re.search(r"\(([\d.]+) MB/s of text\)", built[0]).group(1))
    print(f"books: train cache built at {rate} MB/s; {logs[-1]}")
    assert data.train_bytes == sum((books / f"train_{i:02d}.txt").stat().st_size for i in range(5)) - 120 * 4
    t0 = time.perf_counter()
    again = prepare_data(cfg, log=logs.append)
    reuse_s = time.perf_counter() - t0
    assert "token cache: reusing train" in logs[-3]
    # side by side in this test: reading the cache back is a small fraction of building it (0.002 s against
    # 71 s on a 2-core Intel Xeon, family 6 model 207, under load), so a reuse that re-tokenized fails
    # whatever the machine's speed
    print(f"books: cache built in {build_s:.2f}s, reused in {reuse_s:.3f}s")
    assert reuse_s < 0.2 * build_s, (reuse_s, build_s)
    np.testing.assert_array_equal(again.train_streams[0][-1000:], data.train_streams[0][-1000:])


def _messy_corpus(directory, rng) -> list[str]:
    """Documents with paragraphs, runs of spaces, tabs, non-ASCII text and a few empty ones."""
    words = "the king queen  lord lady\tgood night ünïcödé ✓ 日本語 data-set x\u00a0y 42".split(" ")
    docs = []
    for i in range(23):
        paras = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(rng.randint(1, 9))]
        docs.append("" if i % 7 == 3 else "\n\n".join(paras) + rng.choice(["", "\n", "  "]))
    docs.insert(5, "one long document " * 3000)
    return docs


def _old_hold_out(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """The held-out split as whole lists, written out as jaxlm did before it streamed."""
    if len(docs) >= 2:
        n_valid = max(1, round(len(docs) * fraction))
        train, valid = docs[:-n_valid], docs[-n_valid:]
    else:
        cut = int(len(docs[0]) * (1 - fraction))
        brk = docs[0].rfind("\n\n", 0, cut)
        cut = brk + 2 if brk > 0 else cut
        train, valid = [docs[0][:cut]], [docs[0][cut:]]
    return [d for d in train if d], [d for d in valid if d]


def _old_paragraphs(docs: list[str], max_bytes: int) -> list[str]:
    """Tokenizer training sentences as jaxlm sampled them from whole lists."""
    out, total = [], 0
    stride = max(1, sum(len(d) for d in docs) // max(max_bytes, 1))
    for i, doc in enumerate(docs):
        if stride > 1 and i % stride:
            continue
        for para in doc.split("\n\n"):
            piece = (para + "\n\n")[:1 << 15]
            total += len(piece)
            if total > max_bytes:
                return out
            out.append(piece)
    return out


def _write_sources(tmp_path, docs) -> dict[str, list[str]]:
    """The documents as a multi-file jsonl source (with blank lines), a multi-file text source with a
    separator, and a single-document text source; source -> all its documents, read the old way."""
    import json
    import random

    out = {}
    for f, chunk in enumerate([docs[:9], docs[9:10], docs[10:]]):
        lines = [json.dumps({"text": d}) for d in chunk]
        (tmp_path / f"part{f}.jsonl").write_text("\n".join(lines[:2] + ["", "  "] + lines[2:]) + "\n")
    out[f"jsonl:{tmp_path}/part*.jsonl"] = list(docs)
    for f, chunk in enumerate([docs[:9], docs[9:10], docs[10:]]):  # FineWeb's layout, row groups of 4 rows
        write_fineweb_parquet(tmp_path / f"part{f}.parquet", chunk, row_group_size=4)
    out[f"parquet:{tmp_path}/part*.parquet"] = list(docs)
    sep, books = "\n\n\n\n", []
    for f, chunk in enumerate([docs[:15], docs[15:]]):
        (tmp_path / f"book{f}.txt").write_text(sep.join(chunk), encoding="utf-8")
        books += (tmp_path / f"book{f}.txt").read_text(encoding="utf-8").split(sep)
    out[f"text:{tmp_path}/book*.txt"] = books
    single = "\n\n".join(d for d in docs if d) + "\n" + " ünïcödé" * random.Random(1).randint(300, 900)
    (tmp_path / "single.txt").write_text(single, encoding="utf-8")
    out[f"text:{tmp_path}/single.txt"] = [single]
    return out


def test_streamed_cache_gives_the_ids_of_whole_document_lists(tmp_path, monkeypatch):
    """Tokens, held-out documents and the tokenizer's training sample of a streamed build are
    those of the old whole-list build, with blocks, encode groups and pieces cut anywhere."""
    import random

    from jaxlm.data import build, cache, sources, tokenizer

    docs = _messy_corpus(tmp_path, random.Random(0))
    corpora = _write_sources(tmp_path, docs)
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 997)  # blocks cut characters, separators and paragraph breaks
    monkeypatch.setattr(build, "_GROUP_CHARS", 5000)  # encode groups end inside documents
    for source, all_docs in corpora.items():
        sep = "\n\n\n\n" if "book" in source else ""
        cfg = DataConfig(source=source, cache_dir=str(tmp_path / "c"), tokenizer_vocab=300, valid_fraction=0.2,
                         doc_separator=sep, tokenizer_max_bytes=9_000, build_chunk_mb=0.004)  # chunks of a few docs
        train_docs, valid_docs = _old_hold_out(all_docs, 0.2)
        (part,), _, _ = cache.parts(cfg)
        assert part.splits.chars("train") == sum(map(len, train_docs))
        assert part.splits.chars("valid") == sum(map(len, valid_docs))
        total = part.splits.chars("train")
        assert total // 9_000 > 1  # the stride matters
        sample = list(tokenizer._paragraphs(part.splits.stream("train"), total, 9_000))
        assert sample == _old_paragraphs(train_docs, 9_000)
        tok = cache.get_tokenizer(cfg, [part], lambda m: None)
        assert tok.sha256 == train_tokenizer(train_docs, 300, max_bytes=9_000).sha256
        for split, expected_docs in [("train", train_docs), ("valid", valid_docs)]:
            ids, manifest = cache.tokens(cfg, tok, part, split, lambda m: None)
            expected = [i for d in expected_docs for i in [EOS_ID] + tok.sp.encode(d)]
            assert np.asarray(ids).tolist() == expected, (source, split)
            assert manifest["documents"] == len(expected_docs)
            assert manifest["bytes"] == sum(len(d.encode("utf-8")) for d in expected_docs)
        assert load_splits(cfg) == (train_docs, valid_docs)


def test_separators_and_paragraph_breaks_across_blocks(tmp_path, monkeypatch):
    from jaxlm.data import sources

    text = "a\n\n\n\n\n\nb\n\n\n\n\n\n\n\nc\n\n\n\n"
    for size in range(1, 8):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        for sep in ["\n\n\n\n", "\n\n", "\n"]:
            assert sources.join_documents(sources.split_chunks(chunks, sep)) == text.split(sep), (size, sep)
    assert sources.join_documents(sources.split_chunks([], "\n\n")) == [""]
    # a single document is cut at the last paragraph break before the cut, found across blocks
    (tmp_path / "one.txt").write_text("x" * 50 + "\n\n" + "y" * 47)
    for block in [1, 2, 3, 51, 52, 1000]:
        monkeypatch.setattr(sources, "_BLOCK_BYTES", block)
        assert load_splits(DataConfig(source=f"text:{tmp_path}/one.txt", valid_fraction=0.3)) == (
            ["x" * 50 + "\n\n"], ["y" * 47]), block


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    import os
    import time

    from jaxlm.data import cache
    from jaxlm.data.tokenizer import host_name, temporary_name, temporary_owner

    name = temporary_name(str(tmp_path / "k"))
    assert temporary_owner(os.path.basename(name)) == (host_name(), os.getpid())
    assert temporary_owner("k.tmp-0123abcd") is None and temporary_owner("k") is None
    host, dead, day = host_name(), _dead_pid(), 24 * 3600
    made = {
        f"k.tmp-{host}-{dead}-aaaa": True,  # this host, process gone: left over
        f"k.tmp-{host}-{os.getppid()}-bbbb": False,  # this host, process alive: a build in progress
        f"k.tmp-{host}-{os.getpid()}-cccc": False,  # this very process
        f"k.tmp-other-host-{dead}-dddd": False,  # another host: its process may well be alive
        f"k.tmp-other-host-{dead}-eeee": True,  # ... unless untouched for a day
        "k.tmp-0123abcd": False,  # an older jaxlm's name: only by age
        "k.tmp-4567abcd": True,
        f"other.tmp-{host}-{dead}-ffff": False,  # another key
    }
    for n in made:
        (tmp_path / n).mkdir()
        (tmp_path / n / "tokens.bin").write_bytes(b"x")
    (tmp_path / "k.model.tmp-x-1-f").write_bytes(b"x")  # a file; and a name that only starts like ours
    old = time.time() - day - 60
    for n in [f"k.tmp-other-host-{dead}-eeee", "k.tmp-4567abcd"]:
        os.utime(tmp_path / n / "tokens.bin", (old, old))
        os.utime(tmp_path / n, (old, old))
    os.utime(tmp_path / "k.tmp-0123abcd", (old, old))  # the directory is old, but its file was just written
    removed = cache.remove_stale(str(tmp_path), "k")
    assert sorted(removed) == sorted(n for n, stale in made.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, stale in made.items() if not stale] + ["k.model.tmp-x-1-f"])


def _entry_dir(cache_dir):
    root = cache_dir / "tokens"
    (entry,) = [p for p in root.iterdir() if ".tmp-" not in p.name]
    return entry


def test_a_builder_that_loses_the_race_uses_the_winners_entry(small_corpus, tmp_path, monkeypatch):
    import shutil

    from jaxlm.data import build

    first, manifest, _, _ = _cache_run(small_corpus, tmp_path / "c")
    entry = _entry_dir(tmp_path / "c")
    winner = tmp_path / "winner"
    shutil.copytree(entry, winner)
    shutil.rmtree(entry)
    assemble = build.assemble

    def racing(*args):  # another process renames its entry into place while this one joins its chunks
        out = assemble(*args)
        shutil.copytree(winner, entry)
        return out

    monkeypatch.setattr(build, "assemble", racing)
    again, manifest2, logs, _ = _cache_run(small_corpus, tmp_path / "c")
    assert any("another process built train" in m for m in logs), logs
    np.testing.assert_array_equal(first, again)
    assert manifest2 == manifest and [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_a_damaged_entry_is_moved_aside_before_the_new_one_is_renamed_in(small_corpus, tmp_path, monkeypatch):
    import os
    import shutil

    first, _, _, _ = _cache_run(small_corpus, tmp_path / "c")
    entry = str(_entry_dir(tmp_path / "c"))
    with open(os.path.join(entry, "manifest.json"), "w") as f:
        f.write('{"tokens": ')  # cut short
    renames, removed, rename, rmtree = [], [], os.rename, shutil.rmtree

    def record_rename(src, dst):
        renames.append((os.path.basename(src), os.path.basename(dst), os.path.isdir(dst)))
        return rename(src, dst)

    def record_rmtree(path, *args, **kwargs):
        removed.append((os.path.basename(path), os.path.exists(os.path.join(entry, "manifest.json"))))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", record_rename)
    monkeypatch.setattr(shutil, "rmtree", record_rmtree)
    again, _, logs, _ = _cache_run(small_corpus, tmp_path / "c")
    monkeypatch.undo()
    assert any("does not match its manifest" in m for m in logs)
    np.testing.assert_array_equal(first, again)
    key = os.path.basename(entry)
    (tmp, _, _), (moved, aside, _), (tmp2, final, _) = renames
    assert tmp == tmp2 and tmp.startswith(key + ".tmp-") and final == key  # the new one, tried twice
    assert moved == key and aside.startswith(key + ".tmp-") and aside != tmp  # the damaged one moved aside
    assert removed[0] == (aside, True)  # deleted only once the new entry was in place
    assert [name for name, _ in removed[1:]] == [key + ".parts-" + removed[1][0].rpartition("-")[2]]  # then the chunks
    assert [p.name for p in _entry_dir(tmp_path / "c").parent.iterdir()] == [key]


def test_tokenizer_files_are_written_under_unique_names_and_the_first_wins(small_corpus, tmp_path, monkeypatch):
    import os

    from jaxlm.data import cache
    from jaxlm.data.tokenizer import host_name

    tok = train_tokenizer(["the cat sat on the mat. " * 50], vocab_size=280)
    replaced, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(src), replace(src, dst)))
    tok.save(str(tmp_path / "t.model"))
    tok.save(str(tmp_path / "t.model"))
    monkeypatch.undo()
    assert len(set(replaced)) == 2 and all(f"t.model.tmp-{host_name()}-{os.getpid()}-" in r for r in replaced)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt",
                                                          "doc4.txt", "doc5.txt", "t.model"]
    # another process publishes its tokenizer while this one trains: this one uses that file
    cfg = DataConfig(source=small_corpus, cache_dir=str(tmp_path / "c"), tokenizer_vocab=300)
    (part,), _, _ = cache.parts(cfg)
    train_on = cache.train_on
    key_dir = tmp_path / "c" / "tokenizers"
    name = cache._key("tokenizer", [part.fingerprint], 300, "bpe", cfg.tokenizer_max_bytes) + ".model"

    def racing(cfg, parts):
        mine = train_on(cfg, parts)
        key_dir.mkdir(parents=True)
        tok.save(str(key_dir / name))
        return mine

    logs = []
    monkeypatch.setattr(cache, "train_on", racing)
    got = cache.get_tokenizer(cfg, [part], logs.append)
    assert got.sha256 == tok.sha256 and any("another process trained" in m for m in logs), logs
    assert [p.name for p in key_dir.iterdir()] == [name]
    # with no race, the trained tokenizer is published and then reused
    monkeypatch.undo()
    cfg2 = DataConfig(source=small_corpus, cache_dir=str(tmp_path / "c2"), tokenizer_vocab=300)
    mine = cache.get_tokenizer(cfg2, [part], logs.append)
    assert logs[-1].startswith("tokenizer: trained")
    assert cache.get_tokenizer(cfg2, [part], logs.append).sha256 == mine.sha256 != tok.sha256
    assert logs[-1].startswith("tokenizer: reusing")
    assert [p.name for p in (tmp_path / "c2" / "tokenizers").iterdir()] == [name]
