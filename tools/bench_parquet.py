"""Reading the text column of a FineWeb-style Parquet file: jaxlm's reader against Grain's.

    python tools/bench_parquet.py [--mb 200] [--workdir DIR] [--repeats 2]

Writes one Parquet file in FineWeb's column layout (text, id, dump, url, date, file_path,
language, language_score, token_count; row groups of 1,000 rows), its text the Gutenberg
books (`$JAXLM_SHARED_DATA/gutenberg-en`) cut into documents of 1 to 8 KB, to `--mb` MB of text.
Then, each in a fresh process, alternating, reads every document's text:

- jaxlm: `jaxlm.data.columnar.docs(path, "text")`, what the token cache streams (row group by
  row group, the text column only);
- Grain: `grain.experimental.ParquetIterDataset(path)`, taking `row["text"]` of each row.

Prints one JSON line per read: MB/s of text and the process's peak RSS (VmHWM). Needs `pip install grain`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import time

SEP = "\n\n\n\n"


def _write(path: str, mb: float, shared: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = SEP.join(open(p, encoding="utf-8").read() for p in sorted(glob.glob(f"{shared}/gutenberg-en/train_*.txt")))
    rng, docs, size, at = random.Random(0), [], 0, 0
    while size < mb * 1e6:
        n = rng.randint(1000, 8000)
        if at + n > len(text):
            at = rng.randint(0, 1000)
        docs.append(text[at:at + n])
        at, size = at + n, size + n
    rows = len(docs)
    table = pa.table({
        "text": docs, "id": [f"<urn:uuid:{i:08x}>" for i in range(rows)], "dump": ["CC-MAIN-2024-10"] * rows,
        "url": [f"https://example.org/{i}" for i in range(rows)], "date": ["2024-02-20T00:00:00Z"] * rows,
        "file_path": ["s3://commoncrawl/x.warc.gz"] * rows, "language": ["en"] * rows,
        "language_score": [0.9] * rows, "token_count": [len(d) // 4 for d in docs]})
    pq.write_table(table, path + ".tmp", row_group_size=1000)
    os.replace(path + ".tmp", path)


def _child(kind: str, path: str) -> dict:
    t0 = time.perf_counter()
    n_bytes = n_docs = 0
    if kind == "jaxlm":
        from jaxlm.data.columnar import docs

        for _, text in docs(path, "text"):
            n_bytes += len(text.encode("utf-8"))
            n_docs += 1
    else:
        import grain

        for row in grain.experimental.ParquetIterDataset(path):
            text = row["text"]
            n_bytes += len(text.encode("utf-8"))
            n_docs += 1
    dt = time.perf_counter() - t0
    return {"reader": kind, "documents": n_docs, "mb_s": n_bytes / 1e6 / dt, "seconds": dt,
            "peak_rss_mib": _vm_hwm_mib()}


def _vm_hwm_mib() -> float:
    """This process's peak RSS since its exec (ru_maxrss keeps the parent's across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--workdir", default="/tmp/jaxlm-bench-parquet")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = os.environ.get("JAXLM_SHARED_DATA", os.path.join(root, "..", "shared", "data"))
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"fineweb-{args.mb:g}mb.parquet")
    if not os.path.exists(path):
        _write(path, args.mb, shared)
    for _ in range(args.repeats):
        for kind in ("jaxlm", "grain"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, path], capture_output=True, text=True,
                                 check=True).stdout
            print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
