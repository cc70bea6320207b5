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
