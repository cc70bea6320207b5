"""The corpora researchers bring: Parquet files (FineWeb's layout) as `parquet:` sources, and the
bad inputs each refuses before anything is built."""

import os

import pytest

from jaxlm.cli import main
from jaxlm.config import DataConfig

from helpers import load_splits, write_fineweb_parquet

DOCS = ["First document.\n\nIt has two paragraphs.", "", "Zweites Dokument: ünïcödé, 中文, emoji 🙂.",
        "third " * 50, "fourth and last"]


def _entries(cache_dir) -> list[str]:
    """Token cache entries and tokenizers under a cache root (temporaries included)."""
    found = []
    for sub in ("tokens", "tokenizers"):
        d = os.path.join(cache_dir, sub)
        found += [os.path.join(sub, n) for n in os.listdir(d)] if os.path.isdir(d) else []
    return found


def test_parquet_rows_are_documents_and_nulls_are_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_fineweb_parquet(tmp_path / "a.parquet", DOCS[:3], row_group_size=2)
    pq.write_table(pa.table({"text": pa.array([DOCS[3], None, DOCS[4]], pa.large_string())}),
                   str(tmp_path / "b.parquet"))
    train, valid = load_splits(DataConfig(source=f"parquet:{tmp_path}/*.parquet", valid_fraction=0.2))
    # six rows, two empty (dropped); the last of the six is held out
    assert train == [DOCS[0], DOCS[2], DOCS[3]] and valid == [DOCS[4]]


def _bad_parquet(tmp_path, case: str) -> tuple[list[str], str]:
    good = tmp_path / "good.parquet"
    write_fineweb_parquet(good, DOCS * 20, row_group_size=16)
    if case == "no text column":
        return ["data.text_field=body"], "has no column 'body' (set data.text_field; its columns: text, id,"
    if case == "not a text column":
        return ["data.text_field=token_count"], "column 'token_count' holds int64, not text"
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])  # truncated: the footer is gone
    return [], "good.parquet is not a readable Parquet file"


@pytest.mark.parametrize("case", ["no text column", "not a text column", "truncated"])
def test_bad_parquet_exits_2_before_anything_is_built(tmp_path, capsys, case):
    extra, message = _bad_parquet(tmp_path, case)
    cache = tmp_path / "cache"
    args = [f"data.source=parquet:{tmp_path}/*.parquet", f"data.cache_dir={cache}", "data.tokenizer_vocab=300"]
    assert main(["data", *args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert _entries(cache) == []
    run_dir = tmp_path / "run"
    assert main(["train", *args, *extra, f"run.dir={run_dir}", "train.steps=2", "model.d_model=32",
                 "model.n_layers=1", "model.n_heads=2", "run.progress=false"]) == 2
    assert message in capsys.readouterr().err
    assert _entries(cache) == [] and not run_dir.exists()


def _dataset(docs):
    import datasets

    return datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})


def test_hf_folders_saved_by_datasets_and_hub_style(tmp_path):
    import datasets

    docs = [f"document {i}: " + "word " * i for i in range(30)]
    _dataset(docs).save_to_disk(str(tmp_path / "single"), max_shard_size="1KB")  # several .arrow shards
    assert len(list((tmp_path / "single").glob("data-*.arrow"))) > 1
    train, valid = load_splits(DataConfig(source=f"hf:{tmp_path}/single", valid_fraction=0.1))
    assert train == docs[:27] and valid == docs[27:]  # no validation split: the held-out fraction

    datasets.DatasetDict({"train": _dataset(docs[:20]), "validation": _dataset(docs[20:25]),
                          "test": _dataset(docs[25:])}).save_to_disk(str(tmp_path / "dict"))
    assert load_splits(DataConfig(source=f"hf:{tmp_path}/dict")) == (docs[:20], docs[20:25])
    assert load_splits(DataConfig(source=f"hf:{tmp_path}/dict:test", valid_fraction=0.2)) == (docs[25:29], docs[29:])
    assert load_splits(DataConfig(), f"hf:{tmp_path}/dict:test", role="valid") == ([], docs[25:])

    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    write_fineweb_parquet(hub / "train-00000-of-00002.parquet", docs[:10])
    write_fineweb_parquet(hub / "train-00001-of-00002.parquet", docs[10:20])
    write_fineweb_parquet(hub / "validation-00000-of-00001.parquet", docs[20:])
    assert load_splits(DataConfig(source=f"hf:{tmp_path}/hub")) == (docs[:20], docs[20:])
    fineweb = tmp_path / "fineweb" / "data" / "CC-MAIN-2024-10"  # no split in any name: all train
    fineweb.mkdir(parents=True)
    write_fineweb_parquet(fineweb / "000_00000.parquet", docs[:15])
    write_fineweb_parquet(fineweb / "001_00000.parquet", docs[15:])
    assert load_splits(DataConfig(source=f"hf:{tmp_path}/fineweb", valid_fraction=0.1)) == (docs[:27], docs[27:])


