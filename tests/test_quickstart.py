"""The README quickstart (`jaxlm train experiments/shakespeare.yaml` from the repository root)
works from the repository alone: no TFDS data dir, no ../shared, no TensorFlow. It reaches
validation bits per byte <= 2.12 on the held-out last 10% of the shipped Tiny Shakespeare
(measured 2.095 to 2.103 over seeds and sessions; nanoGPT's 5 minutes on this kind of CPU:
2.31; the config before the scaling-law sweep: 2.18), `jaxlm eval` reproduces the training loop's validation number, and its input
pipeline keeps up: the loop found its next batch not ready at no more than 1% of the steps
(a count: the time waited is printed, not asserted)."""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import pytest

from jaxlm.config import load_config
from jaxlm.evaluate import evaluate
from jaxlm.metrics import read_metrics

from conftest import shared_data, user_env
from helpers import load_splits

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/shakespeare.yaml"  # relative, as the README runs it from the repository root
TEXT = ROOT / "experiments" / "data" / "tinyshakespeare.txt"
TEXT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
VALID_BYTES = 111_606  # the last 10% of the text, from the paragraph break before 90%


def test_shipped_text_is_tiny_shakespeare():
    raw = TEXT.read_bytes()
    assert len(raw) == 1_115_394
    assert hashlib.sha256(raw).hexdigest() == TEXT_SHA256, "experiments/data/tinyshakespeare.txt was modified"


@dataclasses.dataclass
class Trained:
    """What the quickstart's `jaxlm train` printed and left in its run directory."""
    log: list[str]
    eval_bpb: float
    steps: int
    input_waits: int
    input_wait_s: float


