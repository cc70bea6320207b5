"""Train-step speed of jaxlm's own train_step, with the flags and JSON fields of torch_ref.py.

    python tools/bench_train.py --d-model 384 --layers 6 --heads 6 --vocab 8192 \
        --seq-len 256 --batch 8 --seconds 20

The model matches ../shared/bench/torch_ref.py: gpt2 family without biases (LayerNorm
without bias), learned positions, 4x GELU MLP, head tied to the embedding, init std 0.02
(residual projections scaled by 1/sqrt(2 layers)), AdamW (lr 1e-3, betas 0.9/0.95, weight
decay 0.1 on matrices, no clipping), one fixed random batch. It times the compiled
`train_step` that `jaxlm train` runs, optimizer included, on one device. Like the training
loop it reads each step's loss one step late. FLOPs use torch_ref's formula: 6 x params x
tokens + 6 x layers x width x sequence length x tokens.

Overrides select the kernels, e.g. `model.kernels=standard` (the accelerator program, here
on the CPU). Prints one JSON line: impl, kernels, attention, loss_chunk, params, step_s, tokens_per_s, model_gflops, device, dtype,
compile_s, memory (the compiled step's memory analysis, bytes), jax.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxlm.config import load_config
from jaxlm.metrics import count_params
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build


def time_steps(stepper, state, batch, seconds: float, warmup: int = 3):
    """Run `warmup` steps, then steps for about `seconds`, reading each step's loss one step late
    as the training loop does; (state, seconds per step, timed steps, last loss)."""
    last = None
    for _ in range(warmup):
        state, last = stepper.train(state, batch)
    jax.block_until_ready(last)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        state, metrics = stepper.train(state, batch)
        if last is not None:
            float(last["loss"])  # the previous step's loss: one step late
        last = metrics
        n += 1
    loss = float(last["loss"])
    return state, (time.perf_counter() - t0) / n, n, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, gpu or tpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (parameters stay float32)")
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides, e.g. model.remat=dots")
    a = ap.parse_args()

    cfg = load_config(None, [
        "model.family=gpt2", f"model.d_model={a.d_model}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}",
        f"model.vocab_size={a.vocab}", f"model.max_seq_len={a.seq_len}", "model.bias=false",
        "model.tie_embeddings=true", f"model.dtype={a.dtype}", f"train.seq_len={a.seq_len}",
        f"train.batch_size={a.batch}", "train.steps=1000000", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.grad_clip=0", "mesh.data=1", *a.overrides])
    devices = jax.devices(a.device)[:1]
    mesh = make_mesh(cfg, devices)
    model, tx, schedule = build(cfg, a.vocab, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    rng = np.random.default_rng(0)
    batch_np = {k: rng.integers(0, a.vocab, (a.batch, a.seq_len)).astype(np.int32) for k in ("inputs", "targets")}
    compile_s = stepper.compile(stepper.abstract_state(), {k: v.shape for k, v in batch_np.items()})
    state = stepper.init_state(0)
    batch = stepper.place(batch_np, a.batch)
    params = count_params(stepper.params(state))["total"]

    state, dt, n, _ = time_steps(stepper, state, batch, a.seconds, a.warmup_steps)
    tokens = a.batch * a.seq_len
    flops = 6 * params * tokens + 6 * a.layers * a.d_model * a.seq_len * tokens
    mem = stepper.compiled_memory
    memory = None if mem is None else {k: int(getattr(mem, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
        "generated_code_size_in_bytes")}
    print(json.dumps({"impl": "jaxlm", "kernels": model.cfg.kernels, "attention": model.cfg.attention,
                      "loss_chunk": stepper.loss_chunk, "params": params, "step_s": round(dt, 4),
                      "tokens_per_s": round(tokens / dt, 1), "model_gflops": round(flops / dt / 1e9, 2),
                      "device": a.device, "dtype": a.dtype, "compile_s": round(compile_s, 2), "memory": memory,
                      "steps": n, "jax": jax.__version__}))


if __name__ == "__main__":
    main()
