"""Supervised fine-tuning: examples, the loss mask, packing with segment ids, epochs over examples,
chat templates against transformers, and a fine-tuning run with its bad inputs."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data import chat, examples, packing
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.errors import DataError
from jaxlm.step import train_loss

from conftest import KERNEL_SETS, decoder, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_sentiment  # noqa: E402

T = 64


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(sentiment files, a tokenizer trained on their text, its .model path)."""
    root = tmp_path_factory.mktemp("sft")
    paths = make_sentiment.write(str(root / "data"), n_train=300, n_valid=40, n_test=60)
    docs = [json.loads(line)["prompt"] + json.loads(line)["completion"]
            for line in open(paths["train"], encoding="utf-8")]
    tok = train_tokenizer(docs * 4, vocab_size=600)
    tok.save(str(root / "tok.model"))
    return paths, tok, str(root / "tok.model")


def _encoded(tok, records, loss_on="completion", seq_len=T):
    return examples.encode([(f"x:{i}", examples.check(r, f"x:{i}")) for i, r in enumerate(records)], tok,
                           chat.DEFAULT_TEMPLATE, loss_on, seq_len)


RECORDS = [{"prompt": "Review: the play was good.\nSentiment:", "completion": " positive"},
           {"prompt": "Review: the wine was foul.\nSentiment:", "completion": " negative"},
           {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"},
                         {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "hi hi"}]},
           {"prompt": "the king", "completion": " said"}]


def test_prompt_completion_ids_and_trained_flags(task):
    _, tok, _ = task
    ex = _encoded(tok, RECORDS[:1])
    prompt, completion = tok.encode([RECORDS[0]["prompt"], RECORDS[0]["completion"]])
    assert ex.ids.tolist() == [tok.start_id] + prompt + completion + [tok.eos_id]
    assert ex.trained.tolist() == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)
    assert _encoded(tok, RECORDS[:1], "all").trained.tolist() == [1] * len(ex.ids)


def test_chat_marks_each_assistant_reply_and_its_end_token(task):
    _, tok, _ = task
    ex = _encoded(tok, RECORDS[2:3])
    text = chat.render(chat.DEFAULT_TEMPLATE, RECORDS[2]["messages"], {"bos_token": tok.start_token,
                                                                      "eos_token": tok.eos_token})
    assert text == (f"{tok.eos_token}<|user|>\nSay hi{tok.eos_token}<|assistant|>\nhi{tok.eos_token}<|user|>\n"
                    f"Again?{tok.eos_token}<|assistant|>\nhi hi{tok.eos_token}")
    ids, trained = ex.ids.tolist(), ex.trained.astype(bool)
    spans = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))
    got = [(tok.decode(ids[a:b - 1]), ids[b - 1]) for a, b in zip(spans[::2], spans[1::2])]
    assert got == [("hi", tok.eos_id), ("hi hi", tok.eos_id)]
    assert ids.count(tok.eos_id) == 5


def _batch_of(ex, seq_len=T):
    order, bounds = np.arange(len(ex)), packing.pack(ex.lengths - 1, seq_len)
    return packing.fill(ex, order, bounds, np.arange(len(bounds) - 1), seq_len)


def _loss_and_grads(kernel_set, batch, vocab):
    cfg = tiny_config(f"train.seq_len={T}")
    model = decoder(cfg, vocab, kernel_set)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    params = model.init(jax.random.PRNGKey(0), jb["inputs"], jb["positions"], jb["segment_ids"])["params"]
    count = jnp.sum(jb["mask"])

    def f(p):
        return train_loss(p, jb, model, count, 0.0, 0)[0]

    loss, grads = jax.value_and_grad(f)(params)
    return model, params, float(loss), grads


@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
def test_prompt_targets_change_neither_the_loss_nor_the_gradients(task, kernel_set):
    _, tok, _ = task
    batch = _batch_of(_encoded(tok, RECORDS))
    _, _, loss, grads = _loss_and_grads(kernel_set, batch, tok.vocab_size)
    changed = dict(batch)
    rng = np.random.default_rng(0)
    changed["targets"] = np.where(batch["mask"] == 0, rng.integers(0, tok.vocab_size, batch["targets"].shape),
                                  batch["targets"]).astype(np.int32)
    assert np.sum(changed["targets"] != batch["targets"]) > 20
    _, _, loss2, grads2 = _loss_and_grads(kernel_set, changed, tok.vocab_size)
    assert loss2 == loss
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and a trained target's change does change it
    flipped = dict(batch)
    at = np.argwhere(batch["mask"] == 1)[0]
    flipped["targets"] = batch["targets"].copy()
    flipped["targets"][tuple(at)] = (batch["targets"][tuple(at)] + 1) % tok.vocab_size
    assert _loss_and_grads(kernel_set, flipped, tok.vocab_size)[2] != loss