def _jaxlm(*args: str, env: dict) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "jaxlm")
    out = subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=3600)  # hang guard
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart run, trained once as the README runs it: `jaxlm train experiments/shakespeare.yaml`
    from the repository root, in a process of its own with a user's environment (one CPU device,
    optimised programs: conftest.user_env) and no TFDS data dir. The tests using it run inside the same
    context (the stored config's text path is relative to the root)."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.delenv("TFDS_DATA_DIR", raising=False)
        overrides = [f"run.dir={run_dir}", "run.progress=false", "run.tensorboard=false"]
        t0 = time.perf_counter()
        out = _jaxlm("train", EXPERIMENT, *overrides, env=user_env())
        lines = out.stderr.splitlines()
        print(out.stderr[-3000:])
        cfg = load_config(EXPERIMENT, overrides)
        done = next(line for line in lines if line.startswith("done: "))
        waits = re.search(r"of which ([0-9.]+)s waiting for input, at (\d+) of (\d+) steps", done)
        assert waits, done
        last = [r for r in read_metrics(cfg.run.path) if "eval_bpb" in r][-1]
        result = Trained(lines, last["eval_bpb"], int(waits[3]), int(waits[2]), float(waits[1]))
        print(f"quickstart: {result.eval_bpb:.4f} bits/byte in {time.perf_counter() - t0:.0f}s")
        # the held-out split, read as the run read it (relative path, from the repository root)
        train_docs, valid_docs = load_splits(cfg.data)
        yield cfg, result, train_docs, valid_docs


@pytest.mark.slow
def test_quickstart_reaches_2_12_bits_per_byte(quickstart):
    cfg, result, train_docs, valid_docs = quickstart
    assert cfg.data.source.startswith("text:")
    # 2.0951 with epochs without replacement (data.sampling=epochs, the default), 2.1108 with random windows,
    # both on a 2-core Intel Xeon (docs/data.md); seeds 0 and 1 later 2.0984 and 2.1033 (docs/training.md,
    # "Recipe options": no option moves it by more than the seeds differ)
    assert result.eval_bpb <= 2.12

    # validation is the tail of the file, never trained on: train + valid is the whole text, once
    text = TEXT.read_text(encoding="utf-8")
    assert len(train_docs) == len(valid_docs) == 1
    assert train_docs[0] + valid_docs[0] == text
    n_bytes = len(valid_docs[0].encode("utf-8"))
    assert n_bytes == VALID_BYTES

    # bits per byte = nats per token x tokens / bytes / ln 2, with bytes counted from the text
    last = [r for r in read_metrics(cfg.run.path) if "eval_loss" in r][-1]
    assert last["step"] == cfg.train.steps - 1
    assert math.isclose(last["eval_bpb"], last["eval_loss"] * last["eval_tokens"] / n_bytes / math.log(2),
                        rel_tol=1e-9)
    assert last["eval_bpb"] == result.eval_bpb

    # `jaxlm eval` of the final checkpoint, run as a user runs it, gives the training loop's validation number
    table = _jaxlm("eval", cfg.run.path, env=user_env()).stdout
    print(table)
    own, = [json.loads(p.read_text()) for p in (pathlib.Path(cfg.run.path) / "eval").glob("*.json")]
    assert own["step"] == cfg.train.steps and own["tokens"] == last["eval_tokens"] and own["bytes"] == n_bytes
    assert math.isclose(own["loss"], last["eval_loss"], rel_tol=1e-6)
    assert math.isclose(own["bpb"], last["eval_bpb"], rel_tol=1e-6)
    for a, b in zip(own["bpb_ci95"], last["eval_bpb_ci95"]):
        assert math.isclose(a, b, rel_tol=1e-6)
    lo, hi = last["eval_bpb_ci95"]
    assert lo < last["eval_bpb"] < hi
    assert any(f"{last['eval_bpb']:.4f} bits/byte (95% CI {lo:.4f}..{hi:.4f})" in line for line in result.log)

    # run_summary.json: what sweeps read
    summary = json.loads((pathlib.Path(cfg.run.path) / "run_summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == cfg.train.steps
    assert summary["last_eval"]["bpb"] == last["eval_bpb"] and summary["last_eval"]["bpb_ci95"] == [lo, hi]
    assert summary["best_eval"]["loss"] <= summary["last_eval"]["loss"]
    print(f"quickstart: eval_bpb {last['eval_bpb']!r} (95% CI {lo:.4f}..{hi:.4f}); jaxlm eval bpb {own['bpb']!r} "
          f"(relative difference {abs(own['bpb'] / last['eval_bpb'] - 1):.2e}); wall {summary['wall_s']:.0f}s")


@pytest.mark.slow
def test_quickstart_out_of_domain_wikitext(quickstart):
    """On WikiText-2 (out of domain) the model is worse than on its own validation text, and
    better than a uniform guess over the vocabulary."""
    cfg, result, _, _ = quickstart
    wiki_path = shared_data("wikitext-2-raw/wiki.test.raw")
    wiki, = evaluate(cfg.run.path, data=f"text:{wiki_path}", log=print)
    assert wiki["bytes"] == 1_290_590 and wiki["documents"] == 1
    print(f"quickstart on WikiText-2 raw test: {wiki['bpb']:.4f} bits/byte "
          f"(95% CI {wiki['bpb_ci95'][0]:.4f}..{wiki['bpb_ci95'][1]:.4f} over {wiki['ci_unit']}), "
          f"{wiki['tokens']:,} tokens in {wiki['eval_s']:.1f}s; Tiny Shakespeare validation {result.eval_bpb:.4f}")
    assert result.eval_bpb < wiki["bpb"] < math.log2(cfg.data.tokenizer_vocab) * wiki["tokens"] / wiki["bytes"]


@pytest.mark.slow
def test_quickstart_input_pipeline_keeps_up(quickstart):
    """Counted, not timed: the prefetcher had the next batch ready for (nearly) every step. The first
    batch may be waited for; a loader slower than the model would be waited for at every step."""
    cfg, result, _, _ = quickstart
    train = [r for r in read_metrics(cfg.run.path) if "loss" in r and r["step"] > 0]
    wait = statistics.median(r["input_wait_frac"] for r in train)
    print(f"input: {result.input_waits} of {result.steps} steps waited for their batch; median input wait "
          f"{wait:.3%} of step time ({result.input_wait_s:.2f}s in all)")
    assert result.input_waits <= 1 + result.steps // 100, result.input_waits
