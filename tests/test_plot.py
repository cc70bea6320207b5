"""jaxlm plot: figures of several runs, with tokens and FLOPs computed from each run's config."""

import shutil

import matplotlib.image
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.metrics import count_params, flops_per_token, read_metrics
from jaxlm.plot import run_series

from conftest import run_abstract_state


def test_plot_draws_several_runs_against_steps_tokens_and_flops(trained_run, tmp_path, capsys):
    root, run_dir = trained_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    out = tmp_path / "plots"
    assert main(["plot", str(run_dir), str(other), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "loss.png"), str(out / "bpb.png")]
    for name in ("loss.png", "bpb.png"):
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 1000 and img[..., :3].std() > 0.05  # drawn, not blank

    series = run_series(str(run_dir))
    cfg = load_config(str(run_dir / "config.yaml"))
    train = [r for r in read_metrics(str(run_dir)) if "loss" in r]
    assert series["train"]["loss"].tolist() == [r["loss"] for r in train]
    per_step = cfg.train.batch_size * cfg.train.seq_len
    assert series["train"]["tokens"].tolist() == [(r["step"] + 1) * per_step for r in train]
    # FLOPs per token from the real parameters of the run's checkpoint
    state, _ = ckpt.restore(str(run_dir), 24, run_abstract_state(run_dir))
    fpt = flops_per_token(cfg.model, count_params(state.params), cfg.train.seq_len)
    assert series["flops_per_token"] == fpt
    np.testing.assert_array_equal(series["eval"]["flops"], series["eval"]["tokens"] * fpt)
    assert np.isfinite(series["eval"]["bpb"]).all()


def test_plot_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not a run directory: metrics.jsonl is missing" in capsys.readouterr().err

