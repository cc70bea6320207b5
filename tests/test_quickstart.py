"""The README quickstart reaches validation bits per byte <= 2.25 (the bar set by nanoGPT),
and its input pipeline keeps up: the loop waits for input < 2% of the time, and the
loader makes batches at least 50x as fast as the model consumes them."""

import math
import pathlib
import statistics
import time

import pytest

from jaxlm.config import load_config
from jaxlm.data.sources import read_tfds
from jaxlm.evaluate import evaluate
from jaxlm.metrics import read_metrics
from jaxlm.train import run

from conftest import shared_data

EXPERIMENT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "shakespeare.yaml"


@pytest.mark.slow
def test_quickstart_reaches_2_25_bits_per_byte(tmp_path):
    data_dir = shared_data("tensorflow_datasets_array_record")
    cfg = load_config(str(EXPERIMENT), [f"run.dir={tmp_path / 'run'}", f"data.tfds_data_dir={data_dir}",
                                        "run.progress=false", "run.tensorboard=false"])
    t0 = time.perf_counter()
    result = run(cfg)
    print(f"quickstart: {result.eval_bpb:.4f} bits/byte in {time.perf_counter() - t0:.0f}s")
    assert result.eval_bpb <= 2.25

    # bits per byte = nats per token x tokens / bytes / ln 2, with bytes counted from the text
    valid_text = read_tfds("tiny_shakespeare", "validation", cfg.data)[0]
    n_bytes = len(valid_text.encode("utf-8"))
    assert n_bytes == 55_770
    last = [r for r in read_metrics(cfg.run.path) if "eval_loss" in r][-1]
    assert last["step"] == cfg.train.steps - 1
    assert math.isclose(last["eval_bpb"], last["eval_loss"] * last["eval_tokens"] / n_bytes / math.log(2),
                        rel_tol=1e-9)

    # `jaxlm eval` of the final checkpoint: the training loop's validation number, then WikiText-2
    own, = evaluate(cfg.run.path, write=False, log=print)
    assert own["step"] == cfg.train.steps and own["tokens"] == last["eval_tokens"] and own["bytes"] == n_bytes
    assert math.isclose(own["loss"], last["eval_loss"], rel_tol=1e-6)
    wiki_path = shared_data("wikitext-2-raw/wiki.test.raw")
    wiki, = evaluate(cfg.run.path, data=f"text:{wiki_path}", log=print)
    assert wiki["bytes"] == 1_290_590 and wiki["documents"] == 1
    print(f"quickstart on WikiText-2 raw test: {wiki['bpb']:.4f} bits/byte "
          f"(95% CI {wiki['bpb_ci95'][0]:.4f}..{wiki['bpb_ci95'][1]:.4f} over {wiki['ci_unit']}), "
          f"{wiki['tokens']:,} tokens in {wiki['eval_s']:.1f}s; Tiny Shakespeare validation {own['bpb']:.4f}")
    # out of domain: worse than on its own validation, better than a uniform guess over the vocabulary
    assert own["bpb"] < wiki["bpb"] < math.log2(cfg.data.tokenizer_vocab) * wiki["tokens"] / wiki["bytes"]

    # input wait, as logged: the share of each logging interval spent waiting for a batch
    train = [r for r in read_metrics(cfg.run.path) if "loss" in r and r["step"] > 0]
    wait = statistics.median(r["input_wait_frac"] for r in train)
    step_s = statistics.median(cfg.train.batch_size * cfg.train.seq_len / r["tokens_per_s"]
                               for r in train if r["tokens_per_s"] > 0)
    # the loader alone: batches of the same shape from the same token cache, placed on the devices
    from jaxlm.data.loader import TrainBatches
    from jaxlm.sharding import make_mesh, shard_batch
    from jaxlm.train import prepare_data

    data = prepare_data(cfg, log=lambda m: None)
    mesh = make_mesh(cfg, None)
    loader = TrainBatches(data.train_streams, cfg.train.batch_size, cfg.train.seq_len, seed=1)
    t0 = time.perf_counter()
    n = 200
    for step in range(n):
        shard_batch(loader.batch_at(step), mesh, cfg.train.batch_size)["inputs"].block_until_ready()
    batch_s = (time.perf_counter() - t0) / n
    print(f"input wait {wait:.3%} of step time; step {step_s * 1e3:.1f} ms; loader {batch_s * 1e3:.3f} ms/batch "
          f"({step_s / batch_s:.0f}x)")
    assert wait < 0.02
    assert step_s / batch_s >= 50
