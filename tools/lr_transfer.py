"""Learning-rate transfer across width: the loss against the learning rate at several widths, sp and mup.

    python tools/lr_transfer.py [--widths 64 128 256] [--log2-lrs -10 -9 ... -3] [--seeds 2]
        [--steps 400] [--layers 2] [--head-dim 16] [--family llama] [--out lr_transfer.json]
        [--plot lr_transfer.png] [--run-seeds 1] [--merge a.json b.json]
        [--output-mult 1.0] [--embed-lr-mult 1.0] [--init-std 0.02] [--base-width W]

For each parametrization, width, learning rate and seed it trains a fresh model (one CPU device)
with jaxlm's own train step and optimizer on byte tokens of Tiny Shakespeare (the first 90%; a
synthetic text when the file is missing) and scores the validation loss on fixed windows of the
last 10%. The training batches depend on the seed only, so every width and learning rate of a
seed sees the same tokens; the init does not (every run starts from `train.seed` 0), so a seed
is a data order. Under `mup` (and `mup-zero`: µP with the zero init of the query
and readout) the first width is the base width, and --output-mult, --embed-lr-mult and --init-std
(tuned there by tools/mup_base.py) are carried to every width. A run whose loss is not finite counts as
diverged.

For each parametrization and width the optimum is the vertex of a parabola fitted (least
squares) to the seed-mean validation loss against log2(lr), over the best learning rate and up
to two neighbours on each side; a best learning rate at the edge of the grid is reported as
such. Two processes can share a grid: each trains some of the seeds (`--run-seeds 0`,
`--run-seeds 1`) into its own --out, and `--merge a.json b.json --out all.json` joins them and
reports. Writes every run's loss and the optima as JSON, draws loss against log2(lr) (one panel per
parametrization, one line per width) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coord_check import batch, corpus  # noqa: E402

from jaxlm.config import load_config  # noqa: E402
from jaxlm.sharding import make_mesh  # noqa: E402
from jaxlm.step import Stepper, build  # noqa: E402

VOCAB = 256


def config(args, parametrization: str, width: int, lr: float):
    return load_config(None, [
        f"model.family={args.family}", f"model.d_model={width}", f"model.n_heads={width // args.head_dim}",
        f"model.n_layers={args.layers}", f"model.max_seq_len={args.seq_len}", f"model.kernels={args.kernels}",
        f"model.d_ff={round(args.mlp_ratio * width)}",
        f"model.parametrization={parametrization.split('-')[0]}", f"model.mup_base_width={args.base_width or args.widths[0]}",
        f"model.mup_zero_init={str(parametrization == 'mup-zero').lower()}",
        f"model.mup_output_mult={args.output_mult}", f"model.mup_embed_lr_mult={args.embed_lr_mult}",
        f"model.init_std={args.init_std}", f"train.batch_size={args.batch}",
        f"train.seq_len={args.seq_len}", f"train.steps={args.steps}",
        "mesh.data=1", f"optim.lr={lr}", f"optim.schedule={args.schedule}",
        f"optim.warmup_steps={round(args.warmup * args.steps)}", f"optim.weight_decay={args.weight_decay}",
        f"optim.grad_clip={args.grad_clip}"])


def split(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = int(0.9 * len(tokens))
    return tokens[:cut], tokens[cut:]


def seed_batches(args, train: np.ndarray, seeds) -> dict[int, list[dict]]:
    """Each seed's training batches: the same tokens for every width, learning rate and setting."""
    out = {}
    for s in seeds:
        rng = np.random.default_rng(s)
        out[s] = [batch(train, rng, args.batch, args.seq_len) for _ in range(args.steps)]
    return out


def valid_batches(args, valid: np.ndarray) -> list[dict]:
    """Fixed, non-overlapping windows of the held-out tokens, in batches of the training shape."""
    rows = args.eval_batches * args.batch
    stride = (len(valid) - args.seq_len - 1) // rows
    windows = np.stack([valid[i * stride:i * stride + args.seq_len + 1] for i in range(rows)])
    return [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in np.split(windows, args.eval_batches)]


def one_run(args, parametrization: str, width: int, lr: float, batches: list[dict], valid: list[dict]) -> dict:
    cfg = config(args, parametrization, width, lr)
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, VOCAB, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state = stepper.init_state(cfg.train.seed)
    train_loss = float("nan")
    for b in batches:
        state, metrics = stepper.train(state, stepper.place(b, args.batch))
    train_loss = float(jax.device_get(metrics["loss"]))
    params = stepper.params(state)
    nll = sum(float(np.sum(np.asarray(jax.device_get(stepper.eval_step(params, stepper.place(v, args.batch))),
                                      np.float64))) for v in valid)
    loss = nll / (len(valid) * args.batch * args.seq_len)
    ok = math.isfinite(loss) and math.isfinite(train_loss)
    return {"train_loss": train_loss if ok else None, "valid_loss": loss if ok else None}