@pytest.mark.parametrize("case", ["no folder", "no files", "no split"])
def test_bad_hf_sources_exit_2(tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    write_fineweb_parquet(tmp_path / "train-0.parquet", DOCS)
    source, message = {"no folder": (f"hf:{tmp_path}/missing", "no such folder"),
                       "no files": (f"hf:{tmp_path}/empty", "holds no .parquet or .arrow files"),
                       "no split": (f"hf:{tmp_path}:validation", "has no split 'validation' (its splits: train)")}[case]
    assert main(["data", f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert message in capsys.readouterr().err
    assert _entries(tmp_path / "cache") == []


def test_text_jsonl_parquet_and_hf_give_one_token_cache_and_the_same_losses(tmp_path):
    """The same documents in four formats: the same tokenizer, bitwise the same cache entries, and
    the same first 20 training losses."""
    import json
    import random

    from jaxlm.metrics import read_metrics

    rng = random.Random(3)
    words = "the king queen lord lady good night day love death sword crown heart mind fair".split()
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "."
                      for _ in range(rng.randint(20, 60))) for _ in range(24)]
    (tmp_path / "text").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "text" / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_fineweb_parquet(tmp_path / "docs.parquet", docs, row_group_size=5)
    _dataset(docs).save_to_disk(str(tmp_path / "hf"), max_shard_size="4KB")
    sources = {"text": f"text:{tmp_path}/text/doc*.txt", "jsonl": f"jsonl:{tmp_path}/docs.jsonl",
               "parquet": f"parquet:{tmp_path}/docs.parquet", "hf": f"hf:{tmp_path}/hf"}
    seen = {}
    for name, source in sources.items():
        cache = tmp_path / f"cache-{name}"
        run_dir = tmp_path / f"run-{name}"
        assert main(["train", f"data.source={source}", f"data.cache_dir={cache}", f"run.dir={run_dir}",
                     "data.valid_fraction=0.1", "data.tokenizer_vocab=300", "model.d_model=32", "model.n_layers=2",
                     "model.n_heads=4", "model.max_seq_len=64", "train.batch_size=8", "train.seq_len=32",
                     "train.steps=20", "train.log_every=1", "eval.every=0", "checkpoint.every=0",
                     "run.progress=false", "run.tensorboard=false"]) == 0
        entries = {}
        for manifest in (cache / "tokens").glob("*/manifest.json"):
            split = json.loads(manifest.read_text())["split"]
            entries[split] = (manifest.parent / "tokens.bin").read_bytes()
        losses = [r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r]
        seen[name] = ((run_dir / "tokenizer.model").read_bytes(), entries, losses)
    ref_tok, ref_entries, ref_losses = seen["text"]
    assert sorted(ref_entries) == ["train", "valid"] and len(ref_losses) == 20
    for name, (tok, entries, losses) in seen.items():
        assert tok == ref_tok, name
        assert entries == ref_entries, name
        assert losses == ref_losses, name
