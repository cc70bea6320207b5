"""Multiple-choice scoring (`jaxlm eval --task`): lm-eval's request encoding, log-likelihoods that equal
each request scored alone, accuracy from them, the JSON with predictions, and bad task files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import tasks
from jaxlm.errors import DataError


def _write_task(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


ROWS = [{"context": "the king said ", "choices": ["good night", "sword"], "label": 0},
        {"context": "my lady", "choices": [" fair", " death", " crown of the queen"], "label": 2},
        {"context": "", "choices": ["the", "lord"], "label": 1},
        {"context": "love and " * 3, "choices": [" heart", " mind."], "label": 1}]


class _Tok:
    """A tokenizer of one id per character (start 0), to check the encoding by eye."""

    start_id = 0

    def encode(self, texts):
        return [[ord(c) for c in t] for t in texts]


def test_requests_are_encoded_as_lm_eval_encodes_them():
    ctx, cont = tasks.encode_pair(_Tok(), "the king said ", "good")
    assert ctx == [0] + [ord(c) for c in "the king said"] and cont == [ord(c) for c in " good"]
    ex = tasks.request_examples(_Tok(), [("abcdef", "gh")], seq_len=4)  # cut from the left to seq_len + 1
    assert ex.ids.tolist() == [ord(c) for c in "defgh"] and ex.trained.tolist() == [0, 0, 0, 1, 1]


def test_log_likelihoods_equal_each_request_alone_and_give_the_accuracy(trained_run, tmp_path):
    from jaxlm import checkpoint as ckpt
    from jaxlm.evaluate import evaluate_task
    from jaxlm.inference import open_checkpoints

    _, run_dir = trained_run
    path = _write_task(tmp_path / "mc.jsonl", ROWS * 3)
    res = evaluate_task(str(run_dir), path, overrides=["eval.batch_size=8"], write=True)[0]
    o = open_checkpoints(str(run_dir), ["eval.batch_size=4"], jax.devices()[:1])
    params, _, _ = ckpt.restore_params(o.run_dir, o.steps[0], o.target, print)
    task = tasks.read_task(path)
    lls = []
    for context, choice in task.pairs():  # one request, unpacked, its log-softmax summed by hand
        ctx, cont = tasks.encode_pair(o.tokenizer, context, choice)
        seq = ctx + cont
        logits = np.asarray(o.model.apply({"params": params}, jnp.asarray([seq[:-1]])), np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        lls.append(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
    got = [ll for p in res["predictions"] for ll in p["loglikelihoods"]]
    np.testing.assert_allclose(got, lls, rtol=1e-5)
    assert res["examples"] == 12 and res["requests"] == sum(len(r["choices"]) for r in ROWS) * 3
    at, want = 0, []
    for r in ROWS * 3:
        want.append(int(np.argmax(lls[at:at + len(r["choices"])])) == r["label"])
        at += len(r["choices"])
    assert res["acc"] == pytest.approx(np.mean(want), abs=1e-12)
    lo, hi = res["acc_ci95"]
    assert lo <= res["acc"] <= hi and 0 <= lo and hi <= 1
    stored = json.loads((run_dir / "eval" / f"task-mc-step{res['step']}.json").read_text())
    assert stored["predictions"] == res["predictions"] and stored["acc_norm"] == res["acc_norm"]


def test_fewshot_prefix_is_the_first_examples_with_their_answers(tmp_path):
    path = _write_task(tmp_path / "t.jsonl", ROWS)
    task = tasks.read_task(path, fewshot=2)
    assert task.prefix == "the king said good night\n\nmy lady crown of the queen\n\n"
    assert task.pairs()[0] == (task.prefix + "", "the") and len(task.labels) == 2


@pytest.mark.parametrize("row, message", [
    ({"context": "a", "choices": ["x", "y"], "label": 2}, "'label' is 2, not an index of its 2 choices"),
    ({"context": "a", "choices": ["x"], "label": 0}, "'choices' must be a list of at least 2"),
    ({"choices": ["x", "y"], "label": 0}, "'context' must be a string"),
])
def test_bad_task_files_exit_2_with_the_line(trained_run, tmp_path, capsys, row, message):
    from jaxlm.cli import main

    _, run_dir = trained_run
    path = _write_task(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match="bad.jsonl:2"):
        tasks.read_task(path)
    assert main(["eval", str(run_dir), "--task", path]) == 2
    assert f"bad.jsonl:2: {message}" in capsys.readouterr().err
