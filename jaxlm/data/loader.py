"""Training and validation batches from token streams (numpy only, no jax).

The training batch at step s is a pure function of (seed, s): a generator seeded with
(seed, s) picks, for each of the B rows, a source of the mixture (by weight), and the row reads
a window of T+1 tokens of that source's EOS-joined stream: with `sampling="epochs"` the source's
next window in an order without replacement (`jaxlm.data.epochs`; the k-th draw from a source,
k counted over all earlier steps, is a pure function of (seed, source, k)); with "random" (the
first sampling jaxlm had) a window at a uniformly random offset, drawn with replacement. It does not depend on
how many processes or devices there are, or on where the run started; each process
materialises only its own rows. With segment ids, each row also carries the document
each token belongs to and its position within that document, so attention stays inside
documents. Evaluation windows tile the stream (or slide over it) so every token is scored once.
`Prefetch` computes batches ahead on a background thread and measures the time the
training loop waits for them.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np

from jaxlm.data.epochs import EpochWindows
from jaxlm.errors import DataError

SAMPLINGS = ("random", "epochs")


def unscored_id(tok) -> int | None:
    """The id no target is scored on: the start token of a model whose start token is not EOS (its
    documents begin EOS, start token: the EOS ends the document before, the start token is given)."""
    return tok.start_id if tok.start_id != tok.eos_id else None


def add_segments(batch: dict[str, np.ndarray], start_id: int) -> dict[str, np.ndarray]:
    """Segment ids and in-document positions of `batch["inputs"]`: a start-token input (EOS for the models
    jaxlm pretrains) starts a document."""
    inputs = batch["inputs"]
    starts = inputs == start_id
    idx = np.arange(inputs.shape[1])
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return {**batch, "segment_ids": np.cumsum(starts, axis=1, dtype=np.int32),
            "positions": (idx - first).astype(np.int32)}


class TrainBatches:
    def __init__(self, streams: list[np.ndarray] | np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rows: slice | None = None, weights: list[float] | None = None, eos_id: int | None = None,
                 sampling: str = "random", unscored: int | None = None):
        """`streams`: one token stream per source; `weights`: their sampling weights (default equal).

        `rows`: the rows of the global batch this process materialises (default all; see
        `sharding.process_rows`). `eos_id` set: batches carry segment ids and positions (see
        `add_segments`; with a start token other than EOS, pass its id). `sampling`: "epochs" or "random"
        (module docstring). `unscored`: targets of this id get mask 0 (`unscored_id`).
        """
        if sampling not in SAMPLINGS:
            raise DataError(f"data.sampling={sampling!r} is not one of {', '.join(SAMPLINGS)}")
        streams = [streams] if isinstance(streams, np.ndarray) else list(streams)
        for i, s in enumerate(streams):
            if len(s) < seq_len + 2:
                raise DataError(f"the training text{f' of source {i}' if len(streams) > 1 else ''} has {len(s)} "
                                f"tokens, fewer than train.seq_len+2={seq_len + 2}; use more text or a shorter "
                                f"train.seq_len")
        w = np.ones(len(streams)) if weights is None else np.asarray(weights, np.float64)
        if len(w) != len(streams) or not np.all(w > 0):
            raise DataError(f"mixture weights {list(w)} must be positive, one per source")
        self.streams, self.p = streams, w / w.sum()
        self.spans = np.array([len(s) - seq_len for s in streams])  # window offsets allowed per source
        self.batch_size, self.seq_len, self.seed, self.eos_id = batch_size, seq_len, seed, eos_id
        self.unscored = unscored
        self.rows = slice(0, batch_size) if rows is None else rows
        self.sampling = sampling
        self.epoch_windows = EpochWindows([len(s) for s in streams], seq_len, seed)
        if sampling == "epochs" and not all(self.epoch_windows.windows):
            raise DataError(f"data.sampling=epochs needs at least 2 x train.seq_len = {2 * seq_len} tokens in every "
                            f"source; one has {min(len(s) for s in streams)}")
        # draws per source before a step, for the latest steps counted (the prefetcher runs a few steps
        # ahead of the records that ask too); counting again from step 0 is the fallback
        self._counted: dict[int, np.ndarray] = {0: np.zeros(len(streams), np.int64)}
        self._lock = threading.Lock()  # the prefetcher and the loop's records both count

    def _sources(self, step: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng([self.seed, step])
        if len(self.streams) == 1:
            return np.zeros(self.batch_size, np.int64), rng
        return rng.choice(len(self.streams), size=self.batch_size, p=self.p), rng

    def draws_before(self, step: int) -> np.ndarray:
        """Windows drawn from each source by the steps before `step` (all rows of the global batch)."""
        if len(self.streams) == 1:
            return np.array([step * self.batch_size], np.int64)
        with self._lock:
            return self._count_to(step)

    def _count_to(self, step: int) -> np.ndarray:
        at = max(s for s in self._counted if s <= step)
        counts = self._counted[at].copy()
        for s in range(at, step):
            counts += np.bincount(self._sources(s)[0], minlength=len(self.streams))
            self._counted[s + 1] = counts.copy()
        for s in [s for s in self._counted if 0 < s < step - 256]:
            del self._counted[s]
        return counts

    def epochs_at(self, step: int) -> list[float]:
        """Epochs of each source trained through after `step` steps ("epochs" sampling)."""
        return self.epoch_windows.epochs(self.draws_before(step))

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, offset) of each window of the global batch at `step`."""
        src, rng = self._sources(step)
        if self.sampling == "epochs":
            before = self.draws_before(step)
            order = np.argsort(src, kind="stable")  # a row's rank among this step's rows of its source
            rank = np.empty(self.batch_size, np.int64)
            first = np.searchsorted(src[order], src[order])
            rank[order] = np.arange(self.batch_size) - first
            return src, self.epoch_windows.starts(src, before[src] + rank)
        # one uniform draw per row, scaled to its source's length: exact for any mix
        u = rng.random(self.batch_size)
        span = self.spans[src]
        return src, np.minimum((u * span).astype(np.int64), span - 1)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at `step`."""
        src, start = (a[self.rows] for a in self.plan(step))
        offsets = np.arange(self.seq_len + 1)
        window = np.empty((len(src), self.seq_len + 1), np.int32)
        for i in np.unique(src):
            rows = src == i
            window[rows] = self.streams[i][start[rows, None] + offsets]
        batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
        if self.unscored is not None:
            batch["mask"] = (batch["targets"] != self.unscored).astype(np.int32)
        return add_segments(batch, self.eos_id) if self.eos_id is not None else batch


class Windows:
    """Windows of `seq_len` tokens over a token stream that score every target exactly once.

    Target p (1 <= p < len(tokens)) is token p, predicted from the tokens before it. Window
    w reads tokens [start_w, start_w + seq_len] and scores the targets p with
    lo_w < p <= start_w + seq_len. Windows start every `stride` tokens: the first scores
    its whole length, each later one only its last `stride` targets, so every target past
    the first window has at least seq_len - stride tokens of context. stride = seq_len
    (the default) tiles the stream with no overlap.
    """

    def __init__(self, n_tokens: int, seq_len: int, stride: int | None = None):
        self.n_targets = n_tokens - 1
        if self.n_targets < 1:
            raise DataError("the evaluation text is empty after tokenisation")
        stride = stride or seq_len
        if not 1 <= stride <= seq_len:
            raise DataError(f"stride {stride} must be between 1 and the context length {seq_len}")
        self.seq_len, self.stride = seq_len, stride
        self.count = 1 + -(-max(self.n_targets - seq_len, 0) // stride)
        self.starts = np.arange(self.count, dtype=np.int64) * stride
        self.lo = np.where(self.starts > 0, self.starts + seq_len - stride, 0)

    @property
    def min_context(self) -> int:
        """Tokens of context every target past the first window has at least."""
        return self.seq_len - self.stride + 1

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(target position [rows, T], scored [rows, T]) of window ids; ids past the end score nothing."""
        real = ids < self.count
        w = np.minimum(ids, self.count - 1)
        pos = self.starts[w, None] + np.arange(1, self.seq_len + 1)
        scored = (pos > self.lo[w, None]) & (pos <= self.n_targets) & real[:, None]
        return pos, scored


