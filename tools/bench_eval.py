"""Cost of the training loop's validation pass, against on-device loss sums, on a trained run.

    python tools/bench_eval.py runs/shakespeare [--rounds 5]

Restores the run's newest checkpoint on this machine's devices with the run's own mesh and
batch, then times, alternately (A B A B ...), one validation pass of the whole
validation split done two ways:

- `sums`: a jitted step that returns the summed NLL and token count of each batch, added
  up on the host (what the loop did before it used the evaluation harness);
- `harness`: `evaluate.validate`, the harness's per-token scorer with float64 sums and
  95% intervals (what the loop runs now).

Prints one JSON line: the medians, their ratio, both losses, and the share of training
time one pass costs at the run's eval.every (train step time from metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm import sharding
from jaxlm.config import load_config
from jaxlm.config_checks import check_vocab
from jaxlm.data.loader import window_batches
from jaxlm.evaluate import validate
from jaxlm.metrics import read_metrics
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build, token_sums
from jaxlm.train import prepare_data
from jaxlm.data.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    cfg = load_config(os.path.join(a.run_dir, "config.yaml"))
    tok = load_tokenizer(os.path.join(a.run_dir, "tokenizer.model"))
    data = prepare_data(cfg, log=lambda m: None, tokenizer=tok)
    mesh = make_mesh(cfg, jax.devices())
    model, tx, schedule = build(cfg, check_vocab(cfg, tok.vocab_size, mesh.shape["tensor"]), mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    step, state, _, _ = ckpt.restore_latest(a.run_dir, stepper.restore_target(), log=print)
    params = stepper.adopt(state).params
    B, T = cfg.eval.batch_size or cfg.train.batch_size, cfg.train.seq_len
    eos = tok.eos_id if cfg.data.segment_ids else None
    bsh = sharding.batch_sharding(mesh)

    def sums_fn(params, batch):
        total, _, count = token_sums(params, batch, model)
        return total, count

    sums_step = jax.jit(sums_fn, in_shardings=(stepper.state_shardings.params, bsh),
                        out_shardings=sharding.replicated(mesh))

    def on_device_sums() -> float:
        with sharding.activate(mesh):
            outs = [sums_step(params, stepper.place(b, B))
                    for _, b in window_batches(data.valid.tokens, B, T, eos_id=eos)]
        got = jax.device_get(outs)
        return float(sum(np.float64(s) for s, _ in got) / sum(np.float64(c) for _, c in got))

    def harness() -> float:
        return validate(stepper, params, data.valid, cfg, tok.eos_id)["eval_loss"]

    times: dict[str, list[float]] = {"sums": [], "harness": []}
    losses = {}
    for name, fn in (("sums", on_device_sums), ("harness", harness)):  # compile outside the timing
        losses[name] = fn()
    for _ in range(a.rounds):
        for name, fn in (("sums", on_device_sums), ("harness", harness)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    train = [r for r in read_metrics(a.run_dir) if r.get("tokens_per_s")]
    step_s = statistics.median(B * T / r["tokens_per_s"] for r in train[len(train) // 2:]) if train else None
    every = cfg.eval.every
    out = {"run_dir": a.run_dir, "checkpoint": step, "valid_tokens": int(len(data.valid.tokens)),
           "sums_s": med["sums"], "harness_s": med["harness"], "ratio": med["harness"] / med["sums"],
           "sums_loss": losses["sums"], "harness_loss": losses["harness"], "rounds": a.rounds,
           "train_step_s": step_s, "eval_every": every}
    if step_s and every:
        out["harness_share_of_training"] = med["harness"] / (med["harness"] + every * step_s)
        out["sums_share_of_training"] = med["sums"] / (med["sums"] + every * step_s)
    print(json.dumps(out))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
