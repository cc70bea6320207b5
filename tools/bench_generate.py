"""Decode speed with the KV cache against recomputing the whole prefix for every token.

    python tools/bench_generate.py                      # the quickstart model's dimensions
    python tools/bench_generate.py --d-model 384 --layers 6 --heads 6 --vocab 8192

Both sides decode greedily from the same random weights and the same prompt, one sequence,
after a warm-up call that compiles them; rounds alternate (cache, recompute, cache, ...)
and the medians are compared. The two must produce the same tokens. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import kernels
from jaxlm.config import load_config
from jaxlm.generate import Generator, Sampling, recompute_greedy
from jaxlm.model import Decoder
from jaxlm.sharding import make_mesh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="llama")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    length = a.prompt_len + a.new_tokens
    cfg = load_config(None, [f"model.family={a.family}", f"model.d_model={a.d_model}", f"model.n_layers={a.layers}",
                             f"model.n_heads={a.heads}", f"model.max_seq_len={length}", "model.scan_layers=false",
                             f"train.seq_len={min(length, 128)}", "model.init_std=0.1"])
    model = Decoder(kernels.resolve_for(cfg.model, jax.devices()[0], cfg.train.seq_len), a.vocab)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    gen = Generator(model, cfg.model, make_mesh(load_config(None, ["mesh.data=1", f"model.max_seq_len={length}",
                                                                   f"train.seq_len={min(length, 128)}"]),
                                                jax.devices()[:1]))
    prompt = np.random.default_rng(0).integers(3, a.vocab, a.prompt_len).tolist()

    def cached():
        return gen.generate(params, [prompt], a.new_tokens, Sampling(temperature=0))[0]

    def recompute():
        return recompute_greedy(model, params, prompt, a.new_tokens)

    t0 = time.perf_counter()
    same = cached() == recompute()  # warm-up: compiles both
    compile_s = time.perf_counter() - t0
    times = {"cache": [], "recompute": []}
    for _ in range(a.rounds):
        for name, fn in (("cache", cached), ("recompute", recompute)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"model": {"family": a.family, "d_model": a.d_model, "layers": a.layers, "heads": a.heads,
                                "vocab": a.vocab}, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                      "same_tokens": same, "cache_s": med["cache"], "recompute_s": med["recompute"],
                      "cache_tokens_per_s": a.new_tokens / med["cache"],
                      "recompute_tokens_per_s": a.new_tokens / med["recompute"],
                      "speedup": med["recompute"] / med["cache"], "rounds": times, "warmup_s": compile_s,
                      "device": str(jax.devices()[0])}))


if __name__ == "__main__":
    main()
