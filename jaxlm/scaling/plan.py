"""A sweep's plan: every run of a `Sweep`, named, sized and scheduled, with its `jaxlm train` overrides.

With the `wsd` schedule one stable-phase run per size and seed serves every budget: it is the
run of the longest budget, checkpointed (`checkpoint.at`) where each shorter budget's decay
starts, and each shorter budget is a branch (`checkpoint.branch_from`) that continues that
checkpoint with its own schedule, equal to a straight wsd run to its budget.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field

from jaxlm.config import Config, load_config
from jaxlm.errors import ConfigError
from jaxlm.scaling.sweep_file import Size, Sweep, dot_value


@dataclass
class PlannedRun:
    """One run of the plan; plan.json holds these, each with its command."""

    name: str
    size: str
    budget: str
    seed: int
    steps: int
    tokens: int
    lr: float
    warmup: int
    holdout: bool
    isoflop_c: float | None
    kind: str = "straight"  # straight | stable | branch
    branch_of: str = ""
    branch_step: int = 0
    at: list[int] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


def human(x: float) -> str:
    """A count in a run name or a log line: 48000 -> 48k."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _size_config(sweep: Sweep, size: Size) -> tuple[Config, list[str]]:
    """The config of a size and its model.* overrides (µP's base included)."""
    model = [f"model.{k}={dot_value(v)}" for k, v in size.model.items()]
    if sweep.parametrization == "mup":
        model += ["model.parametrization=mup", f"model.mup_base_width={sweep.mup_base[0]}",
                  f"model.mup_base_head_dim={sweep.mup_base[1]}"]
    try:
        return load_config(sweep.base, list(sweep.overrides) + model), model
    except ConfigError as e:
        raise ConfigError(f"sweep size '{size.name}': {e}") from None


def plan(sweep: Sweep) -> list[PlannedRun]:
    """Every run of the sweep, in the order they train: sizes as listed, then seeds; under wsd with
    branching, each size and seed's stable run (its longest budget) before the branches off it."""
    from jaxlm.metrics import flops_per_token_conventions, model_param_counts

    runs = []
    for size in sweep.sizes:
        cfg, model = _size_config(sweep, size)
        tps = cfg.train.batch_size * cfg.train.seq_len
        counts = model_param_counts(cfg.model, cfg.model.vocab_size or cfg.data.tokenizer_vocab)
        flops = flops_per_token_conventions(cfg.model, counts, cfg.train.seq_len)
        budgets = [(f"d{human(d)}", d, None) for d in size.tokens or sweep.tokens]
        if not size.tokens:  # a size with its own token budgets has no IsoFLOP runs
            budgets += [(f"c{c:.2g}".replace("+", ""), c / flops[sweep.isoflop_convention], c) for c in sweep.compute]
        lr = size.lr if size.lr is not None else sweep.lr.lr(counts["non_embedding"])
        for seed in sweep.seeds:
            group = [PlannedRun(name=f"{size.name}-{label}-s{seed}", size=size.name, budget=label, seed=seed,
                                steps=steps, tokens=steps * tps, lr=lr, warmup=0, holdout=size.holdout,
                                isoflop_c=c, counts=counts, flops=flops)
                     for label, steps, c in ((label, max(1, round(d / tps)), c) for label, d, c in budgets)]
            shortest = min(r.steps for r in group)
            for r in group:
                r.warmup = sweep.warmup.steps(shortest if _branching(sweep, cfg) else r.steps,
                                              counts["non_embedding"], tps)
            runs += _arrange(sweep, cfg, group, model)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("sweep budgets give two runs the same name: " + ", ".join(sorted({n for n in names
                                                                                          if names.count(n) > 1})))
    return runs


def _branching(sweep: Sweep, cfg: Config) -> bool:
    return sweep.branch and cfg.optim.schedule == "wsd"


