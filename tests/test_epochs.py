"""Epochs without replacement (`data.sampling=epochs`): every window once per epoch, a new order each
epoch, batches that depend only on (seed, step), and runs that resume bitwise."""

import json

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.data.epochs import grid_offset, permute, window_count
from jaxlm.data.loader import TrainBatches
from jaxlm.metrics import read_metrics


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_the_permutation_is_a_bijection_keyed_by_seed_source_and_epoch(n):
    idx = np.arange(n)
    p = permute(idx, n, seed=3, source=0, epoch=0)
    assert sorted(p.tolist()) == list(range(n))
    np.testing.assert_array_equal(p, permute(idx, n, 3, 0, 0))  # a pure function
    np.testing.assert_array_equal(p[::3], permute(idx[::3], n, 3, 0, 0))  # index by index
    if n >= 64:
        others = [permute(idx, n, 4, 0, 0), permute(idx, n, 3, 1, 0), permute(idx, n, 3, 0, 1)]
        assert all((o != p).mean() > 0.9 for o in others)


def _starts(loader, steps):
    return [loader.plan(s) for s in steps]


def test_one_epoch_uses_every_window_once_and_the_next_epoch_another_order():
    T, B = 8, 4
    stream = np.arange(8 * 41 + 3, dtype=np.int32)  # 40 windows of 9 tokens at stride 8, whatever the grid offset
    assert window_count(len(stream), T) == 40
    loader = TrainBatches(stream, B, T, seed=7, sampling="epochs")
    epoch = [np.concatenate([loader.plan(s)[1] for s in range(e * 10, e * 10 + 10)]) for e in range(3)]
    offsets = [grid_offset(T, 7, 0, e) for e in range(3)]
    assert all(0 <= o < T for o in offsets) and len(set(offsets)) > 1  # the grid moves between epochs
    for starts, o in zip(epoch, offsets):
        assert sorted(starts.tolist()) == list(range(o, o + 320, 8))  # each window of the epoch's grid once
        assert starts.max() + T < len(stream)
    assert epoch[0].tolist() != epoch[1].tolist()
    assert loader.epochs_at(10) == [1.0] and loader.epochs_at(15) == [1.5]
    batch = loader.batch_at(3)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["inputs"][:, 0], loader.plan(3)[1])  # the stream is its own offsets


def test_a_mixture_draws_each_source_through_its_own_epochs():
    T, B = 4, 8
    streams = [np.arange(4 * 31, dtype=np.int32), 1000 + np.arange(4 * 8, dtype=np.int32)]
    loader = TrainBatches(streams, B, T, seed=1, weights=[3.0, 1.0], sampling="epochs")
    plans = [loader.plan(s) for s in range(60)]
    src = np.concatenate([p[0] for p in plans])
    starts = np.concatenate([p[1] for p in plans])
    for j, w in enumerate((30, 7)):
        mine = starts[src == j]
        for e in range(len(mine) // w):  # every complete epoch of source j holds each window once
            o = grid_offset(T, 1, j, e)
            assert sorted(mine[e * w:(e + 1) * w].tolist()) == list(range(o, o + 4 * w, 4)), (j, e)
    counts = np.bincount(src, minlength=2)
    assert loader.epochs_at(60) == [counts[0] / 30, counts[1] / 7]
    # a fresh loader (a resumed run, another process) gives the same batch at any step, and a process's
    # rows are its slice of the global batch
    fresh = TrainBatches(streams, B, T, seed=1, weights=[3.0, 1.0], sampling="epochs", rows=slice(4, 8))
    np.testing.assert_array_equal(fresh.batch_at(45)["inputs"], loader.batch_at(45)["inputs"][4:8])
    np.testing.assert_array_equal(fresh.batch_at(12)["inputs"], loader.batch_at(12)["inputs"][4:8])


def test_an_epochs_run_reports_its_epochs_and_resumes_bitwise(tmp_path, small_corpus):
    from test_cli import TINY_CLI

    args = ["train", f"data.source={small_corpus}", "data.sampling=epochs", "train.log_every=1", "eval.every=0",
            "checkpoint.every=3", "run.tensorboard=false"] + TINY_CLI
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args + [f"run.dir={straight}", "train.steps=6"]) == 0
    assert main(args + [f"run.dir={resumed}", "train.steps=3"]) == 0
    assert main(args + [f"run.dir={resumed}", "train.steps=6"]) == 0
    records = [r for r in read_metrics(str(straight)) if "loss" in r]
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(str(resumed)) if "loss" in r]
    epochs = [r["epochs"][0] for r in records]
    assert 0 < epochs[0] < epochs[-1] and np.allclose(np.diff(epochs), epochs[0])  # one batch of windows a step
    assert json.loads((straight / "run_summary.json").read_text())["epochs"] == records[-1]["epochs"]
    # the sampling is part of the data stream: a branch cannot change it
    assert main(args + [f"run.dir={tmp_path / 'branch'}", "train.steps=6", "data.sampling=random",
                        f"checkpoint.branch_from={straight}/checkpoints/3"]) == 2


def test_a_run_from_before_the_sampling_key_resumes_with_random_windows(tmp_path, small_corpus, capsys):
    """A run directory whose config.yaml has no data.sampling (made before it existed) continues with the
    random windows it was trained with, whatever data.sampling now says."""
    import re

    from test_cli import TINY_CLI

    args = ["train", f"data.source={small_corpus}", "train.log_every=1", "eval.every=0", "checkpoint.every=3",
            "run.tensorboard=false"] + TINY_CLI
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert main(args + [f"run.dir={straight}", "train.steps=6", "data.sampling=random"]) == 0
    assert main(args + [f"run.dir={old}", "train.steps=3", "data.sampling=random"]) == 0
    saved = old / "config.yaml"
    text = saved.read_text()
    assert re.search(r"^  sampling: random$", text, re.M)
    saved.write_text(re.sub(r"^  sampling: random\n", "", text, flags=re.M))
    capsys.readouterr()
    assert main(args + [f"run.dir={old}", "train.steps=6", "data.sampling=epochs"]) == 0
    assert "continues with data.sampling=random" in capsys.readouterr().err
    losses = [[r["loss"] for r in read_metrics(str(d)) if "loss" in r] for d in (straight, old)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
