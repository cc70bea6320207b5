"""Coordinate check: activation scales against width under sp and mup, a few Adam steps in.

    python tools/coord_check.py [--widths 64 128 256 512] [--head-dim 16] [--layers 2] [--steps 10]
        [--seeds 5] [--lr 0.004] [--family gpt2] [--out coord_check.json] [--plot coord_check.png]

For each parametrization, width and seed it trains a fresh model (one CPU device, layers not
scanned, the first width as µP's base width) with jaxlm's own train step and optimizer, and
before each step records the mean |x| over a fixed batch of:

- the embedding output (token plus position embedding);
- each block's attention scores (causal entries, with the model's scale), attention output and
  MLP output (the residual branches before they are added);
- the logits.

The data are byte tokens (vocabulary 256) of Tiny Shakespeare (the copy the quickstart ships,
experiments/data/tinyshakespeare.txt), so every machine checks on the same text. For each tensor and step it fits the slope of
log2(mean |x|) (the mean over seeds) against log2(width): about 0 when the scale does not grow
with width (µP's promise), about +1 when it grows in proportion (sp's updates). Writes the
values and slopes as JSON, draws one row of panels per parametrization (scale against width, one
line per step) and prints the slopes of steps >= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import mup
from jaxlm.config import load_config
from jaxlm.model import rope
from jaxlm.optim import muon_labels
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build

VOCAB = 256


TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "data", "tinyshakespeare.txt")


def corpus() -> np.ndarray:
    """Byte tokens of the quickstart's Tiny Shakespeare."""
    with open(TEXT, "rb") as f:
        return np.frombuffer(f.read(), np.uint8).astype(np.int32)


def batch(tokens: np.ndarray, rng: np.random.Generator, rows: int, length: int) -> dict:
    starts = rng.integers(0, len(tokens) - length - 1, rows)
    windows = np.stack([tokens[s:s + length + 1] for s in starts])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def config(args, parametrization: str, width: int, seed: int = 0):
    return load_config(None, [
        f"model.family={args.family}", f"model.d_model={width}", f"model.n_heads={width // args.head_dim}",
        f"model.n_layers={args.layers}", f"model.max_seq_len={args.seq_len}", "model.scan_layers=false",
        "model.kernels=standard", f"model.parametrization={parametrization}", f"model.mup_base_width={args.widths[0]}",
        f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}", f"train.seed={seed}", "mesh.data=1",
        f"model.mup_zero_init={str(args.zero_init).lower()}", f"optim.name={args.optimizer}",
        f"optim.muon_rms={args.muon_rms}", f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0",
        f"optim.weight_decay={args.weight_decay}", f"optim.grad_clip={args.grad_clip}", "train.loss_chunk=0"])


def _scores(q_BTNH, k_BTKH, m, positions_BT):
    """The attention scores [B, N, T, T] as the model's attention computes them (before the causal mask)."""
    if m.family == "llama":
        q_BTNH, k_BTKH = rope(q_BTNH, positions_BT, m.rope_theta), rope(k_BTKH, positions_BT, m.rope_theta)
    k_BTNH = jnp.repeat(k_BTKH, q_BTNH.shape[2] // k_BTKH.shape[2], axis=2)
    return jnp.einsum("btnh,bsnh->bnts", q_BTNH * mup.query_mult(m), k_BTNH) / np.sqrt(m.head_dim)


def _mean_abs(name: str, x):
    """mean |x|; over the causal entries for attention scores."""
    if not name.endswith("attn_scores"):
        return jnp.mean(jnp.abs(x))
    t = x.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return jnp.sum(jnp.where(causal, jnp.abs(x), 0.0)) / (x.shape[0] * x.shape[1] * causal.sum())


def measure_fn(model):
    """(tensors, measure): jitted (params, tokens) -> {tensor name: x}, and (params, tokens, base) ->
    {tensor name: mean |x - base[name]|} (base None: mean |x|)."""
    m = model.cfg

    def tensors(params, tokens_BT):
        logits, state = model.apply({"params": params}, tokens_BT, capture_intermediates=True,
                                    mutable=["intermediates"])
        inter = state["intermediates"]
        positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x = jnp.take(params["embed"]["embedding"], tokens_BT, axis=0)
        if m.family == "gpt2":
            x = x + jnp.take(params["pos_embed"], positions_BT, axis=0)
        out = {"embedding": x}
        for i in range(m.n_layers):
            b = inter[f"block_{i}"]
            q, k = b["attn"]["q"]["__call__"][0], b["attn"]["k"]["__call__"][0]
            out[f"block{i}.attn_scores"] = _scores(q, k, m, positions_BT)
            out[f"block{i}.attn_out"] = b["attn"]["__call__"][0][0]
            out[f"block{i}.mlp_out"] = b["mlp"]["__call__"][0]
        out["logits"] = logits
        return out

    def measure(params, tokens_BT, base):
        return {name: _mean_abs(name, x if base is None else x - base[name])
                for name, x in tensors(params, tokens_BT).items()}

    return jax.jit(tensors), jax.jit(measure)


def setup(args, parametrization: str, width: int):
    """(stepper, measure) of one width: compiled once, trained from each seed's init."""
    cfg = config(args, parametrization, width, 0)
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, VOCAB, mesh)
    return Stepper(cfg, model, tx, schedule, mesh), measure_fn(model)


