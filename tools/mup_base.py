"""µP's base-width hyperparameters: alpha_out, the embedding lr multiplier and the init std, tuned at the base width.

    python tools/mup_base.py [--width 64] [--output-mults 0.25 0.5 1 2 4 8] [--embed-lr-mults 0.25 1 4 16]
        [--init-stds 0.005 0.01] [--log2-lrs -9 -8 -7] [--seeds 2] [--steps 400] [--out mup_base.json]
        (and every model and training setting of tools/lr_transfer.py)

µP carries a model's hyperparameters from its base width to every wider model unchanged, so the
ones that are not the learning rate are worth tuning where runs are cheap. This tool trains µP
models at the base width (m = 1, where µP is the standard model with alpha_out on the logits and
the embedding tables' lr times the multiplier) with the runs of tools/lr_transfer.py (same data,
batches, schedule and validation windows) and searches one coordinate at a time:

1. alpha_out (model.mup_output_mult) over --output-mults, embedding multiplier 1;
2. the embedding lr multiplier (model.mup_embed_lr_mult) over --embed-lr-mults, at the best alpha_out;
3. with --init-stds, the init std (model.init_std, which µP divides by sqrt(m) for the hidden
   matrices of wider models) at the best pair; --init-std is the one stages 1 and 2 use.

A pair's score is its best seed-mean validation loss over --log2-lrs (the lr is tuned with it; a
best lr at the edge of that grid is flagged). The runs go to --out as they finish, so an interrupted
search continues where it stopped. It prints both tables and the values to carry: the overrides
for a run's config, and the --output-mult / --embed-lr-mult of tools/lr_transfer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lr_transfer  # noqa: E402

# the settings every run of one --out must share (the grid's own lists may grow)
SAME = tuple(k for k in lr_transfer.SAME
             if k not in ("widths", "log2_lrs", "output_mult", "embed_lr_mult", "base_width"))


def parser():
    p = lr_transfer.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--width", type=int, default=64, help="the base width (model.mup_base_width)")
    p.add_argument("--output-mults", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    p.add_argument("--embed-lr-mults", type=float, nargs="+", default=[0.25, 1.0, 4.0, 16.0])
    p.add_argument("--init-stds", type=float, nargs="*", default=[],
                   help="stage 3: init stds to try at the best pair (none: skip it)")
    p.set_defaults(log2_lrs=[-9, -8, -7], out="mup_base.json")
    return p


def key(alpha: float, embed: float, lr: int, init: float | None = None) -> str:
    """A cell's name in --out; `init` only where it is not the file's own --init-std."""
    return f"{alpha:g}/{embed:g}/{lr}" + ("" if init is None else f"/init{init:g}")


def load(args) -> dict:
    if not os.path.exists(args.out):
        return {}
    with open(args.out, encoding="utf-8") as f:
        old = json.load(f)
    differ = [k for k in SAME if old["settings"].get(k, lr_transfer.NEW_SETTINGS.get(k)) != vars(args)[k]]
    if differ:
        raise SystemExit(f"{args.out} holds runs of other settings ({', '.join(differ)}): use another --out")
    return old["runs"]


def _init(args, init: float | None) -> float | None:
    """`init` as a cell's key names it: None for the file's own --init-std."""
    return None if init is None or init == args.init_std else init


def score(args, runs: dict, alpha: float, embed: float, init: float | None = None) -> dict:
    """The pair's seed-mean loss at each lr, its best, and whether the best lr is at the grid's edge."""
    mean = []
    for lr in args.log2_lrs:
        vals = [r["valid_loss"] for r in runs.get(key(alpha, embed, lr, _init(args, init)), [])]
        mean.append(None if len(vals) < args.seeds or None in vals else float(np.mean(vals)))
    finite = [(lr, y) for lr, y in zip(args.log2_lrs, mean) if y is not None]
    if not finite:
        return {"mean": mean, "best_loss": None, "best_log2_lr": None, "at_edge": False}
    lr, y = min(finite, key=lambda t: t[1])
    return {"mean": mean, "best_loss": y, "best_log2_lr": lr,
            "at_edge": len(args.log2_lrs) > 1 and lr in (min(args.log2_lrs), max(args.log2_lrs))}


def train_pair(args, runs, alpha, embed, batches, valid, progress, init: float | None = None) -> None:
    init = _init(args, init)
    run_args = argparse.Namespace(**{**vars(args), "output_mult": alpha, "embed_lr_mult": embed,
                                     "init_std": args.init_std if init is None else init})
    for lr in args.log2_lrs:
        cell = runs.setdefault(key(alpha, embed, lr, init), [])
        for seed in range(args.seeds):
            progress[0] += 1
            if any(r["seed"] == seed for r in cell):
                continue
            t0 = time.time()
            r = lr_transfer.one_run(run_args, "mup", args.width, 2.0 ** lr, batches[seed], valid)
            cell.append(dict(r, seed=seed, seconds=round(time.time() - t0, 2)))
            loss = r["valid_loss"]
            print(f"[{progress[0]}/{progress[1]}] alpha_out {alpha:g} embed lr x{embed:g} init "
                  f"{run_args.init_std:g} lr 2^{lr} seed {seed}: "
                  f"valid {'diverged' if loss is None else round(loss, 4)} ({time.time() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
            with open(args.out + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"settings": vars(args), "runs": runs}, f, indent=1)
            os.replace(args.out + ".tmp", args.out)


def best(rows: dict) -> float:
    scored = {v: s["best_loss"] for v, s in rows.items() if s["best_loss"] is not None}
    if not scored:
        raise SystemExit("every run diverged: try lower --log2-lrs")
    return min(scored, key=scored.get)


def table(title: str, args, rows: dict) -> str:
    lines = [title, f"{'':>14}  " + " ".join(f"{f'2^{lr}':>7}" for lr in args.log2_lrs) + "     best"]
    for v, s in rows.items():
        cells = " ".join(f"{y:7.4f}" if y is not None else "diverged"[:7] for y in s["mean"])
        edge = " (lr at the grid's edge)" if s["at_edge"] else ""
        lines.append(f"{v:>14g}  {cells}  {s['best_loss']:.4f}{edge}" if s["best_loss"] is not None
                     else f"{v:>14g}  {cells}  diverged")
    return "\n".join(lines)


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.width % args.head_dim:
        p.error(f"--width must be a multiple of --head-dim {args.head_dim}")
    if 1.0 not in args.embed_lr_mults:
        args.embed_lr_mults = [1.0] + args.embed_lr_mults  # stage 2 compares with stage 1's pair
    args.widths, args.parametrizations = [args.width], ["mup"]
    train, held = lr_transfer.split(lr_transfer.corpus())
    valid = lr_transfer.valid_batches(args, held)
    batches = lr_transfer.seed_batches(args, train, range(args.seeds))  # lr_transfer's, seed for seed
    runs = load(args)
    per_pair = len(args.log2_lrs) * args.seeds
    inits = [i for i in args.init_stds if i != args.init_std]
    progress = [0, per_pair * (len(args.output_mults) + len(args.embed_lr_mults) - 1 + len(inits))]
    for alpha in args.output_mults:
        train_pair(args, runs, alpha, 1.0, batches, valid, progress)
    stage1 = {a: score(args, runs, a, 1.0) for a in args.output_mults}
    alpha = best(stage1)
    for embed in args.embed_lr_mults:
        if embed != 1.0:
            train_pair(args, runs, alpha, embed, batches, valid, progress)
    stage2 = {e: score(args, runs, alpha, e) for e in args.embed_lr_mults}
    embed = best(stage2)
    for init in inits:
        train_pair(args, runs, alpha, embed, batches, valid, progress, init)
    stage3 = {i: score(args, runs, alpha, embed, i) for i in [args.init_std] + inits}
    init = best(stage3)
    chosen = {"mup_output_mult": alpha, "mup_embed_lr_mult": embed, "init_std": init,
              "best_loss": stage3[init]["best_loss"], "best_log2_lr": stage3[init]["best_log2_lr"],
              "default_loss": stage1.get(1.0, {}).get("best_loss")}
    args.output_mult, args.embed_lr_mult = alpha, embed
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "runs": runs, "stage1": {f"{a:g}": s for a, s in stage1.items()},
                   "stage2": {f"{e:g}": s for e, s in stage2.items()},
                   "stage3": {f"{i:g}": s for i, s in stage3.items()}, "chosen": chosen}, f, indent=1)
    print(f"base width {args.width}, {args.steps} steps, seed-mean validation loss (nats per byte), "
          f"{args.seeds} seeds")
    print(table("alpha_out (embedding lr x1), against the lr:", args, stage1))
    print(table(f"embedding lr multiplier (alpha_out {alpha:g}), against the lr:", args, stage2))
    if inits:
        print(table(f"init std (alpha_out {alpha:g}, embedding lr x{embed:g}), against the lr:", args, stage3))
    print(f"carry to every width: model.mup_output_mult={alpha:g} model.mup_embed_lr_mult={embed:g} "
          f"model.init_std={init:g} (tools/lr_transfer.py --output-mult {alpha:g} --embed-lr-mult {embed:g} "
          f"--init-std {init:g}); best lr 2^"
          f"{chosen['best_log2_lr']}, loss {chosen['best_loss']:.4f}"
          + (f" against {chosen['default_loss']:.4f} with both 1" if chosen["default_loss"] is not None else ""))


if __name__ == "__main__":
    main()