def vertex(log2_lrs: list[float], losses: list[float | None]) -> dict:
    """The parabola vertex in log2(lr) over the best point and up to two finite neighbours a side."""
    finite = [(x, y) for x, y in zip(log2_lrs, losses) if y is not None]
    if not finite:
        return {"best_log2_lr": None, "vertex_log2_lr": None, "at_edge": True}
    best = min(range(len(finite)), key=lambda i: finite[i][1])
    near = finite[max(0, best - 2):best + 3]
    out = {"best_log2_lr": finite[best][0], "best_loss": finite[best][1], "vertex_log2_lr": None,
           "at_edge": finite[best][0] in (log2_lrs[0], log2_lrs[-1])}
    if len(near) >= 3:
        a, b, c = np.polyfit([x for x, _ in near], [y for _, y in near], 2)
        v = -b / (2 * a) if a > 0 else None
        if v is not None and near[0][0] <= v <= near[-1][0]:
            out.update(vertex_log2_lr=float(v), vertex_loss=float(c - b * b / (4 * a)))
    return out


def summarize(args, runs: dict) -> dict:
    """{parametrization: {width: {"mean": [per lr], "optimum": vertex(...)}}, "shift": ...}."""
    out = {}
    for par, by_width in runs.items():
        out[par] = {}
        for w, by_lr in by_width.items():
            mean = []
            for lr in args.log2_lrs:
                vals = [r["valid_loss"] for r in by_lr[str(lr)]]
                if sorted(r["seed"] for r in by_lr[str(lr)]) != list(range(args.seeds)):
                    raise SystemExit(f"{par} width {w} lr 2^{lr}: seeds {[r['seed'] for r in by_lr[str(lr)]]} of "
                                     f"{args.seeds}; the grid is not complete")
                mean.append(None if any(v is None for v in vals) else float(np.mean(vals)))
            out[par][w] = {"mean": mean, "optimum": vertex(args.log2_lrs, mean)}
        opts = [out[par][str(w)]["optimum"]["vertex_log2_lr"] for w in args.widths]
        out[par]["shift"] = None if None in opts else max(opts) - min(opts)
    return out


