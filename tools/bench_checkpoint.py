"""Does asynchronous checkpointing slow training down? Step time with and without checkpoints.

    python tools/bench_checkpoint.py [--source text:PATH] [--rounds 2] [--steps 40] [overrides ...]

First measures how long one checkpoint of the model takes to write when the caller waits
for it (save + commit). Then trains the same config alternately with checkpoints every 10
steps and with none (A B A B ...), and compares the mean step time over the steps after
the first 10 (compile and warm-up excluded). The mean, not the median, is compared: the
steps that start a checkpoint must count; of the rounds, the fastest of each kind is
compared (noise on a shared machine only ever slows a run down). The summary also gives the slowdown a loop
that waited for every write would see. On a CPU the background write competes with the
step for the same cores; lower train.batch_size to see that. Prints one line per run and a summary; exits 1
when the slowdown exceeds --max-slowdown.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

DEFAULT_SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare",
                              "input.txt")
# ~14M parameters: a float32 train state of ~170 MB, whose checkpoint takes well over 0.5 s to write here.
MODEL = ["model.family=gpt2", "model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.max_seq_len=128",
         "train.batch_size=8", "train.seq_len=128", "data.tokenizer_vocab=1024", "optim.warmup_steps=0",
         "eval.every=0", "eval.max_batches=1", "train.log_every=1", "run.tensorboard=false", "run.progress=false"]


def write_time(cfg, repeats: int = 3) -> tuple[float, float]:
    """Medians of (seconds until save() returns, seconds until the checkpoint is committed)."""
    import jax

    from jaxlm import checkpoint as ckpt
    from jaxlm.config_checks import check_vocab
    from jaxlm.sharding import make_mesh
    from jaxlm.step import Stepper, build
    from jaxlm.train import prepare_data

    data = prepare_data(cfg, log=lambda m: None)
    mesh = make_mesh(cfg, jax.devices())
    model, tx, schedule = build(cfg, check_vocab(cfg, data.tokenizer.vocab_size, mesh.shape["tensor"]), mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state = stepper.init_state(0)
    returned, committed = [], []
    with tempfile.TemporaryDirectory() as d:
        saver = ckpt.Saver(d, cfg, data.tokenizer.proto)
        for i in range(repeats + 1):  # the first save of a process pays one-time setup: not counted
            t0 = time.perf_counter()
            saver.save(i + 1, stepper.logical_state(state))
            t1 = time.perf_counter()
            saver.wait()
            if i:
                returned.append(t1 - t0)
                committed.append(time.perf_counter() - t0)
        saver.close()
    return statistics.median(returned), statistics.median(committed)


def mean_step_time(history: list[dict], batch_tokens: int, skip: int) -> float:
    rec = [r for r in history if "tokens_per_s" in r and r["step"] >= skip and r["tokens_per_s"] > 0]
    return statistics.fmean(batch_tokens / r["tokens_per_s"] for r in rec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="text:" + os.path.abspath(DEFAULT_SOURCE))
    p.add_argument("--rounds", type=int, default=2, help="A B pairs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--max-slowdown", type=float, default=0.10)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from jaxlm.config import load_config
    from jaxlm.train import run

    base = MODEL + [f"data.source={args.source}", f"train.steps={args.steps}"] + args.overrides
    cfg = load_config(None, base + ["run.dir=unused"])
    blocked, w = write_time(cfg)
    print(f"one checkpoint: save() returns after {blocked:.2f}s, committed after {w:.2f}s", flush=True)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    times = {"every": [], "none": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for kind in ("every", "none"):
                extra = ([f"checkpoint.every={args.every}", "checkpoint.keep=2"] if kind == "every"
                         else ["checkpoint.enabled=false"])
                run_dir = os.path.join(d, f"{kind}{r}")
                lines = []
                result = run(load_config(None, base + extra + [f"run.dir={run_dir}"]), log=lines.append)
                t = mean_step_time(result.history, tokens, skip=args.every)
                times[kind].append(t)
                done = next(x for x in lines if x.startswith("done:"))
                loop = float(done.split("training loop ")[1].split("s")[0])
                blocked = (f"; the loop spent {float(re.search(r'([0-9.]+)s starting checkpoints', done).group(1)):.2f}s of "
                           f"{loop:.1f}s inside save()" if kind == "every" else "")
                print(f"round {r + 1} {kind:>5}: mean step {t * 1000:.1f} ms{blocked}", flush=True)
    a, b = min(times["every"]), min(times["none"])  # noise here only ever slows a run down
    slowdown = a / b - 1
    print(f"checkpoint every {args.every} steps: best of {args.rounds} mean step times {a * 1000:.1f} ms vs {b * 1000:.1f} ms "
          f"without: {slowdown:+.1%} (one checkpoint takes {w:.2f}s to write: {w / (args.every * b):+.1%} "
          f"if the loop waited for it)")
    if w < 0.5:
        print("the checkpoint takes under 0.5 s to write: use a larger model for this measurement")
        return 1
    return 0 if slowdown <= args.max_slowdown else 1


if __name__ == "__main__":
    sys.exit(main())
