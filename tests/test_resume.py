"""Resume from checkpoints: bitwise after SIGKILL, across meshes, with either kernel set, and what is refused."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jaxlm.cli import main
from jaxlm.metrics import read_metrics

from test_cli import TINY_CLI


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}


def _args(small_corpus, run_dir, steps, *extra):
    return ["train", f"data.source={small_corpus}", f"run.dir={run_dir}", f"train.steps={steps}",
            "train.log_every=1", "eval.every=0", "checkpoint.every=5", "checkpoint.keep=10",
            "run.tensorboard=false"] + TINY_CLI + list(extra)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.kernels=cpu"],
                                  ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.kernels=standard"],
                                  ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.kernels=cpu",
                                   "model.family=llama", "optim.name=muon"]],
                         ids=["2x2x2-cpu", "2x2x2-standard", "2x2x2-muon"])
def test_resume_after_sigkill_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, small_corpus, mesh):
    """On the mesh with all three axes (sharded and replicated state at once), with each kernel set.
    Bitwise resumes on the default data=8 mesh are test_checkpoint's (damaged checkpoints, --resume)."""
    steps = 30
    straight = tmp_path / "straight"
    assert main(_args(small_corpus, straight, steps, *mesh)) == 0
    expected = _losses(straight)
    assert sorted(expected) == list(range(steps))

    killed = tmp_path / "killed"
    kill_after = random.Random().randint(11, 24)  # lines in metrics.jsonl: after the second checkpoint (10)
    print(f"killing after {kill_after} steps")
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli"] + _args(small_corpus, killed, steps, *mesh),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300  # hang guard
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = len(_losses(killed))
    assert 11 <= seen < steps

    assert main(_args(small_corpus, killed, steps, *mesh)) == 0  # no --restart: resumes
    got = _losses(killed)
    assert got == expected  # every step, bitwise (losses are written as exact reprs)


@pytest.mark.slow
def test_resume_on_other_meshes_matches_the_uninterrupted_run(tmp_path, small_corpus):
    """An fsdp=8 checkpoint resumed on a mesh that changes every axis (data 1 -> 2, fsdp 8 -> 2,
    tensor 1 -> 2); resuming it on one device is test_one_device_resume_of_an_fsdp_run."""
    base = tmp_path / "fsdp8"
    assert main(_args(small_corpus, base, 12, "mesh.data=1", "mesh.fsdp=8", "checkpoint.every=6")) == 0
    expected = _losses(base)
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    run = tmp_path / "2x2x2"
    shutil.copytree(base, run)
    shutil.rmtree(run / "checkpoints" / "12")  # resume from step 6
    assert main(_args(small_corpus, run, 12, *mesh, "checkpoint.every=6")) == 0
    got = _losses(run)
    assert sorted(got) == list(range(12))
    for s in range(12):
        assert got[s] == pytest.approx(expected[s], rel=2e-5), s
    assert all(got[s] == expected[s] for s in range(6))  # kept from before the checkpoint


def test_one_device_resume_of_an_fsdp_run(tmp_path, small_corpus):
    import jax

    from jaxlm.config import load_config
    from jaxlm.train import run

    base = tmp_path / "fsdp8"
    k = "model.kernels=standard"  # restored on one device with the standard kernels (cpu: the mesh tests)
    assert main(_args(small_corpus, base, 8, "mesh.data=1", "mesh.fsdp=8", "checkpoint.every=4", k)) == 0
    expected = _losses(base)
    one = tmp_path / "one"
    shutil.copytree(base, one)
    shutil.rmtree(one / "checkpoints" / "8")
    overrides = [a for a in _args(small_corpus, one, 8, "checkpoint.every=4", k)[1:]]
    cfg = load_config(None, overrides)
    run(cfg, devices=jax.devices()[:1])
    got = _losses(one)
    for s in range(4, 8):
        assert got[s] == pytest.approx(expected[s], rel=2e-5), s


def test_resume_refuses_state_changes_and_needs_a_checkpoint(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "r"
    assert main(_args(small_corpus, run_dir, 5)) == 0
    other = tmp_path / "s"
    shutil.copytree(run_dir, other)  # the finished 5-step run, for the last part
    assert main(_args(small_corpus, run_dir, 10, "model.d_model=64")) == 2
    err = capsys.readouterr().err
    assert "cannot resume with a different model.d_model (32 -> 64)" in err and "--restart" in err
    shutil.rmtree(run_dir / "checkpoints")
    assert main(_args(small_corpus, run_dir, 10)) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    # steps may change: a finished run continues to the new total
    assert main(_args(small_corpus, other, 8)) == 0
    assert "resuming" in capsys.readouterr().err and sorted(_losses(other)) == list(range(8))
    assert sorted(os.listdir(other / "checkpoints")) == ["5", "8"]