@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
def test_masked_loss_is_the_mean_over_completion_tokens_and_packing_changes_no_example(task, kernel_set):
    _, tok, _ = task
    ex = _encoded(tok, RECORDS)
    packed = _batch_of(ex)
    assert packed["inputs"].shape[0] < len(ex) and packed["segment_ids"].max() > 1  # examples share rows
    model, params, loss, _ = _loss_and_grads(kernel_set, packed, tok.vocab_size)

    def nll_of(batch):
        jb = {k: jnp.asarray(v) for k, v in batch.items()}
        logits = np.asarray(model.apply({"params": params}, jb["inputs"], jb["positions"], jb["segment_ids"]),
                            np.float64)
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]

    nll = nll_of(packed)
    by_hand = float(np.sum(nll * packed["mask"]) / np.sum(packed["mask"]))
    assert abs(loss - by_hand) <= 1e-5 * by_hand
    # each example alone in a row of its own: the same NLL for each of its trained targets
    for i in range(len(ex)):
        alone = _batch_of(ex.take([i]))
        a = nll_of(alone)[alone["mask"] == 1]
        row, seg = _where_packed(ex, i)
        b = nll[row][(packed["segment_ids"][row] == seg) & (packed["mask"][row] == 1)]
        np.testing.assert_allclose(b, a, rtol=1e-5)


def _where_packed(ex, i):
    bounds = packing.pack(ex.lengths - 1, T)
    row = int(np.searchsorted(bounds, i, side="right") - 1)
    return row, i - int(bounds[row]) + 1


def test_epochs_take_every_example_once_in_new_orders_and_processes_split_rows(task):
    _, tok, _ = task
    records = [{"prompt": f"Review: item {i} was good.\nSentiment:", "completion": " positive" * (1 + i % 3)}
               for i in range(50)]
    ex = _encoded(tok, records)
    B = 4
    batches = packing.ExampleBatches(ex, B, T, seed=7)
    seen = {0: [], 1: []}
    step = 0
    while batches.locate(step * B)[0] < 2:
        b = batches.batch_at(step)
        for r in range(B):
            e, _ = batches.locate(step * B + r)
            for s in range(1, b["segment_ids"][r].max() + 1):
                first = b["inputs"][r][b["segment_ids"][r] == s]
                seen.setdefault(e, []).append(tok.decode(first).split(" was")[0])
        assert batches.epochs_at(step)[0] == pytest.approx(step * B / (len(batches.epoch(0)[1]) - 1), abs=1.0)
        step += 1
    assert sorted(seen[0]) == sorted(seen[1]) == sorted(f"Review: item {i}" for i in range(50))
    assert seen[0] != seen[1]  # another order
    for half in (slice(0, 2), slice(2, 4)):  # a process builds only its rows, and they are the global rows
        mine = packing.ExampleBatches(ex, B, T, seed=7, rows=half).batch_at(5)
        whole = batches.batch_at(5)
        for k in packing.KEYS:
            np.testing.assert_array_equal(mine[k], whole[k][half])


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Cat?"},
     {"role": "assistant", "content": "Chat."}, {"role": "user", "content": "Dog?"},
     {"role": "assistant", "content": "Chien."}],
    [{"role": "user", "content": "Naïve café — ünïcödé ✓ 日本語"}, {"role": "assistant", "content": "  spaced  \n\n"}],
    [{"role": "user", "content": "Code:\n{% raw %}{{ x }}{% endraw %}"}, {"role": "assistant", "content": "`{{ x }}`"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}],
]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_LIKE = ("{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system = messages[0]['content']"
               "|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system = '' %}\n{%- endif %}\n"
               "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}\n"
               "{%- for message in messages %}\n    {%- if loop.index0 > 7 %}{% break %}{% endif %}\n"
               "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
               " + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
               "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n")


