"""Compile time of the train step against depth: gpt2-124m (12 layers) and its 2-layer version.

    python tools/bench_compile.py [--layers 2 12] [--repeats 2] [overrides ...]

Each depth is compiled `--repeats` times (after one warm-up compile) and the best time is
kept; the step is the real `train_step` (AdamW included) on one device, batch 8 x 128.
Prints one JSON line: seconds per depth and the ratio of the deepest to the shallowest.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from jaxlm.config import load_config
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build


def compiled_step(n_layers: int, overrides=()):
    """(seconds to compile, the Stepper) of gpt2-124m with `n_layers` layers."""
    cfg = load_config(None, ["model.preset=gpt2-124m", f"model.n_layers={n_layers}", "train.batch_size=8",
                             "train.seq_len=128", "mesh.data=1", *overrides])
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, 50304, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state = stepper.abstract_state()
    t0 = time.perf_counter()
    stepper.compile(state, {"inputs": (8, 128), "targets": (8, 128)})
    return time.perf_counter() - t0, stepper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    compiled_step(min(a.layers), a.overrides)  # warm up tracing caches shared by every depth
    seconds = {n: min(compiled_step(n, a.overrides)[0] for _ in range(a.repeats)) for n in a.layers}
    print(json.dumps({"compile_s": {str(n): round(s, 2) for n, s in seconds.items()},
                      "ratio": round(seconds[max(a.layers)] / seconds[min(a.layers)], 3), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