def window_batches(tokens: np.ndarray, batch_size: int, seq_len: int, stride: int | None = None,
                   max_batches: int = 0, rows: slice | None = None, eos_id: int | None = None,
                   unscored: int | None = None):
    """Yield (window ids of the global batch, this process's `rows` of it) covering every target once.

    The last batch is filled with repeats of the last window whose mask is 0, so every
    batch has the same shape and padding is never scored. See `Windows`.
    """
    win = Windows(len(tokens), seq_len, stride)
    n_batches = -(-win.count // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    rows = slice(0, batch_size) if rows is None else rows
    padded = np.zeros(int(win.starts[-1]) + seq_len + 1, np.int32)
    padded[:len(tokens)] = tokens[:len(padded)]
    for b in range(n_batches):
        ids = np.arange(b * batch_size, (b + 1) * batch_size)
        mine = ids[rows]
        pos, scored = win.positions(mine)
        window = padded[(pos[:, :1] - 1) + np.arange(seq_len + 1)]
        if unscored is not None:
            scored = scored & (window[:, 1:] != unscored)
        batch = {"inputs": window[:, :-1], "targets": window[:, 1:], "mask": scored.astype(np.int32)}
        yield ids, (add_segments(batch, eos_id) if eos_id is not None else batch)


class Prefetch:
    """Runs `make(step)` for steps start, start+1, ... on a background thread, `depth` ahead.

    `get(step)` returns the item of `step` (steps are consumed in order) and adds the time
    it blocked to `wait_s`; `waits` counts the gets whose item was not ready yet (a count,
    unlike the time, does not depend on the machine's speed). An exception in `make` is
    raised by the `get` that needs it.
    """

    def __init__(self, make: Callable[[int], object], start: int, stop: int, depth: int = 2):
        self.wait_s = 0.0
        self.waits = 0
        self._q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._halt = threading.Event()
        self._next = start
        self._thread = threading.Thread(target=self._work, args=(make, start, stop), daemon=True,
                                        name="jaxlm-prefetch")
        self._thread.start()

    def _work(self, make, start, stop):
        for step in range(start, stop):
            try:
                item = (step, make(step), None)
            except BaseException as e:  # handed to the consumer
                item = (step, None, e)
            while not self._halt.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._halt.is_set() or item[2] is not None:
                return

    def get(self, step: int):
        if step != self._next:
            raise ValueError(f"prefetch expected step {self._next}, asked for {step}")
        t0 = time.perf_counter()
        self.waits += self._q.empty()
        while True:
            try:
                got, item, error = self._q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._q.empty():
                    raise RuntimeError(f"prefetch stopped before step {step}") from None
        self.wait_s += time.perf_counter() - t0
        self._next += 1
        if error is not None:
            raise error
        return item

    def close(self):
        self._halt.set()
        self._thread.join(timeout=5)
