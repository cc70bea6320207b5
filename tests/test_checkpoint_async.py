"""Asynchronous checkpointing, shown by ordering instead of timing.

The last part of each save (Orbax's finalize, on the manager's background thread) is held
back until the training loop has run more steps. Were `save()` to wait for the whole save,
the loop could never run them and the hang guard would fail the test; were the save
synchronous, finalize would run on the main thread. The time this saves is a benchmark, not a
test: `tools/bench_checkpoint.py` measures it (docs/checkpoints.md).
"""

import threading

import orbax.checkpoint as ocp

from jaxlm import checkpoint as ckpt
from jaxlm.cli import main
from jaxlm.metrics import read_metrics
from jaxlm.step import JitStepper

from helpers import wait_until
from test_cli import TINY_CLI

HANG_S = 120  # hang guard only: each wait normally ends within a few steps' time


def _until(condition, what: str) -> None:
    wait_until(condition, what, HANG_S)


def test_the_loop_trains_on_while_a_checkpoint_is_being_committed(tmp_path, small_corpus, monkeypatch):
    steps_run, committed = [], []
    lag = 3  # steps the loop must run after save(k) returned before checkpoint k may commit
    run_dir = tmp_path / "run"
    train = JitStepper.train

    def counting_train(self, state, batch):
        steps_run.append(len(steps_run))
        return train(self, state, batch)

    finalize = ocp.CheckpointManager._finalize_checkpoint

    def held_finalize(self, step):
        assert threading.current_thread() is not threading.main_thread()  # a background commit
        _until(lambda: len(steps_run) >= min(step + lag, 12), f"the loop to run past step {step + lag}")
        committed.append((step, len(steps_run)))
        return finalize(self, step)

    monkeypatch.setattr(JitStepper, "train", counting_train)
    monkeypatch.setattr(ocp.CheckpointManager, "_finalize_checkpoint", held_finalize)
    assert main(["train", f"data.source={small_corpus}", f"run.dir={run_dir}", "train.steps=12",
                 "checkpoint.every=4", "checkpoint.keep=5", "eval.every=0", "run.tensorboard=false"]
                + TINY_CLI) == 0
    assert [s for s, _ in committed] == [4, 8, 12]
    assert all(ran >= min(s + lag, 12) for s, ran in committed), committed
    assert ckpt.steps(str(run_dir)) == [4, 8, 12]
    assert [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r][-1] == 11
