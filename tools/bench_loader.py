"""Training batches per second and memory: jaxlm's epoch sampler against Grain on the same windows.

    python tools/bench_loader.py [--tokens 200_000_000] [--seq-len 1024] [--batch 64] [--steps 2000]

Both read windows of T+1 tokens at stride T from one memory-mapped uint16 token stream (written
once to a temporary file), each window once per epoch in a shuffled order:

- jaxlm: `TrainBatches(sampling="epochs").batch_at(step)` (`jaxlm.data.epochs`: a vectorised
  Feistel permutation, one numpy call per batch);
- Grain: `MapDataset.range(W).shuffle(seed).repeat()`, `.map` to the window, `.batch(B)`, read
  by index (`ds[step]`), Grain's own random-access pipeline.

Each runs in a fresh process; prints one JSON line per loader: batches/s (median of 5 timed
blocks), and the growth of the process's peak RSS over the run (the stream's pages excluded:
both map the same file, and the RSS of the pages read is counted alike). Needs `pip install grain`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _child(kind: str, path: str, T: int, B: int, steps: int) -> dict:
    stream = np.memmap(path, dtype=np.uint16, mode="r")
    W = (len(stream) - 1) // T
    if kind == "jaxlm":
        from jaxlm.data.loader import TrainBatches

        loader = TrainBatches(stream, B, T, seed=0, sampling="epochs")
        get = lambda s: loader.batch_at(s)["inputs"]  # noqa: E731
    else:
        import grain

        ds = (grain.MapDataset.range(W).shuffle(seed=0).repeat()
              .map(lambda w: np.asarray(stream[w * T:w * T + T + 1], np.int32)).batch(B))
        get = lambda s: ds[s][:, :-1]  # noqa: E731
    get(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    blocks, per = [], max(steps // 5, 1)
    for b in range(5):
        t0 = time.perf_counter()
        for s in range(1 + b * per, 1 + (b + 1) * per):
            x = get(s)
            assert x.shape == (B, T)
        blocks.append(per / (time.perf_counter() - t0))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"loader": kind, "batches_per_s": sorted(blocks)[2], "rss_growth_mib": grown / 1024, "windows": W,
            "seq_len": T, "batch": B, "steps": 5 * per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child[0], a.child[1], a.seq_len, a.batch, a.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokens.bin")
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for i in range(0, a.tokens, 1 << 24):
                f.write(rng.integers(0, 50257, min(1 << 24, a.tokens - i), dtype=np.uint16).tobytes())
        for kind in ("jaxlm", "grain", "jaxlm", "grain"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, path, "--seq-len", str(a.seq_len),
                                  "--batch", str(a.batch), "--steps", str(a.steps)], capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
