"""Fine-tuning examples packed into rows of train.seq_len positions, with segment ids (numpy only).

An example of n ids takes n - 1 positions of a row (inputs ids[:-1], targets ids[1:], the loss mask
its trained flags of the targets). Rows are filled greedily in order: an example goes into the
current row if it fits, else it starts the next one; the rest of a row is padding (segment 0, mask
0). Every example in a row has its own segment id (1, 2, ...) and positions from 0, so attention
never crosses from one example into another and each example's loss is what it would be alone.

Training walks epochs over examples: epoch e takes the examples in the order of the permutation
keyed by (seed, e) (`jaxlm.data.epochs.permute`, the one token windows use) and packs them; the
batch at step s is rows [s B, (s + 1) B) of the epochs' rows laid end to end. So the batch is a
pure function of (seed, step), whatever the number of processes, and each process builds only its
own rows. Validation packs the examples in file order.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.epochs import permute
from jaxlm.data.examples import Examples
from jaxlm.errors import DataError

KEYS = ("inputs", "targets", "mask", "segment_ids", "positions")


def pack(sizes: np.ndarray, seq_len: int) -> np.ndarray:
    """Row bounds [rows + 1] over examples of `sizes` positions taken in order (module docstring)."""
    bounds, used = [0], 0
    for i, s in enumerate(sizes.tolist()):
        if used + s > seq_len:
            bounds.append(i)
            used = 0
        used += s
    bounds.append(len(sizes))
    return np.asarray(bounds, np.int64)


def fill(ex: Examples, order: np.ndarray, bounds: np.ndarray, rows: np.ndarray, seq_len: int) -> dict:
    """The batch of rows `rows` (row r holds order[bounds[r]:bounds[r+1]]; a row past the end is padding)."""
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in KEYS}
    for j, r in enumerate(rows.tolist()):
        if r >= len(bounds) - 1:
            continue
        at = 0
        for seg, i in enumerate(order[bounds[r]:bounds[r + 1]].tolist(), 1):
            a, b = int(ex.starts[i]), int(ex.starts[i + 1])
            n = b - a - 1
            out["inputs"][j, at:at + n] = ex.ids[a:b - 1]
            out["targets"][j, at:at + n] = ex.ids[a + 1:b]
            out["mask"][j, at:at + n] = ex.trained[a + 1:b]
            out["segment_ids"][j, at:at + n] = seg
            out["positions"][j, at:at + n] = np.arange(n)
            at += n
    return out


class ExampleBatches:
    """Training batches over epochs of packed examples; the interface of `loader.TrainBatches`."""

    sampling = "epochs"

    def __init__(self, ex: Examples, batch_size: int, seq_len: int, seed: int, rows: slice | None = None):
        if not len(ex):
            raise DataError("there are no training examples")
        if int(ex.lengths.max()) - 1 > seq_len:
            raise DataError(f"an example is longer than train.seq_len={seq_len} + 1 tokens")
        self.ex, self.batch_size, self.seq_len, self.seed = ex, batch_size, seq_len, seed
        self.rows = slice(0, batch_size) if rows is None else rows
        self._epochs: list[tuple[np.ndarray, np.ndarray]] = []  # (order, bounds) of each epoch packed so far
        self._first: list[int] = [0]  # global row index each epoch starts at

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            n = len(self.ex)
            order = permute(np.arange(n), n, self.seed, 0, k)
            bounds = pack(self.ex.lengths[order] - 1, self.seq_len)
            self._epochs.append((order, bounds))
            self._first.append(self._first[-1] + len(bounds) - 1)
        return self._epochs[e]

    def locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of global row `row`."""
        e = 0
        while True:
            self.epoch(e)
            if row < self._first[e + 1]:
                return e, row - self._first[e]
            e += 1

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at `step`."""
        wanted = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]
        parts, at = [], 0
        while at < len(wanted):
            e, r = self.locate(int(wanted[at]))
            order, bounds = self.epoch(e)
            take = min(len(wanted) - at, len(bounds) - 1 - r)
            parts.append(fill(self.ex, order, bounds, np.arange(r, r + take), self.seq_len))
            at += take
        return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}

    def epochs_at(self, step: int) -> list[float]:
        """Epochs of examples trained through after `step` steps."""
        e, r = self.locate(step * self.batch_size)
        return [e + r / (len(self.epoch(e)[1]) - 1)]

    def fullness(self) -> float:
        """Share of the first epoch's row positions that hold an example."""
        order, bounds = self.epoch(0)
        return float((self.ex.lengths - 1).sum()) / ((len(bounds) - 1) * self.seq_len)


def eval_batches(ex: Examples, batch_size: int, seq_len: int, rows: slice | None = None):
    """Yield (example index of each position of the global batch [rows, T], -1 on padding; its loss mask;
    this process's rows of it) over the examples packed in file order; the last batch is padded with
    empty rows."""
    order = np.arange(len(ex))
    bounds = pack(ex.lengths - 1, seq_len)
    rows = slice(0, batch_size) if rows is None else rows
    n_rows = len(bounds) - 1
    for b in range(-(-n_rows // batch_size)):
        ids = np.arange(b * batch_size, (b + 1) * batch_size)
        batch = fill(ex, order, bounds, ids, seq_len)
        owner = np.full((batch_size, seq_len), -1, np.int64)
        for j, r in enumerate(ids.tolist()):
            if r < n_rows:
                members = order[bounds[r]:bounds[r + 1]]
                seg = batch["segment_ids"][j]
                owner[j] = np.where(seg > 0, members[np.maximum(seg - 1, 0)], -1)
        yield owner, batch["mask"], {k: v[rows] for k, v in batch.items()}
