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
