"""Asynchronous checkpointing: the loop does not wait for the write, and step time barely moves."""

import os
import subprocess
import sys

import pytest

from conftest import shared_data

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "bench_checkpoint.py")


@pytest.mark.slow
def test_checkpoint_every_10_steps_costs_under_10_percent():
    source = "text:" + str(shared_data("tinyshakespeare/input.txt"))
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as the tool runs on its own
    # width 768 (~30M parameters, a ~350 MB train state): the tool's default model wrote its
    # checkpoint in 0.27 s on a faster CPU, too quick for the comparison to mean anything.
    # 12 steps of 4 rows (CI time): checkpoints at steps 10 and 12 in a loop of half the rows and
    # fewer steps than the tool's default, so the loop's share inside save() is, if anything, larger.
    proc = subprocess.run([sys.executable, TOOL, "--source", source, "--rounds", "1", "--steps", "12",
                           "model.d_model=768", "model.n_heads=12", "train.batch_size=4"],
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    print(out)
    line = next(x for x in out.splitlines() if x.startswith("one checkpoint"))
    returned = float(line.split("returns after ")[1].split("s")[0])
    committed = float(line.split("committed after ")[1].split("s")[0])
    assert committed >= 0.3  # a checkpoint big enough to matter
    assert returned < 0.6 * committed  # the loop gets control back long before the write is done
    # The time the loop waits inside save() is under 10% of the loop. The A/B step-time
    # comparison the tool prints is reported, not asserted: on a shared 2-core machine its
    # run-to-run noise (+-10%) is larger than a fully synchronous save would cost (~6%).
    for line in (x for x in out.splitlines() if "inside save()" in x):
        inside = float(line.split("the loop spent ")[1].split("s of")[0])
        loop = float(line.split("s of ")[1].split("s inside")[0])
        assert inside < 0.10 * loop, line
    assert "inside save()" in out and "mean step times" in out, out + proc.stderr[-2000:]
