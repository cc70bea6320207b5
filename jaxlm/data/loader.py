"""Token streams and batches (numpy only, no jax).

The training batch at step s is a pure function of (seed, s): B windows of T+1 tokens at
offsets drawn from a generator seeded with (seed, s). It does not depend on how many
processes or devices there are; each process materialises only its own rows. Validation
windows tile the validation stream so every token is scored exactly once.
"""

from __future__ import annotations

import numpy as np

from jaxlm.errors import DataError


def token_stream(docs_ids: list[list[int]], eos_id: int) -> np.ndarray:
    """EOS, doc, EOS, doc, ...: the leading EOS makes the first text token a scored target."""
    total = sum(len(d) for d in docs_ids) + len(docs_ids)
    dtype = np.uint16 if max((max(d) for d in docs_ids if d), default=0) < 2**16 else np.uint32
    out = np.empty(total, dtype)
    pos = 0
    for d in docs_ids:
        out[pos] = eos_id
        out[pos + 1:pos + 1 + len(d)] = d
        pos += 1 + len(d)
    return out


class TrainBatches:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the training text has {len(tokens)} tokens, fewer than train.seq_len+2="
                            f"{seq_len + 2}; use more text or a shorter train.seq_len")
        if batch_size % process_count:
            raise DataError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        rows = batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)

    def starts(self, step: int) -> np.ndarray:
        """Offsets of the global batch's windows at `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at `step`."""
        idx = self.starts(step)[self.rows, None] + np.arange(self.seq_len + 1)
        window = self.tokens[idx].astype(np.int32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int = 0,
                 process_index: int = 0, process_count: int = 1):
    """Yield this process's rows of fixed validation batches covering every target once.

    Window i holds tokens [i*T, i*T+T]; the last window and the last batch are padded,
    with mask 0 on padding, so nothing is dropped and nothing is scored twice.
    """
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise DataError("the validation text is empty after tokenisation")
    n_windows = -(-n_targets // seq_len)
    n_batches = -(-n_windows // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    rows = batch_size // process_count
    padded = np.zeros(n_windows * seq_len + 1, np.int32)
    padded[:len(tokens)] = tokens
    for b in range(n_batches):
        ids = np.arange(b * batch_size, (b + 1) * batch_size)[process_index * rows:(process_index + 1) * rows]
        starts = np.minimum(ids, n_windows - 1) * seq_len
        window = padded[starts[:, None] + np.arange(seq_len + 1)]
        pos = starts[:, None] + np.arange(1, seq_len + 1)
        mask = (pos <= n_targets) & (ids < n_windows)[:, None]
        yield {"inputs": window[:, :-1], "targets": window[:, 1:], "mask": mask.astype(np.int32)}
