"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every shared file jaxlm rewrites while other processes or tools may read it (metrics.jsonl
after a rollback, run_summary.json, sweep results, evaluation records, the CPU peak table,
tokenizers) goes through `atomic_open`: the data is written to a unique temporary file in
the same directory, then renamed over the target; on any error the temporary file is removed
and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` (created with its folder)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    # a unique name opened exclusively ("x"), with the umask's permissions (mkstemp would give 0600)
    tmp = os.path.join(directory, f"{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str, obj, indent: int | None = 1, **dump_kwargs) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, **dump_kwargs)
        f.write("\n")


def slug(text: str, limit: int = 80) -> str:
    """`text` as a file-name part: runs of other characters than ASCII letters and digits become '-'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or "data"