def plot(args, table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pars = list(table)
    fig, axes = plt.subplots(1, len(pars), figsize=(max(4.5 * len(pars), 8.0), 3.6), squeeze=False, sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(args.widths)))
    for ax, par in zip(axes[0], pars):
        for w, color in zip(args.widths, colors):
            t = table[par][str(w)]
            xs = [x for x, y in zip(args.log2_lrs, t["mean"]) if y is not None]
            ax.plot(xs, [y for y in t["mean"] if y is not None], marker="o", color=color, label=f"width {w}")
            v = t["optimum"].get("vertex_log2_lr")
            if v is not None:
                ax.axvline(v, color=color, linestyle=":", linewidth=1)
        ax.set_title(f"{par}: optimum shift {table[par]['shift']:.2f}" if table[par]["shift"] is not None
                     else par, fontsize=9)
        ax.set_xlabel("log2 learning rate")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation loss (nats per byte)")
    finite = [y for par in pars for w in args.widths for y in table[par][str(w)]["mean"] if y is not None]
    axes[0][0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
    tuned = (f", mup alpha_out {args.output_mult:g}, embedding lr x{args.embed_lr_mult:g}"
             if (args.output_mult, args.embed_lr_mult) != (1.0, 1.0) else "")
    tuned += f", init std {args.init_std:g}" if args.init_std != 0.02 else ""
    fig.suptitle(f"learning-rate transfer: {args.family}, {args.layers} layers, head dim {args.head_dim}{tuned},\n"
                 f"{args.steps} steps x {args.batch} x {args.seq_len} tokens, {args.seeds} seeds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120)


def report(args, table: dict) -> str:
    lines = ["parametrization  width  " + " ".join(f"{lr:>7}" for lr in args.log2_lrs) + "   best  vertex"]
    for par in table:
        for w in args.widths:
            t = table[par][str(w)]
            o = t["optimum"]
            cells = " ".join(f"{y:7.4f}" if y is not None else "   diverged"[-7:] for y in t["mean"])
            vtx = f"{o['vertex_log2_lr']:+.2f}" if o.get("vertex_log2_lr") is not None else "  none"
            edge = " (edge)" if o["at_edge"] else ""
            lines.append(f"{par:15}  {w:5}  {cells}  {o['best_log2_lr']:+5}  {vtx}{edge}")
        shift = table[par]["shift"]
        lines.append(f"{par:15}  optimum shift across widths (log2): "
                     + (f"{shift:.2f}" if shift is not None else "undefined (a width has no vertex)"))
    return "\n".join(lines)


SAME = ("widths", "log2_lrs", "seeds", "steps", "batch", "seq_len", "layers", "head_dim", "family", "mlp_ratio",
        "kernels",
        "schedule", "warmup", "weight_decay", "grad_clip", "eval_batches", "output_mult", "embed_lr_mult", "base_width",
        "init_std")
# their values in files written before they existed
NEW_SETTINGS = {"output_mult": 1.0, "embed_lr_mult": 1.0, "base_width": 0, "init_std": 0.02}


def previous_runs(args, path: str) -> dict:
    """The runs already in `path` (an interrupted grid continues), refused when its settings differ."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    differ = [k for k in SAME if old["settings"].get(k, NEW_SETTINGS.get(k)) != vars(args)[k]]
    if differ:
        raise SystemExit(f"{path} holds runs of other settings ({', '.join(differ)}): use another --out")
    return old.get("runs", {})


def merge(args, runs: dict) -> dict:
    """`runs` joined with the runs of every --merge file (a cell's seeds from whichever file has them)."""
    for path in args.merge:
        if not os.path.exists(path):
            raise SystemExit(f"--merge: no such file {path}")
        for par, by_width in previous_runs(args, path).items():
            for w, by_lr in by_width.items():
                for lr, cell in by_lr.items():
                    mine = runs.setdefault(par, {}).setdefault(w, {}).setdefault(lr, [])
                    have = {r["seed"] for r in mine}
                    mine.extend(r for r in cell if r["seed"] not in have)
                    mine.sort(key=lambda r: r["seed"])
    return runs


def parser() -> argparse.ArgumentParser:
    """The grid's and the runs' settings (tools/mup_base.py takes the same)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--log2-lrs", type=int, nargs="+", default=list(range(-10, -2)))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--family", choices=("gpt2", "llama"), default="llama")
    p.add_argument("--mlp-ratio", type=float, default=3.0,
                   help="MLP width / d_model at every width (µP's one m assumes it does not change)")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup steps as a fraction of --steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--parametrizations", nargs="+", default=["sp", "mup"], choices=("sp", "mup", "mup-zero"),
                   help="mup: model.mup_zero_init=false, the default; mup-zero: the query and an untied head "
                        "start at zero (what `mup` meant in files written before the default changed)")
    p.add_argument("--base-width", type=int, default=0,
                   help="mup: model.mup_base_width; 0 = the first of --widths (set it to train only wider models)")
    p.add_argument("--output-mult", type=float, default=1.0, help="mup: model.mup_output_mult (alpha_out)")
    p.add_argument("--embed-lr-mult", type=float, default=1.0, help="mup: model.mup_embed_lr_mult")
    p.add_argument("--init-std", type=float, default=0.02,
                   help="model.init_std: the init std (under mup, at the base width; hidden matrices get / sqrt(m))")
    p.add_argument("--out", default="lr_transfer.json")
    p.add_argument("--plot", default="", help="PNG path of the figure; empty = no figure")
    p.add_argument("--run-seeds", type=int, nargs="+", default=None,
                   help="train only these of the seeds 0..--seeds-1 (another process trains the rest)")
    p.add_argument("--merge", nargs="+", default=[],
                   help="join the runs of these JSON files (same settings) into --out and report; trains nothing")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    run_seeds = list(range(args.seeds)) if args.run_seeds is None else args.run_seeds
    if any(not 0 <= s < args.seeds for s in run_seeds):
        p.error(f"--run-seeds must lie in 0..{args.seeds - 1}")
    if any(w % args.head_dim for w in args.widths):
        p.error(f"every width must be a multiple of --head-dim {args.head_dim}")
    if args.merge:
        runs = merge(args, previous_runs(args, args.out))
        finish(args, runs)
        return
    train, held = split(corpus())
    valid = valid_batches(args, held)
    batches = seed_batches(args, train, run_seeds)
    runs = previous_runs(args, args.out)
    total, done, start = len(args.parametrizations) * len(args.widths) * len(args.log2_lrs) * len(run_seeds), 0, time.time()
    for par in args.parametrizations:
        for w in args.widths:
            for lr in args.log2_lrs:
                cell = runs.setdefault(par, {}).setdefault(str(w), {}).setdefault(str(lr), [])
                for seed in run_seeds:
                    done += 1
                    if any(r["seed"] == seed for r in cell):
                        continue
                    t0 = time.time()
                    r = one_run(args, par, w, 2.0 ** lr, batches[seed], valid)
                    cell.append(dict(r, seed=seed, seconds=round(time.time() - t0, 2)))
                    print(f"[{done}/{total}] {par} width {w} lr 2^{lr} seed {seed}: valid "
                          f"{r['valid_loss'] if r['valid_loss'] is None else round(r['valid_loss'], 4)} "
                          f"({time.time() - t0:.1f} s, {time.time() - start:.0f} s in all)", file=sys.stderr,
                          flush=True)
                    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
                        json.dump({"settings": vars(args), "runs": runs}, f, indent=1)
                    os.replace(args.out + ".tmp", args.out)
    if args.run_seeds is not None:
        print(f"{args.out}: seeds {run_seeds} done; join the other seeds' files with --merge", file=sys.stderr)
        return
    finish(args, runs)


def finish(args, runs: dict) -> None:
    """The table of the complete grid in --out (with every run), the figure, the printed report."""
    missing = [p for p in args.parametrizations if p not in runs]
    if missing:
        raise SystemExit(f"no runs of {', '.join(missing)}")
    table = summarize(args, {par: runs[par] for par in args.parametrizations})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "runs": runs, "table": table}, f, indent=1)
    if args.plot:
        plot(args, table, args.plot)
    print(report(args, table))


if __name__ == "__main__":
    main()
