"""Training batches: determinism across process counts and restarts, mixtures, segment ids, prefetch."""

import threading

import numpy as np
import pytest

from jaxlm.data.loader import Prefetch, TrainBatches, add_segments, window_batches
from jaxlm.errors import DataError

from helpers import wait_until

EOS = 3


def _streams():
    rng = np.random.default_rng(0)
    a = rng.integers(4, 500, size=20_000).astype(np.uint16)
    a[rng.integers(0, len(a), size=300)] = EOS  # documents of varying length
    b = (np.arange(7_000) % 97 + 600).astype(np.uint16)  # a second source, ids 600..696
    b[::50] = EOS
    return [a, b]


@pytest.mark.parametrize("segments", [False, True])
def test_global_batch_is_the_same_for_1_2_and_4_processes_for_50_steps(segments):
    streams, eos = _streams(), EOS if segments else None
    one = TrainBatches(streams, 8, 16, seed=3, weights=[3, 1], eos_id=eos)
    for step in range(50):
        full = one.batch_at(step)
        for procs in (2, 4):
            n = 8 // procs
            parts = [TrainBatches(streams, 8, 16, seed=3, rows=slice(i * n, (i + 1) * n), weights=[3, 1],
                                  eos_id=eos).batch_at(step) for i in range(procs)]
            assert all(len(p["inputs"]) == 8 // procs for p in parts)  # each process only its own rows
            for key in full:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    np.testing.assert_array_equal(full["targets"][:, :-1], full["inputs"][:, 1:])
    other = TrainBatches(streams, 8, 16, seed=4, weights=[3, 1], eos_id=eos)
    assert not np.array_equal(one.batch_at(0)["inputs"], other.batch_at(0)["inputs"])


def test_a_restarted_loader_yields_the_batches_of_an_uninterrupted_one():
    streams = _streams()
    straight = Prefetch(TrainBatches(streams, 8, 16, seed=5, weights=[1, 1]).batch_at, 0, 50)
    first = [straight.get(s) for s in range(50)]
    straight.close()
    resumed = Prefetch(TrainBatches(streams, 8, 16, seed=5, weights=[1, 1]).batch_at, 23, 50)
    for s in range(23, 50):
        got = resumed.get(s)
        np.testing.assert_array_equal(got["inputs"], first[s]["inputs"])
    resumed.close()


def test_mixture_rows_follow_the_weights():
    streams = _streams()
    loader = TrainBatches(streams, 64, 16, seed=0, weights=[0.8, 0.2])
    from_b = sum(int(np.sum(loader.batch_at(s)["inputs"][:, 0] >= 600)) for s in range(100))
    # 6400 rows, p=0.2: mean 1280, standard deviation 32
    assert 1280 - 4 * 32 < from_b < 1280 + 4 * 32
    with pytest.raises(DataError, match="weights"):
        TrainBatches(streams, 8, 16, seed=0, weights=[1, 0])
    with pytest.raises(DataError, match="source 1 has 10 tokens"):
        TrainBatches([streams[0], streams[1][:10]], 8, 16, seed=0)


def test_segment_ids_and_positions_restart_at_each_document():
    inputs = np.array([[7, 8, EOS, 9, 10, 11, EOS, 12], [EOS, 5, 5, 5, 5, 5, 5, 5]])
    out = add_segments({"inputs": inputs}, EOS)
    assert out["segment_ids"].tolist() == [[0, 0, 1, 1, 1, 1, 2, 2], [1] * 8]
    assert out["positions"].tolist() == [[0, 1, 0, 1, 2, 3, 0, 1], list(range(8))]


def test_eval_batches_with_segments_still_score_every_token_once():
    tokens = np.arange(1, 1000, dtype=np.uint16)
    tokens[::37] = EOS
    seen = 0
    for _, b in window_batches(tokens, batch_size=3, seq_len=32, eos_id=EOS):
        assert b["segment_ids"].shape == b["positions"].shape == (3, 32)
        seen += int(b["mask"].sum())
    assert seen == len(tokens) - 1


HANG_S = 30  # hang guard only: every wait below normally ends in milliseconds


def _until(condition, what: str) -> None:
    wait_until(condition, what, HANG_S)


def test_prefetch_runs_ahead_counts_waits_and_raises_errors():
    """Ordered by events, not by sleeping: the test means the same on a fast or a loaded machine."""
    started, gates = [], [threading.Event() for _ in range(10)]

    def make(step):
        started.append(step)
        assert gates[step].wait(HANG_S), "hang guard"
        if step == 4:
            raise ValueError("broken batch")
        return step * 10

    p = Prefetch(make, 0, 10, depth=2)
    got = []
    first = threading.Thread(target=lambda: got.append(p.get(0)))
    first.start()
    _until(lambda: p.waits == 1, "the first get to find its batch not ready")
    gates[0].set()
    first.join(HANG_S)
    assert got == [0] and p.waits == 1
    for g in gates[1:4]:
        g.set()
    _until(lambda: p._q.full() and len(started) >= 4, "two batches queued and a third made")
    assert started == [0, 1, 2, 3] and p._q.qsize() == 2  # two ahead, one waiting to be queued, not more
    assert p.get(1) == 10
    _until(lambda: len(started) == 5, "step 3 queued, so that step 4 is being made")
    assert p.get(2) == 20 and p.get(3) == 30
    assert p.waits == 1  # those three were ready when asked for
    gates[4].set()
    with pytest.raises(ValueError, match="broken batch"):
        p.get(4)
    p.close()
    assert not any(t.name == "jaxlm-prefetch" and t.is_alive() for t in threading.enumerate())