"""`jaxlm plot`: loss and bits per byte of one or more runs against steps, tokens and FLOPs.

Reads each run's metrics.jsonl and config.yaml. Tokens at step s are (s + 1) x batch x
sequence length; FLOPs are tokens x the training loop's FLOPs per token (6N plus
attention, see `metrics.flops_per_token`), so runs of different sizes share one axis.
Writes loss.png (train and validation loss) and, when validation bits per byte were
logged, bpb.png; every run is one colour on every panel.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlm.config import load_config
from jaxlm.config_checks import check_vocab
from jaxlm.errors import ConfigError
from jaxlm.metrics import flops_per_token, model_param_counts, read_metrics

X_AXES = (("step", "step"), ("tokens", "tokens"), ("flops", "training FLOPs"))


def run_series(run_dir: str) -> dict:
    """{name, train: {step, tokens, flops, loss}, eval: {step, tokens, flops, loss, bpb}} of a run."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    config_path = os.path.join(run_dir, "config.yaml")
    for path in (metrics_path, config_path):
        if not os.path.isfile(path):
            raise ConfigError(f"'{run_dir}' is not a run directory: {os.path.basename(path)} is missing")
    cfg = load_config(config_path)
    records = read_metrics(run_dir)
    per_step = cfg.train.batch_size * cfg.train.seq_len
    fpt = _flops_per_token(run_dir, cfg)
    out = {"name": os.path.basename(os.path.normpath(run_dir)), "flops_per_token": fpt}
    for kind, key in (("train", "loss"), ("eval", "eval_loss")):
        rows = [r for r in records if key in r]
        step = np.array([r["step"] for r in rows], np.float64)
        tokens = (step + 1) * per_step
        out[kind] = {"step": step + 1, "tokens": tokens, "flops": tokens * fpt,
                     "loss": np.array([r[key] for r in rows], np.float64),
                     "bpb": np.array([r.get("eval_bpb", np.nan) for r in rows], np.float64)}
    if not len(out["train"]["step"]) and not len(out["eval"]["step"]):
        raise ConfigError(f"{metrics_path} holds no loss records yet")
    return out


def _flops_per_token(run_dir: str, cfg) -> float:
    """The model's training FLOPs per token, from its abstract parameter shapes (nothing is allocated)."""
    from jaxlm.data.tokenizer import load_tokenizer, run_tokenizer_file

    tok_path = run_tokenizer_file(run_dir)
    if cfg.model.vocab_size:
        vocab = cfg.model.vocab_size
    elif tok_path:
        vocab = check_vocab(cfg, load_tokenizer(tok_path, cfg.data.eos_token, cfg.data.bos_token).vocab_size)
    else:
        raise ConfigError(f"'{run_dir}' has no tokenizer file and its config sets no model.vocab_size")
    return flops_per_token(cfg.model, model_param_counts(cfg.model, vocab), cfg.train.seq_len)


def plot(run_dirs: list[str], out_dir: str) -> list[str]:
    """Draw the figures of `run_dirs` into `out_dir`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run_series(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    figures = [("loss.png", "loss (nats/token)", "loss")]
    if any(np.isfinite(r["eval"]["bpb"]).any() for r in runs):
        figures.append(("bpb.png", "validation bits per byte", "bpb"))
    for filename, ylabel, key in figures:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
        for i, run in enumerate(runs):
            c = colors[i % len(colors)]
            for ax, (x, _) in zip(axes, X_AXES):
                if key == "loss" and len(run["train"]["step"]):
                    ax.plot(run["train"][x], run["train"]["loss"], color=c, lw=1, alpha=0.6,
                            label=f"{run['name']} train")
                ev = run["eval"]
                keep = np.isfinite(ev[key])
                if keep.any():
                    ax.plot(ev[x][keep], ev[key][keep], color=c, ls="--", marker="o", ms=4,
                            label=f"{run['name']} validation")
        for ax, (x, label) in zip(axes, X_AXES):
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            if x != "step":
                ax.set_xscale("log")
        axes[0].set_ylabel(ylabel)
        axes[0].legend(fontsize=8)
        written.append(save_figure(fig, out_dir, filename, dpi=100))
    return written


def save_figure(fig, out_dir: str, name: str, dpi: int) -> str:
    """Lay out `fig`, write it to `out_dir/name`, and free it (a sweep draws many); the path written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