def _arrange(sweep: Sweep, cfg: Config, group: list[PlannedRun], model: list[str]) -> list[PlannedRun]:
    """Order one size and seed's runs and, under wsd, make the longest the stable run the others branch off."""
    from jaxlm.optim import decay_start

    group.sort(key=lambda r: r.steps, reverse=True)
    if _branching(sweep, cfg) and len(group) > 1:
        stable = group[0]
        stable.kind = "stable"
        for r in group[1:]:
            o = dataclasses.replace(cfg.optim, warmup_steps=r.warmup)
            r.kind, r.branch_of, r.branch_step = "branch", stable.name, decay_start(o, r.steps)
            if r.steps == stable.steps or r.branch_step < 1:
                raise ConfigError(f"sweep run {r.name} cannot branch off {stable.name} ({r.steps} and "
                                  f"{stable.steps} steps, decay from step {r.branch_step}): make its budget differ "
                                  f"or set 'branch: false'")
        stable.at = sorted({r.branch_step for r in group[1:]})
    for r in group:
        r.overrides = list(sweep.overrides) + model + _run_keys(sweep, r)
    return group


def run_dir(sweep: Sweep, name: str) -> str:
    """Where a run trains; its log and, after a failed attempt, its error go under <sweep>/logs."""
    return os.path.join(sweep.dir, "runs", name)


def log_path(sweep: Sweep, name: str) -> str:
    return os.path.join(sweep.dir, "logs", f"{name}.log")


def error_path(sweep: Sweep, name: str) -> str:
    return os.path.join(sweep.dir, "logs", f"{name}.error")


def _run_keys(sweep: Sweep, r: PlannedRun) -> list[str]:
    keys = [f"run.name={r.name}", f"run.dir={run_dir(sweep, r.name)}", f"train.steps={r.steps}",
            f"train.seed={r.seed}", f"optim.lr={r.lr:.6g}", f"optim.warmup_steps={r.warmup}",
            f"train.diverge_factor={sweep.diverge_factor:g}", f"checkpoint.every={sweep.resume_every}",
            "run.progress=false"]
    if r.at:
        keys.append(f"checkpoint.at={dot_value(r.at)}")
    if r.kind == "branch":
        keys.append(f"checkpoint.branch_from={os.path.join(run_dir(sweep, r.branch_of), 'checkpoints', str(r.branch_step))}")
    return keys


def run_config(sweep: Sweep, r: PlannedRun) -> Config:
    return load_config(sweep.base, r.overrides)


def command(sweep: Sweep, r: PlannedRun) -> str:
    """The `jaxlm train` command line of a run (what `jaxlm sweep --list` prints)."""
    return shlex.join(["jaxlm", "train"] + ([sweep.base] if sweep.base else []) + r.overrides)


def plan_table(runs: list[PlannedRun]) -> str:
    """The plan as `jaxlm sweep` prints it before training: one aligned row per run."""
    rows = [("run", "N non-emb", "N total", "tokens", "steps", "lr", "warmup", "kind")]
    for r in runs:
        kind = r.kind + (f" of {r.branch_of} at {r.branch_step}" if r.kind == "branch" else "") + (
            " (held out)" if r.holdout else "")
        rows.append((r.name, f"{r.counts['non_embedding']:,}", f"{r.counts['total']:,}", human(r.tokens),
                     str(r.steps), f"{r.lr:.3g}", str(r.warmup), kind))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def mup_note(sweep: Sweep) -> str:
    """One line for the plan of a µP sweep: the base and the width multipliers, and a warning when
    the sizes also differ in depth, which µP (as implemented) does not parametrize."""
    if sweep.parametrization != "mup":
        return ""
    cfg = load_config(sweep.base, list(sweep.overrides))
    models = [dataclasses.replace(cfg.model, **s.model) for s in sweep.sizes]
    width, head_dim = sweep.mup_base
    note = (f"mup: one lr for every size, base width {width} (head dim {head_dim}); m = "
            + ", ".join(f"{s.name} {m.d_model / width:g}" for s, m in zip(sweep.sizes, models)))
    depths = sorted({m.n_layers for m in models})
    if len(depths) > 1:
        note += (f"; the sizes also differ in depth ({depths[0]} to {depths[-1]} layers), which µP does not "
                 f"parametrize here: the lr transfers across width only")
    return note

