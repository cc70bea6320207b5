"""Test helpers shared by several test files (conftest.py holds the fixtures)."""

from jaxlm.config import DataConfig
from jaxlm.data.sources import Splits


def load_splits(cfg: DataConfig, source: str | None = None, role: str = "both") -> tuple[list[str], list[str]]:
    """(train documents, validation documents) of one source, whole and in memory, as the token
    cache streams them (`Splits`)."""
    splits = Splits(cfg, source, role)
    splits.check()
    return splits.documents("train"), splits.documents("valid")


def wait_until(condition, what: str, hang_s: float) -> None:
    """Poll `condition()` until it holds; fail (never pass) when it has not after `hang_s` seconds, a hang
    guard only: the tests using it order events, they do not time them."""
    import time

    deadline = time.monotonic() + hang_s
    while not condition():
        assert time.monotonic() < deadline, f"hang guard: still waiting for {what}"
        time.sleep(0.002)


FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")


def write_fineweb_parquet(path, docs: list[str], row_group_size: int = 1000) -> None:
    """`docs` as a Parquet file in FineWeb's column layout (text first, then its metadata columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(docs)
    table = pa.table({
        "text": pa.array(docs, pa.string()), "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{i}" for i in range(n)],
        "date": ["2024-02-21T00:00:00Z"] * n, "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
        "language": ["en"] * n, "language_score": pa.array([0.9] * n, pa.float64()),
        "token_count": pa.array([len(d.split()) for d in docs], pa.int64())})
    assert tuple(table.column_names) == FINEWEB_COLUMNS
    pq.write_table(table, str(path), row_group_size=row_group_size)
