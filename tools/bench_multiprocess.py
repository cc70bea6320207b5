"""Training throughput of N processes x K devices against 1 process x N*K devices, side by side.

    python tools/bench_multiprocess.py --pairs 3 --steps 40 [overrides ...]

Both sides run `jaxlm train` on the bench model's sizes (tools/bench_train.py: gpt2 without
biases, d_model 384, 6 layers, 6 heads, vocabulary 8192, 256 tokens, tied head) on the same
mesh, one after the other (A B A B ...): A is one process with all the devices, B is
`jaxlm launch --processes N --devices-per-process K`. Each run's tokens/s is the median of
its metrics.jsonl records after the first `--skip` steps. Prints one JSON line per run and
a summary line with the median ratio B/A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["model.family=gpt2", "model.d_model=384", "model.n_layers=6", "model.n_heads=6", "model.vocab_size=8192",
         "model.max_seq_len=256", "model.bias=false", "model.tie_embeddings=true", "train.seq_len=256",
         "optim.schedule=constant", "optim.warmup_steps=0", "optim.grad_clip=0", "data.tokenizer_vocab=1024",
         "train.log_every=1", "eval.every=0", "eval.max_batches=1", "checkpoint.enabled=false",
         "run.tensorboard=false", "run.progress=false"]


def _tokens_per_s(run_dir: str, skip: int) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    rates = [r["tokens_per_s"] for r in recs if "loss" in r and r["step"] >= skip and r.get("tokens_per_s")]
    return statistics.median(rates)


def _run(kind: str, a, work: str, i: int) -> dict:
    run_dir = os.path.join(work, f"{kind}{i}")
    train = ["train", f"data.source=text:{a.text}", f"run.dir={run_dir}", f"train.steps={a.steps}",
             f"train.batch_size={a.batch}"] + MODEL + a.overrides
    env = dict(os.environ, JAXLM_CACHE_DIR=os.path.join(work, "cache"), JAX_PLATFORMS="cpu")
    if kind == "one":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.processes * a.devices}"
        argv = [sys.executable, "-m", "jaxlm.cli"] + train
    else:
        env.pop("XLA_FLAGS", None)
        argv = [sys.executable, "-m", "jaxlm.cli", "launch", "--processes", str(a.processes),
                "--devices-per-process", str(a.devices), "--"] + train
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode:
        raise SystemExit(f"{kind} run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {"kind": kind, "tokens_per_s": round(_tokens_per_s(run_dir, a.skip), 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices", type=int, default=4, help="devices per process")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="steps left out of the median (compile, warm-up)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--text", default=os.path.join(REPO, "experiments", "data", "tinyshakespeare.txt"))
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for both sides, e.g. mesh.fsdp=4")
    a = ap.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory(prefix="jaxlm-bench-mp-") as work:
        for i in range(a.pairs):
            one, many = _run("one", a, work, i), _run("many", a, work, i)
            ratios.append(many["tokens_per_s"] / one["tokens_per_s"])
            for r in (one, many):
                print(json.dumps({**r, "pair": i}), flush=True)
    print(json.dumps({"processes": a.processes, "devices_per_process": a.devices, "batch": a.batch,
                      "overrides": a.overrides, "ratio_many_over_one_median": round(statistics.median(ratios), 3),
                      "ratios": [round(r, 3) for r in ratios]}))


if __name__ == "__main__":
    main()
