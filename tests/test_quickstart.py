"""The README quickstart reaches validation bits per byte <= 2.25 (the bar set by nanoGPT)."""

import math
import pathlib
import time

import pytest

from jaxlm.config import load_config
from jaxlm.data.sources import read_tfds
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
