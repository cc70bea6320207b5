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
    proc = subprocess.run([sys.executable, TOOL, "--source", source, "--rounds", "2", "--steps", "30"],
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    print(out)
    line = next(x for x in out.splitlines() if x.startswith("one checkpoint"))
    returned = float(line.split("returns after ")[1].split("s")[0])
    committed = float(line.split("committed after ")[1].split("s")[0])
    assert committed >= 0.5  # a checkpoint big enough to matter
    assert returned < 0.6 * committed  # the loop gets control back long before the write is done
    assert proc.returncode == 0, out + proc.stderr[-2000:]  # step time within 10% of no checkpoints