@pytest.mark.parametrize("template", [CHATML, LLAMA3_LIKE], ids=["chatml", "llama3-like"])
def test_templates_render_as_transformers_renders_them(task, template):
    from transformers import PreTrainedTokenizerFast

    _, tok, _ = task
    hf = PreTrainedTokenizerFast(tokenizer_object=__import__("jaxlm.hf_tokenizer", fromlist=["build"]).build(tok),
                                 bos_token="<s>", eos_token="</s>")
    hf.chat_template = template
    for conv in CONVERSATIONS:
        for gen in (False, True):
            ours = chat.render(template, conv, {"bos_token": "<s>", "eos_token": "</s>"}, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    drops_old = ("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['role'] + ': ' + "
                 "m['content'] + '\\n' }}{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="not a prefix"):
        chat.segments(drops_old, CONVERSATIONS[1], {})


def test_fine_tune_run_exports_its_template_and_transformers_renders_the_trained_text(task, tmp_path):
    from transformers import AutoTokenizer

    from jaxlm.cli import main
    from test_cli import TINY_CLI

    paths, tok, tok_path = task
    conv = tmp_path / "chat.jsonl"
    conv.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "data.format=sft", f"data.source=jsonl:{conv}", f"data.tokenizer={tok_path}",
                 f"run.dir={run}", "train.steps=4", "eval.every=4", "train.seq_len=64", "data.valid_fraction=0.25",
                 "checkpoint.every=4"] + [a for a in TINY_CLI if not a.startswith("train.seq_len")]) == 0
    rec = [json.loads(line) for line in open(run / "metrics.jsonl") if "eval_loss" in line][-1]
    valid = [json.loads(line) for line in open(conv)]
    held = examples.held_out(len(valid), 0.25)
    want = _encoded(tok, [valid[i] for i in held], seq_len=64)
    targets = np.ones(len(want.ids), bool)
    targets[want.starts[:-1]] = False  # an example's first id is never a target
    assert rec["eval_tokens"] == int(want.trained[targets].sum()) > 0  # the completion-only loss's tokens
    from jaxlm.evaluate import evaluate  # `jaxlm eval` on a fine-tuning run: its validation, as the loop scored it

    got = evaluate(str(run), write=False)[0]
    assert got["tokens"] == rec["eval_tokens"] and abs(got["loss"] - rec["eval_loss"]) <= 1e-6 * rec["eval_loss"]
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for c in CONVERSATIONS:
        text = hf.apply_chat_template(c, tokenize=False)
        assert text == chat.render(chat.DEFAULT_TEMPLATE, c, {"bos_token": tok.start_token,
                                                              "eos_token": tok.eos_token})
        ids = hf.apply_chat_template(c, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == _encoded(tok, [{"messages": c}], seq_len=256).ids.tolist()


def test_bad_fine_tuning_inputs_exit_2_with_the_line_at_fault(task, tmp_path, capsys):
    from jaxlm.cli import main
    from test_cli import TINY_CLI

    _, _, tok_path = task
    no_role = tmp_path / "no_role.jsonl"
    no_role.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                  "content": "yo"}]}) + "\n"
                       + json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]})
                       + "\n", encoding="utf-8")
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "the king said " * 40, "completion": " yes"}) + "\n"
                           + json.dumps({"prompt": "a", "completion": " b"}) + "\n", encoding="utf-8")
    for path, message in ((no_role, f"{no_role}:2: message 0 has no 'role'"),
                          (long_prompt, f"{long_prompt}:1: the prompt is")):
        code = main(["train", "data.format=sft", f"data.source=jsonl:{path}", f"data.tokenizer={tok_path}",
                     f"run.dir={tmp_path / 'run'}", "train.steps=1"] + TINY_CLI)
        assert code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_a_fine_tuning_run_resumes_bitwise(task, tmp_path):
    """8 steps at once against 4, then the same command to 8: the same losses, to the bit."""
    from jaxlm.cli import main
    from test_cli import TINY_CLI

    paths, _, tok_path = task
    common = ["data.format=sft", f"data.source=jsonl:{paths['train']}", f"data.valid_source=jsonl:{paths['valid']}",
              f"data.tokenizer={tok_path}", "eval.every=0", "checkpoint.every=4", "train.seq_len=64",
              "train.log_every=1"] + [a for a in TINY_CLI if not a.startswith("train.seq_len")]

    def losses(run):
        records = [json.loads(line) for line in open(run / "metrics.jsonl")]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert main(["train", f"run.dir={tmp_path / 'once'}", "train.steps=8"] + common) == 0
    assert main(["train", f"run.dir={tmp_path / 'twice'}", "train.steps=4"] + common) == 0
    assert main(["train", f"run.dir={tmp_path / 'twice'}", "train.steps=8"] + common) == 0
    once, twice = losses(tmp_path / "once"), losses(tmp_path / "twice")
    assert sorted(once) == list(range(8)) and once == twice
