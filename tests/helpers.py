"""Test helpers shared by several test files (conftest.py holds the fixtures)."""

from jaxlm.config import DataConfig
from jaxlm.data.sources import Splits


def load_splits(cfg: DataConfig, source: str | None = None, role: str = "both") -> tuple[list[str], list[str]]:
    """(train documents, validation documents) of one source, whole and in memory, as the token
    cache streams them (`Splits`)."""
    splits = Splits(cfg, source, role)
    splits.check()
    return splits.documents("train"), splits.documents("valid")
