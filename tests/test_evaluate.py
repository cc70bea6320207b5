"""Evaluation harness: known answers, exact coverage, mesh invariance, bad input."""

import json
import math
import shutil

import jax
import numpy as np
import pytest
import sentencepiece as spm

from jaxlm import checkpoint as ckpt
from jaxlm.cli import main
from jaxlm.data.loader import Windows, window_batches
from jaxlm.errors import CheckpointError, DataError
from jaxlm.evaluate import evaluate, ratio_interval
from jaxlm.metrics import read_metrics

from conftest import run_abstract_state



def test_windows_score_every_target_once_with_the_promised_context():
    rng = np.random.default_rng(0)
    for n in (2, 3, 33, 64, 65, 200):
        tokens = rng.integers(0, 50, n).astype(np.int32)
        for T, S in ((16, 16), (16, 1), (16, 5), (8, 3)):
            win = Windows(n, T, S)
            seen = np.zeros(n, int)
            for B in (1, 3, 4):
                seen[:] = 0
                for ids, batch in window_batches(tokens, B, T, S):
                    pos, scored = win.positions(ids)
                    assert (batch["mask"] == scored).all()
                    assert (batch["targets"][scored] == tokens[pos[scored]]).all()
                    assert (batch["inputs"][scored] == tokens[pos[scored] - 1]).all()
                    later = np.broadcast_to((ids > 0)[:, None], scored.shape) & scored
                    context = np.broadcast_to(np.arange(1, T + 1), scored.shape)  # tokens before each target
                    assert (context[later] >= win.min_context).all()
                    np.add.at(seen, pos[scored], 1)
                assert seen[0] == 0 and (seen[1:] == 1).all(), (n, T, S, B)
    with pytest.raises(DataError, match="empty"):
        Windows(1, 16)
    with pytest.raises(DataError, match="stride"):
        Windows(100, 16, 17)


def test_ratio_interval_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 50, 40).astype(float)
    sums = counts * 2.0 + rng.normal(0, 3, 40)
    lo, hi = ratio_interval(sums, counts)
    r = sums.sum() / counts.sum()
    resid = sums - r * counts
    se = math.sqrt(40 / 39 * np.sum(resid ** 2)) / counts.sum()
    assert lo == pytest.approx(r - 1.959964 * se) and hi == pytest.approx(r + 1.959964 * se)
    assert ratio_interval(sums[:1], counts[:1]) is None


def _zero_logits(run_dir, step):
    """Rewrite checkpoint `step` with a zero embedding table: every logit of the tied head is 0."""
    state, meta = ckpt.restore(str(run_dir), step, run_abstract_state(run_dir))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros_like(x) if jax.tree_util.keystr(p) in ("['embed']['embedding']", "['head']['kernel']")
        else np.asarray(x), state.params)
    return state.replace(params=params), meta


def test_equal_logits_score_perplexity_v_and_log2v_bits_per_token(trained_run, tmp_path):
    root, run_dir = trained_run
    text = "First line of a small text.\nSecond line, with more words in it.\n" * 20
    src = tmp_path / "small.txt"
    src.write_text(text, encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer.model"))
    V = sp.vocab_size()
    # a copy of the run whose checkpoint has all-equal logits
    copy = tmp_path / "zero"
    shutil.copytree(run_dir, copy)
    state, meta = _zero_logits(copy, 24)
    shutil.rmtree(copy / "checkpoints")
    from jaxlm.config import load_config

    saver = ckpt.Saver(str(copy), load_config(text=meta["config"]), (copy / "tokenizer.model").read_bytes())

    saver.save(24, state)
    saver.close()

    (r,) = evaluate(str(copy), data=f"text:{src}", overrides=["eval.batch_size=3"], devices=jax.devices()[:1])
    # independent counts: UTF-8 bytes of the file, sentencepiece ids of its one document
    n_tokens = len(sp.encode(text))  # + the EOS in front; targets are all tokens after the first
    assert r["bytes"] == len(text.encode("utf-8"))
    assert r["tokens"] == n_tokens
    assert r["ppl"] == pytest.approx(V, rel=1e-5)
    assert r["bpb"] == pytest.approx(math.log2(V) * n_tokens / len(text.encode("utf-8")), rel=1e-5)
    assert r["loss_ci95"][0] == pytest.approx(math.log(V), rel=1e-5)  # no spread at all
    assert r["windows"] == -(-n_tokens // 32)


def test_same_loss_on_one_device_and_on_meshes_with_a_partial_last_batch(trained_run):
    root, run_dir = trained_run
    windows = evaluate(str(run_dir), devices=jax.devices()[:1], overrides=["eval.batch_size=1"],
                       write=False)[0]["windows"]
    odd = next(b for b in (3, 5, 7, 11) if windows % b)
    one = evaluate(str(run_dir), devices=jax.devices()[:1], overrides=[f"eval.batch_size={odd}"], write=False)[0]
    for mesh, dp in (([], 8), (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 4)):
        batch = next(b for b in range(dp, 10 * dp, dp) if windows % b)  # a partial last batch
        r = evaluate(str(run_dir), overrides=mesh + [f"eval.batch_size={batch}"], write=False)[0]
        assert r["windows"] % batch != 0
        assert r["tokens"] == one["tokens"]
        print(f"mesh {r['mesh']} batch {batch} ({r['windows']} windows): loss {r['loss']!r}; one device, batch "
              f"{odd}: {one['loss']!r}; relative difference {abs(r['loss'] / one['loss'] - 1):.2e}")
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_matches_the_training_loops_validation_and_writes_json(trained_run, capsys):
    root, run_dir = trained_run
    final = [r for r in read_metrics(str(run_dir)) if "eval_loss" in r][-1]
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "95% CI over" in out
    (path,) = (run_dir / "eval").glob("step24-*.json")
    r = json.loads(path.read_text())
    assert r["step"] == 24 and r["tokens"] == final["eval_tokens"]
    assert r["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert r["bpb"] == pytest.approx(final["eval_bpb"], rel=1e-6)
    assert r["loss_ci95"][0] < r["loss"] < r["loss_ci95"][1]


def test_sliding_window_scores_the_same_tokens_with_more_context(trained_run):
    root, run_dir = trained_run
    tiled = evaluate(str(run_dir), write=False)[0]
    slid = evaluate(str(run_dir), stride=8, write=False)[0]
    assert slid["tokens"] == tiled["tokens"] and slid["min_context"] == 25
    assert slid["loss"] < tiled["loss"]  # more context per token, a trained model does better


def test_all_checkpoints_writes_one_table(trained_run, capsys):
    root, run_dir = trained_run
    assert main(["eval", str(run_dir), "--all-checkpoints"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.split()[:1] in (["12"], ["24"])]) == 2
    table = json.loads(next((run_dir / "eval").glob("all-*.json")).read_text())
    assert [r["step"] for r in table["results"]] == [12, 24]
    assert table["results"][1]["loss"] < table["results"][0]["loss"]


def test_bad_input_gives_clear_errors(trained_run, tmp_path, capsys):
    root, run_dir = trained_run
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        evaluate(str(run_dir), data=f"text:{empty}", write=False)
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        evaluate(str(bare), write=False)
    assert main(["eval", str(run_dir / "checkpoints" / "5")]) == 2
    assert "no committed checkpoint 5" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--context", "65"]) == 2
    assert "longer than the model's max_seq_len 64" in capsys.readouterr().err