def one_run(args, stepper, measure, seed: int, tokens: np.ndarray) -> dict[str, list[float]]:
    """{tensor: [mean |x| before step 0, 1, ...], "loss": [loss of the last step]} of one training run
    (with --delta the mean |x(params) - x(params with the hidden matrices at their init)|, 0 before step 0)."""
    tensors, measure = measure
    state = stepper.init_state(seed)
    probe = jnp.asarray(batch(tokens, np.random.default_rng(10_000 + seed), args.batch, args.seq_len)["inputs"])
    init = jax.device_get(stepper.params(state))  # a copy: the train step donates the state's buffers
    hidden = muon_labels(init)
    rng = np.random.default_rng(seed)
    series: dict[str, list[float]] = {}
    for _ in range(args.steps):
        params = stepper.params(state)
        base = None
        if args.delta:  # the same params with every hidden matrix put back: what their updates contributed
            base = tensors(jax.tree.map(lambda p, p0, label: p0 if label == "muon" else p, params, init, hidden),
                           probe)
        for name, v in jax.device_get(measure(params, probe, base)).items():
            series.setdefault(name, []).append(float(v))
        state, metrics = stepper.train(state, stepper.place(batch(tokens, rng, args.batch, args.seq_len),
                                                            args.batch))
    series["loss"] = [float(jax.device_get(metrics["loss"]))]
    return series


def slope(widths, values) -> float | None:
    """Least-squares slope of log2(value) against log2(width); None when a value is 0 (zero init)."""
    v = np.asarray(values, np.float64)
    if np.any(v <= 0):
        return None
    return float(np.polyfit(np.log2(widths), np.log2(v), 1)[0])


def summarize(args, runs: dict) -> dict:
    """{parametrization: {tensor: {"mean": [[per step] per width], "slope": [per step]}}}."""
    out = {}
    for p, by_width in runs.items():
        names = sorted((n for n in by_width[args.widths[0]][0] if n != "loss"),  # embedding, blocks, logits
                       key=lambda n: (n != "embedding", n == "logits", n))
        out[p] = {}
        for n in names:
            mean = [np.mean([run[n] for run in by_width[w]], axis=0).tolist() for w in args.widths]
            out[p][n] = {"mean": mean, "slope": [slope(args.widths, [mean[i][s] for i in range(len(args.widths))])
                                                 for s in range(args.steps)]}
        out[p]["final_loss"] = {str(w): float(np.mean([run["loss"][0] for run in by_width[w]])) for w in args.widths}
    return out


def plot(args, table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(table)
    names = [n for n in table[params[0]] if n != "final_loss"]
    fig, axes = plt.subplots(len(params), len(names), figsize=(2.6 * len(names), 2.6 * len(params)), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 1, args.steps))
    for r, p in enumerate(params):
        for c, n in enumerate(names):
            ax = axes[r][c]
            mean = np.asarray(table[p][n]["mean"])
            for s in range(args.steps):
                ax.plot(args.widths, mean[:, s], color=colors[s], marker=".", label=f"step {s}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{p}: {n}", fontsize=8)
            ax.tick_params(labelsize=6)
            if r == len(params) - 1:
                ax.set_xlabel("width", fontsize=7)
    axes[0][0].legend(fontsize=5)
    fig.suptitle(f"coordinate check: mean |x| against width, {args.family}, lr {args.lr}, {args.seeds} seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                   help="muon: the hidden matrices take Muon (optim.lr), the rest AdamW at the same lr")
    p.add_argument("--muon-rms", type=float, default=0.2, help="optim.muon_rms (0: optax's shape scaling)")
    p.add_argument("--zero-init", action="store_true", help="model.mup_zero_init=true (query and untied head)")
    p.add_argument("--delta", action="store_true",
                   help="record what the hidden matrices' updates contributed, mean |x(params) - x(params with "
                        "the hidden matrices at their init)|, not mean |x|: it sees their lr's width rule, which "
                        "mean |x| does not while the init and the embeddings' updates dominate")
    p.add_argument("--parametrizations", nargs="+", default=["sp", "mup"])
    p.add_argument("--out", default="coord_check.json")
    p.add_argument("--plot", default="", help="PNG path of the panels; empty = no figure")
    return p


def run(args) -> dict:
    """Train every parametrization and width from every seed; the summarized table."""
    if any(w % args.head_dim for w in args.widths):
        raise SystemExit(f"every width must be a multiple of --head-dim {args.head_dim}")
    tokens = corpus()
    runs = {}
    for par in args.parametrizations:
        runs[par] = {}
        for w in args.widths:
            stepper, measure = setup(args, par, w)
            runs[par][w] = [one_run(args, stepper, measure, seed, tokens) for seed in range(args.seeds)]
            print(f"{par} width {w}: loss after {args.steps} steps "
                  f"{np.mean([r['loss'][0] for r in runs[par][w]]):.3f}", file=sys.stderr, flush=True)
    return summarize(args, runs)


def later_slopes(table: dict, first_step: int = 2) -> dict[str, dict[str, list[float]]]:
    """{parametrization: {tensor: the slopes of steps >= first_step}} (zero-valued steps left out)."""
    return {par: {n: [s for s in t["slope"][first_step:] if s is not None] for n, t in tensors.items()
                  if n != "final_loss"} for par, tensors in table.items()}


def main() -> None:
    args = parser().parse_args()
    table = run(args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "table": table}, f, indent=1)
    if args.plot:
        plot(args, table, args.plot)
    for par, tensors in later_slopes(table).items():
        for n, later in tensors.items():
            print(f"{par:4} {n:18} log2 slope per width doubling, steps >= 2: "
                  + " ".join(f"{s:+.2f}" for s in later) + (f"  (max |.| {max(map(abs, later)):.2f})" if later else ""))


if __name__ == "__main__":
    main()
