"""Checkpoint contents, retention, integrity, the numerics guard and init_from."""

import glob
import os
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt
from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.errors import DivergedError
from jaxlm.metrics import read_metrics
from jaxlm.step import Stepper, build
from jaxlm.train import run

from conftest import write_corpus
from test_resume import _args, _losses


def _restore(run_dir, step):
    """(state on host, meta) of a checkpoint, restored with the run's own config on all devices."""
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.sharding import make_mesh

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    vocab = load_tokenizer(os.path.join(run_dir, "tokenizer.model")).vocab_size
    mesh = make_mesh(cfg, jax.devices())
    model, tx, schedule = build(cfg, vocab, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state, meta = ckpt.restore(str(run_dir), step, stepper.restore_target())
    return jax.device_get(state), meta


def _cfg(small_corpus, run_dir, steps, *extra):
    return load_config(None, _args(small_corpus, run_dir, steps, *extra)[1:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the `_args` config, trained once for the tests that start from them (each test
    copies a run before changing it): `pristine` ran 10 steps (checkpoints 5 and 10), `straight`
    ran 12 steps uninterrupted (checkpoints 5, 10 and 12)."""
    root = tmp_path_factory.mktemp("checkpoint-runs")
    (root / "corpus").mkdir()
    source = write_corpus(root / "corpus")  # the documents of the small_corpus fixture
    assert main(_args(source, root / "pristine", 10)) == 0
    assert main(_args(source, root / "straight", 12)) == 0
    return SimpleNamespace(source=source, pristine=root / "pristine", straight=root / "straight")


def test_retention_keeps_the_last_k_and_every_mth(tmp_path, small_corpus):
    run_dir = tmp_path / "r"
    assert main(_args(small_corpus, run_dir, 20, "checkpoint.every=2", "checkpoint.keep=2",
                      "checkpoint.keep_every=6", "checkpoint.at=[3,7]")) == 0
    assert sorted(map(int, os.listdir(run_dir / "checkpoints"))) == [3, 6, 7, 12, 18, 20]


def test_checkpoint_holds_tokenizer_config_and_position(tmp_path, runs, capsys):
    run_dir = tmp_path / "r"
    shutil.copytree(runs.pristine, run_dir)
    proto = (run_dir / "tokenizer.model").read_bytes()
    assert ckpt.read_tokenizer(str(run_dir), 5) == proto
    state, meta = _restore(run_dir, 10)
    assert int(state.step) == 10 and meta["data_position"] == 10 and meta["skipped_steps"] == 0
    assert "d_model: 32" in meta["config"]
    assert all(s["finite"] for s in meta["checksums"].values())
    # the run resumes with its tokenizer.model gone: the checkpoint's copy is used
    expected = _losses(run_dir)
    (run_dir / "tokenizer.model").unlink()
    assert main(_args(runs.source, run_dir, 12)) == 0
    assert (run_dir / "tokenizer.model").read_bytes() == proto
    got = _losses(run_dir)
    assert sorted(got) == list(range(12)) and all(got[s] == expected[s] for s in range(10))
    assert got == _losses(runs.straight)  # and the resumed steps are bitwise those of the uninterrupted run


def _truncate_metadata(step_dir):
    path = os.path.join(step_dir, "state", "_METADATA")
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_array_bytes(step_dir):
    """Flip bytes in every array file: Orbax reads compressed chunks back without noticing."""
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        data = bytearray(open(path, "rb").read())
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
            data[i] ^= 0xFF
        open(path, "wb").write(bytes(data))


def _remove_meta(step_dir):
    shutil.rmtree(os.path.join(step_dir, "meta"))


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, runs, capsys):
    expected = _losses(runs.straight)
    for damage in (_truncate_metadata, _flip_array_bytes, _remove_meta):
        run_dir = tmp_path / damage.__name__
        shutil.copytree(runs.pristine, run_dir)
        damage(str(run_dir / "checkpoints" / "10"))
        capsys.readouterr()
        assert main(_args(runs.source, run_dir, 12)) == 0
        err = capsys.readouterr().err
        assert f"warning: skipping damaged checkpoint {run_dir / 'checkpoints' / '10'}" in err, damage
        assert "from its checkpoint at step 5" in err
        assert os.listdir(run_dir / "damaged_checkpoints")[0].startswith("10-")  # kept, moved aside
        assert _losses(run_dir) == expected  # steps 5..11 replayed: bitwise the uninterrupted run
        assert sorted(map(int, os.listdir(run_dir / "checkpoints"))) == [5, 10, 12]


def test_every_truncated_file_is_detected_or_harmless(tmp_path, runs):
    """Truncating any one file of a checkpoint never restores wrong values without an error."""
    run_dir = tmp_path / "r"
    shutil.copytree(runs.pristine, run_dir)
    reference, _ = _restore(run_dir, 5)
    files = [p for p in glob.glob(str(run_dir / "checkpoints" / "5" / "**" / "*"), recursive=True)
             if os.path.isfile(p) and os.path.getsize(p) > 1]
    assert len(files) >= 8
    detected = 0
    for path in files:
        original = open(path, "rb").read()
        os.truncate(path, len(original) // 2)
        try:
            state, _ = _restore(run_dir, 5)
        except ckpt.CheckpointError:
            detected += 1
        else:  # a file the restore does not read
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
                np.testing.assert_array_equal(a, b, err_msg=path)
        open(path, "wb").write(original)
    # markers and metadata the restore does not read are harmless; the array data is not
    assert detected >= 5, (detected, len(files))


def test_unfinished_write_is_not_a_checkpoint_and_all_damaged_refuses(tmp_path, runs, capsys):
    run_dir = tmp_path / "r"
    shutil.copytree(runs.pristine, run_dir)
    # what a write killed mid-way leaves behind: Orbax's temporary directory
    shutil.copytree(run_dir / "checkpoints" / "10", run_dir / "checkpoints" / "15.orbax-checkpoint-tmp-1")
    assert ckpt.steps(str(run_dir)) == [5, 10]
    for step in ("5", "10"):
        os.remove(run_dir / "checkpoints" / step / "state" / "_METADATA")
    capsys.readouterr()
    assert main(_args(runs.source, run_dir, 12)) == 2  # never silently starts from scratch
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "all 2 are damaged" in err and "--restart" in err


def test_resume_flag_requires_a_checkpoint(tmp_path, runs, capsys):
    run_dir = tmp_path / "r"
    assert main(_args(runs.source, run_dir, 5) + ["--resume"]) == 2  # nothing there yet
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert not (run_dir / "metrics.jsonl").exists()
    shutil.copytree(runs.pristine, run_dir, dirs_exist_ok=True)  # a run of 10 steps there now
    assert main(_args(runs.source, run_dir, 12) + ["--resume"]) == 0
    assert _losses(run_dir) == _losses(runs.straight)
    shutil.rmtree(run_dir / "checkpoints")
    capsys.readouterr()
    assert main(_args(runs.source, run_dir, 14) + ["--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_unwritable_checkpoint_directory_fails_before_training(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the directory should be")  # fails even as root
    assert main(_args(small_corpus, run_dir, 5)) == 2
    err = capsys.readouterr().err
    assert f"checkpoint directory '{run_dir / 'checkpoints'}' cannot be read (Not a directory)" in err
    assert "compiled" not in err and not (run_dir / "metrics.jsonl").exists()


def test_nan_gradients_are_skipped_counted_and_never_checkpointed(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "nan"
    cfg = _cfg(small_corpus, run_dir, 12, "checkpoint.every=2", "checkpoint.keep=10")
    result = run(cfg, inject_nan={3, 4, 8}, log=print)
    assert result.steps == 12
    out = capsys.readouterr().out
    assert "warning: step 4 (data position 3)" in out and "skipped (2 in a row, 2 in all)" in out
    train = {r["step"]: r for r in read_metrics(str(run_dir)) if "loss" in r}
    assert [train[s]["skipped_steps"] for s in range(12)] == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert np.isnan(train[3]["grad_norm"]) and np.isfinite(train[11]["loss"])
    for step in ckpt.steps(str(run_dir)):
        state, meta = _restore(run_dir, step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f"), step
    assert meta["skipped_steps"] == 3
    # a skipped step leaves params and optimizer state exactly as they were
    before, _ = _restore(run_dir, 4)  # after steps 0..3, of which 3 was skipped
    clean = tmp_path / "clean"
    run(_cfg(small_corpus, clean, 3, "checkpoint.every=0"), inject_nan={1000}, log=print)  # same program
    reference, _ = _restore(clean, 3)
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                    jax.tree.leaves((reference.params, reference.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_too_many_bad_steps_stop_the_run(tmp_path, small_corpus):
    run_dir = tmp_path / "r"
    cfg = _cfg(small_corpus, run_dir, 20, "checkpoint.every=2", "train.max_bad_steps=2")
    with pytest.raises(DivergedError, match="more than train.max_bad_steps=2 steps in a row"):
        run(cfg, inject_nan=set(range(5, 20)), log=print)
    assert ckpt.steps(str(run_dir))[-1] <= 8  # nothing written after the run diverged
    for step in ckpt.steps(str(run_dir)):
        _, meta = _restore(run_dir, step)
        assert all(s["finite"] for s in meta["checksums"].values())


def test_rollback_skips_the_bad_batches(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "r"
    cfg = _cfg(small_corpus, run_dir, 12, "checkpoint.every=4", "train.max_bad_steps=1",
               "train.on_bad_steps=rollback")
    result = run(cfg, inject_nan={5, 6, 7}, log=print)
    out = capsys.readouterr().out
    assert result.steps == 12 and "rollback 1/3: back to the checkpoint at step 4" in out
    train = [r for r in read_metrics(str(run_dir)) if "loss" in r]
    assert [r["step"] for r in train] == list(range(12))  # the rolled-back records were replaced
    _, meta = _restore(run_dir, 12)
    skipped_to = int(out.split("skipping data positions 4..")[1].split()[0])
    assert skipped_to >= 6 and meta["data_position"] == 12 + skipped_to + 1 - 4
    assert meta["rollbacks"] == 1 and train[-1]["skipped_steps"] >= 2
    # the run after the rollback is the run that trains from checkpoint 4 on the later batches
    assert all(np.isfinite(r["grad_norm"]) for r in train[4:])


def test_init_from_takes_params_with_a_fresh_optimizer(tmp_path, small_corpus, capsys):
    source = tmp_path / "source"
    assert main(_args(small_corpus, source, 10, "eval.max_batches=4", "optim.schedule=constant",
                      "optim.warmup_steps=0", "optim.lr=1e-2")) == 0
    source_eval = [r for r in read_metrics(str(source)) if "eval_loss" in r][-1]["eval_loss"]
    first_loss = _losses(source)[0]
    tuned = tmp_path / "tuned"
    assert main(_args(small_corpus, tuned, 1, f"checkpoint.init_from={source}", "optim.lr=1e-9",
                      "optim.weight_decay=0", "eval.max_batches=4")) == 0
    assert f"initialised params from {source} step 10" in capsys.readouterr().err
    tuned_eval = [r for r in read_metrics(str(tuned)) if "eval_loss" in r][-1]["eval_loss"]
    assert tuned_eval == pytest.approx(source_eval, rel=1e-5)  # one step at lr 1e-9 barely moves them
    assert _losses(tuned)[0] < first_loss - 0.3  # not a random init
    state, _ = _restore(tuned, 1)
    assert int(state.step) == 1
    counts = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0 and x.dtype.kind == "i"]
    assert counts and all(int(c) == 1 for c in counts)  # a fresh optimizer: one update so far
    assert (tuned / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    # a different model is refused before any work
    assert main(_args(small_corpus, tmp_path / "bad", 1, f"checkpoint.init_from={source}",
                      "model.d_model=64")) == 2
    assert "has a different model: model.d_model (32 -> 64)" in capsys.readouterr().err
    assert main(_args(small_corpus, tmp_path / "none", 1, f"checkpoint.init_from={tmp_path}")) == 2
    assert "neither a run directory" in capsys.readouterr().err



def test_wsd_branch_equals_the_straight_run_to_its_budget(tmp_path, small_corpus, capsys):
    """A wsd run of 12 steps decays over its last 6; a 20-step wsd run is still stable at step 6, so
    its checkpoint there, branched with train.steps=12, must continue exactly as the 12-step run."""
    wsd = ["optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.warmup_steps=2", "optim.lr=1e-2",
           "checkpoint.every=0", "eval.max_batches=2"]
    straight, stable, branch = tmp_path / "straight", tmp_path / "stable", tmp_path / "branch"
    assert main(_args(small_corpus, straight, 12, *wsd)) == 0
    assert main(_args(small_corpus, stable, 20, *wsd, "checkpoint.at=[6]")) == 0
    assert sorted(map(int, os.listdir(stable / "checkpoints"))) == [6, 20]
    capsys.readouterr()
    assert main(_args(small_corpus, branch, 12, *wsd, f"checkpoint.branch_from={stable}/checkpoints/6")) == 0
    assert f"branching from {stable} step 6" in capsys.readouterr().err
    assert _losses(stable)[8] != _losses(straight)[8]  # the schedules differ from step 7 ...
    assert _losses(branch) == _losses(straight)  # ... and the branch follows the 12-step one, bitwise
    evals = [[r["eval_loss"] for r in read_metrics(str(d)) if "eval_loss" in r] for d in (branch, straight)]
    assert evals[0] == evals[1]
    a, b = _restore(branch, 12)[0], _restore(straight, 12)[0]
    assert jax.tree.all(jax.tree.map(np.array_equal, (a.params, a.opt_state), (b.params, b.opt_state)))
    # it refuses what cannot continue the source: another data stream, or a step past its own end
    assert main(_args(small_corpus, tmp_path / "b2", 12, *wsd, "train.seed=1",
                      f"checkpoint.branch_from={stable}/checkpoints/6")) == 2
    assert "different model or data stream: train.seed (0 -> 1)" in capsys.readouterr().err
    assert main(_args(small_corpus, tmp_path / "b3", 6, *wsd, f"checkpoint.branch_from={stable}/checkpoints/6")) == 2
    assert "not before train.steps=6" in capsys.readouterr().err


def test_pmap_backend_checkpoints_resumes_and_skips_nan(tmp_path, small_corpus):
    # eval every 2 steps: the pmap evaluation and the one-step-late metrics run between steps
    pmap = ("mesh.backend=pmap", "checkpoint.every=4", "eval.every=2")
    straight = tmp_path / "straight"
    run(_cfg(small_corpus, straight, 8, *pmap), inject_nan={2}, log=print)
    expected = _losses(straight)
    train = [r for r in read_metrics(str(straight)) if "loss" in r]
    assert train[-1]["skipped_steps"] == 1 and np.isnan(train[2]["grad_norm"])
    assert len([r for r in read_metrics(str(straight)) if "eval_loss" in r]) == 4
    resumed = tmp_path / "resumed"  # the same run stopped after its checkpoint at step 4, then resumed
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    run(_cfg(small_corpus, resumed, 8, *pmap), inject_nan={2}, log=print)
    assert _losses(resumed) == expected
    state, meta = _restore(resumed, 8)
    assert int(state.step) == 8 and meta["skipped_steps"] == 1
