"""Step time of the quickstart model with and without dropout.

    python tools/bench_dropout.py [--rounds 3] [--steps 40] [--rate 0.1]

Runs `jaxlm train experiments/shakespeare.yaml` (batch 32 x 128, one CPU device, as a user
runs it) with model.dropout=0 and with --rate, alternated A B A B in fresh processes, from
the repository root. Each run's median step time is taken from metrics.jsonl (steps 5
onwards), then the median over the runs of each kind. Prints one JSON line with the
medians, the ratio and every run's number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from jaxlm.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_time(rate: float, steps: int, run_dir: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, jaxlm's own settings
    subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "experiments/shakespeare.yaml",
                    f"model.dropout={rate}", f"run.dir={run_dir}", f"train.steps={steps}", "train.log_every=1",
                    "eval.every=0", "eval.max_batches=1", "checkpoint.enabled=false", "run.progress=false",
                    "run.tensorboard=false"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    per_step = [32 * 128 / r["tokens_per_s"] for r in read_metrics(run_dir) if r.get("tokens_per_s") and r["step"] >= 5]
    return statistics.median(per_step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rate", type=float, default=0.1)
    args = p.parse_args()
    times = {0.0: [], args.rate: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for rate in times:
                times[rate].append(step_time(rate, args.steps, os.path.join(tmp, f"r{r}-{rate}")))
                print(f"round {r + 1}/{args.rounds}, dropout {rate}: {times[rate][-1] * 1e3:.0f} ms/step",
                      file=sys.stderr, flush=True)
    med = {rate: statistics.median(t) for rate, t in times.items()}
    print(json.dumps({"median_step_s": {str(k): v for k, v in med.items()}, "ratio": med[args.rate] / med[0.0],
                      "runs_s": {str(k): v for k, v in times.items()}}))


if __name__ == "__main__":
    main()
