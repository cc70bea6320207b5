"""Scaling-law sweeps: a sweep file -> a grid of training runs in one directory -> results.csv / .json.

A sweep file (YAML) names a base experiment and its overrides, the model sizes, the token
budgets D and/or compute budgets C (IsoFLOP profiles), the seeds, a learning-rate rule and a
warmup rule (docs/scaling.md has the full reference). `plan` expands it into named runs;
`run_sweep` trains the ones not finished yet, one after the other in this process, so running
the same command again after an interruption finishes the sweep; `write_results` collects
one row per finished run from each run's `run_summary.json`.

With the `wsd` schedule one stable-phase run per size and seed serves every budget: it is the
run of the longest budget, checkpointed (`checkpoint.at`) where each shorter budget's decay
starts, and each shorter budget is a branch (`checkpoint.branch_from`) that continues that
checkpoint with its own schedule, equal to a straight wsd run to its budget.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from jaxlm.config import PARAMETRIZATIONS, Config, ModelConfig, load_config, to_yaml
from jaxlm.errors import ConfigError

SWEEP_KEYS = ("name", "dir", "base", "overrides", "sizes", "shape_rule", "tokens", "compute", "seeds", "lr",
              "warmup", "diverge_factor", "branch", "resume_every", "isoflop_convention", "parametrization",
              "mup_base_width", "mup_base_head_dim")
SIZE_KEYS = ("name", "n", "holdout", "lr", "tokens")
CONVENTIONS = ("6N", "6N+attn", "palm")
RESULT_COLUMNS = ("name", "size", "n_total", "n_non_embedding", "n_embedding", "n_head", "n_matmul", "tokens",
                  "steps", "c_6N", "c_6N+attn", "c_palm", "loss", "loss_lo", "loss_hi", "bpb", "bpb_lo", "bpb_hi",
                  "lr", "seed", "budget", "isoflop_c", "holdout", "wall_s", "status", "kind", "branch_of")
FINISHED = ("done", "diverged", "failed")


@dataclass(frozen=True)
class Size:
    name: str
    model: dict  # model.* keys (without the prefix)
    holdout: bool = False
    lr: float | None = None
    tokens: tuple[float, ...] = ()  # this size's own token budgets (instead of the sweep's)


@dataclass(frozen=True)
class Sweep:
    name: str
    path: str  # the sweep file
    dir: str
    base: str | None
    overrides: tuple[str, ...]
    sizes: tuple[Size, ...]
    tokens: tuple[float, ...]
    compute: tuple[float, ...]
    seeds: tuple[int, ...]
    lr: object  # a number or {"rule": "power", "base", "n_ref", "exponent"}
    warmup: object  # an int (steps) or {"steps"} / {"fraction"} / {"tokens_per_param"}
    diverge_factor: float = 1.5
    branch: bool = True
    resume_every: int = 200
    isoflop_convention: str = "6N+attn"
    parametrization: str = "sp"
    mup_base: tuple[int, int] = (0, 0)  # mup: (base width, base head dim) every size's multipliers count from


@dataclass
class PlannedRun:
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


# -- the sweep file -------------------------------------------------------------------------

def _unknown(keys, known, where: str) -> None:
    for k in keys:
        if k not in known:
            hint = difflib.get_close_matches(str(k), known, n=1)
            raise ConfigError(f"unknown key '{k}' in {where}" + (f"; did you mean '{hint[0]}'?" if hint else "")
                              + f" Known keys: {', '.join(known)}")


def _overrides(value, where: str) -> tuple[str, ...]:
    """`overrides:` as a list of 'key=value' strings or a mapping of dotted keys."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={_dot_value(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return tuple(value)
    raise ConfigError(f"{where} must be a list of 'key=value' strings or a mapping of dotted keys")


def _dot_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_dot_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _numbers(value, key: str, kind=float) -> tuple:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    try:
        out = tuple(kind(float(v)) if kind is int else kind(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"sweep '{key}' must be a number or a list of numbers, got {value!r}") from None
    if any(v <= 0 for v in out) and key != "seeds":
        raise ConfigError(f"sweep '{key}' must be positive, got {list(out)}")
    return out


def _sizes(raw, shape_rule, base_model: ModelConfig, vocab: int) -> tuple[Size, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("sweep 'sizes' must be a non-empty list of mappings, each with a 'name' and model keys "
                          "(d_model, n_layers, n_heads, ...) or a target non-embedding parameter count 'n'")
    model_keys = tuple(f.name for f in dataclasses.fields(ModelConfig))
    sizes, names = [], set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"sweep sizes[{i}] must be a mapping with a 'name'")
        _unknown(entry, SIZE_KEYS + model_keys, f"sweep sizes[{i}] ({entry['name']})")
        name = str(entry["name"])
        if name in names or not name.replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"sweep size name '{name}' is repeated or not made of letters, digits, '_' and '.'")
        names.add(name)
        model = {k: v for k, v in entry.items() if k in model_keys}
        if "n" in entry:
            if model.keys() & {"d_model", "n_layers", "n_heads"}:
                raise ConfigError(f"sweep size '{name}': give either 'n' or d_model/n_layers/n_heads, not both")
            model.update(shape_for(float(entry["n"]), shape_rule, dataclasses.replace(base_model, **model), vocab))
        lr = entry.get("lr")
        same = [o.name for o in sizes if dataclasses.replace(base_model, **o.model) ==
                dataclasses.replace(base_model, **model)]
        if same:
            raise ConfigError(f"sweep sizes '{same[0]}' and '{name}' are the same model {model}"
                              + (" (the shape rule rounds 'n' to whole layers)" if "n" in entry else ""))
        sizes.append(Size(name, model, bool(entry.get("holdout", False)), None if lr is None else float(lr),
                          _numbers(entry.get("tokens"), f"sizes[{i}].tokens")))
    return tuple(sizes)


def load_sweep(path: str, sweep_dir: str | None = None) -> Sweep:
    """Read and check a sweep file (errors say what to change)."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise ConfigError(f"could not parse sweep file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping (name:, base:, sizes:, tokens:, ...)")
    _unknown(raw, SWEEP_KEYS, f"sweep file {path}")
    base = raw.get("base")
    if base is not None:
        here = os.path.join(os.path.dirname(os.path.abspath(path)), base)
        base = base if os.path.isfile(base) else here if os.path.isfile(here) else None
        if base is None:
            raise ConfigError(f"sweep 'base: {raw['base']}' is not a file (relative to the current directory "
                              f"or to the sweep file)")
    overrides = _overrides(raw.get("overrides"), "sweep 'overrides'")
    cfg = load_config(base, overrides)
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    tokens, compute = _numbers(raw.get("tokens"), "tokens"), _numbers(raw.get("compute"), "compute")
    seeds = _numbers(raw.get("seeds", [cfg.train.seed]), "seeds", int)
    convention = str(raw.get("isoflop_convention", "6N+attn"))
    if convention not in CONVENTIONS:
        raise ConfigError(f"sweep 'isoflop_convention: {convention}' is not one of {', '.join(CONVENTIONS)}")
    factor = float(raw.get("diverge_factor", 1.5))
    if factor <= 1:
        raise ConfigError(f"sweep 'diverge_factor' must be above 1, got {factor}")
    vocab = cfg.model.vocab_size or cfg.data.tokenizer_vocab
    sizes = _sizes(raw.get("sizes"), raw.get("shape_rule") or {}, cfg.model, vocab)
    bare = [s.name for s in sizes if not s.tokens]
    if bare and not tokens and not compute:
        raise ConfigError(f"sweep needs budgets: 'tokens' (token budgets D) and/or 'compute' (IsoFLOP budgets C), "
                          f"or 'tokens' in every size (size '{bare[0]}' has none)")
    lr, warmup = raw.get("lr", cfg.optim.lr), raw.get("warmup", {"steps": cfg.optim.warmup_steps})
    _check_rule(lr, warmup)
    parametrization = str(raw.get("parametrization", cfg.model.parametrization))
    mup_base = _mup_base(raw, parametrization, lr, sizes, cfg.model)
    return Sweep(name=name, path=os.path.abspath(path), dir=sweep_dir or raw.get("dir") or os.path.join("sweeps", name),
                 base=base, overrides=overrides, sizes=sizes, tokens=tokens, compute=compute, seeds=seeds,
                 lr=lr, warmup=warmup,
                 diverge_factor=factor, branch=bool(raw.get("branch", True)),
                 resume_every=int(raw.get("resume_every", 200)), isoflop_convention=convention,
                 parametrization=parametrization, mup_base=mup_base)


def _mup_base(raw: dict, parametrization: str, lr, sizes: tuple[Size, ...], base_model: ModelConfig) -> tuple[int, int]:
    """(base width, base head dim) of a µP sweep: given, or the first size's. µP is what makes one
    learning rate right for every width, so a µP sweep takes one number for `lr`, and no size its own."""
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"sweep 'parametrization: {parametrization}' is not one of {', '.join(PARAMETRIZATIONS)}")
    if parametrization == "sp":
        extra = [k for k in ("mup_base_width", "mup_base_head_dim") if k in raw]
        if extra:
            raise ConfigError(f"sweep '{extra[0]}' needs 'parametrization: mup'")
        return (0, 0)
    if isinstance(lr, dict):
        raise ConfigError("a µP sweep ('parametrization: mup') takes one learning rate for every size, tuned at the "
                          "base width (e.g. 'lr: 3.0e-3'), not an lr rule: µP transfers it across width")
    own = [s.name for s in sizes if s.lr is not None]
    if own:
        raise ConfigError(f"a µP sweep takes one learning rate for every size; size '{own[0]}' has its own 'lr'")
    first = dataclasses.replace(base_model, **sizes[0].model)
    width = int(raw.get("mup_base_width", first.d_model))
    head_dim = int(raw.get("mup_base_head_dim", first.head_dim))
    if width <= 0 or head_dim <= 0:
        raise ConfigError(f"sweep 'mup_base_width' and 'mup_base_head_dim' must be positive, got {width}, {head_dim}")
    return (width, head_dim)


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


def _check_rule(lr, warmup) -> None:
    if isinstance(lr, dict):
        _unknown(lr, ("rule", "base", "n_ref", "exponent"), "sweep 'lr'")
        if lr.get("rule") != "power" or not all(k in lr for k in ("base", "n_ref", "exponent")):
            raise ConfigError("sweep 'lr' as a rule is {rule: power, base: LR, n_ref: N, exponent: X}: "
                              "lr = base * (N_non_embedding / n_ref) ** exponent")
    elif not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"sweep 'lr' must be a positive number or a rule mapping, got {lr!r}")
    if isinstance(warmup, int) and warmup >= 0:
        return
    if not isinstance(warmup, dict) or len(warmup) != 1:
        raise ConfigError("sweep 'warmup' is one of: STEPS, {steps: K}, {fraction: F} (of the run's steps), "
                          "{tokens_per_param: K} (K x N_non_embedding tokens)")
    _unknown(warmup, ("steps", "fraction", "tokens_per_param"), "sweep 'warmup'")


# -- shapes, learning rates, warmup -------------------------------------------------------------

def shape_for(target_n: float, rule: dict, model: ModelConfig, vocab: int) -> dict:
    """The (d_model, n_layers, n_heads) whose non-embedding parameter count is closest (in log) to
    `target_n` under the shape rule: d_model = aspect * n_layers rounded to a multiple of head_dim
    (defaults: aspect 32, head_dim 16), n_heads = d_model / head_dim."""
    from jaxlm.metrics import model_param_counts

    _unknown(rule, ("aspect", "head_dim"), "sweep 'shape_rule'")
    aspect, head_dim = float(rule.get("aspect", 32)), int(rule.get("head_dim", 16))
    if target_n <= 0 or aspect <= 0 or head_dim <= 0:
        raise ConfigError(f"sweep size target n={target_n:g} and shape_rule {rule} must be positive")

    def shape(layers: int) -> dict:
        d = head_dim * max(1, round(aspect * layers / head_dim))
        return {"d_model": d, "n_layers": layers, "n_heads": d // head_dim}

    def n_of(layers: int) -> int:
        m = dataclasses.replace(model, n_kv_heads=0, **shape(layers))
        return model_param_counts(m, vocab)["non_embedding"]

    guess = [(abs(math.log(12 * L * shape(L)["d_model"] ** 2 / target_n)), L) for L in range(1, 97)]
    best = min(sorted(guess)[:3], key=lambda g: abs(math.log(n_of(g[1]) / target_n)))[1]
    return shape(best)


def _lr(sweep: Sweep, size: Size, n_non_embedding: int) -> float:
    if size.lr is not None:
        return size.lr
    rule = sweep.lr
    if isinstance(rule, dict):
        return float(rule["base"]) * (n_non_embedding / float(rule["n_ref"])) ** float(rule["exponent"])
    return float(rule)


def _warmup(sweep: Sweep, steps: int, n_non_embedding: int, tokens_per_step: int) -> int:
    w = sweep.warmup
    if isinstance(w, int):
        return w
    if "steps" in w:
        return int(w["steps"])
    if "fraction" in w:
        return int(round(float(w["fraction"]) * steps))
    return int(round(float(w["tokens_per_param"]) * n_non_embedding / tokens_per_step))


def _human(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


# -- the plan -----------------------------------------------------------------------------------

def _size_config(sweep: Sweep, size: Size) -> tuple[Config, list[str]]:
    model = [f"model.{k}={_dot_value(v)}" for k, v in size.model.items()]
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
        budgets = [(f"d{_human(d)}", d, None) for d in size.tokens or sweep.tokens]
        if not size.tokens:  # a size with its own token budgets has no IsoFLOP runs
            budgets += [(f"c{c:.2g}".replace("+", ""), c / flops[sweep.isoflop_convention], c) for c in sweep.compute]
        lr = _lr(sweep, size, counts["non_embedding"])
        for seed in sweep.seeds:
            group = [PlannedRun(name=f"{size.name}-{label}-s{seed}", size=size.name, budget=label, seed=seed,
                                steps=steps, tokens=steps * tps, lr=lr, warmup=0, holdout=size.holdout,
                                isoflop_c=c, counts=counts, flops=flops)
                     for label, steps, c in ((label, max(1, round(d / tps)), c) for label, d, c in budgets)]
            shortest = min(r.steps for r in group)
            for r in group:
                r.warmup = _warmup(sweep, shortest if _branching(sweep, cfg) else r.steps, counts["non_embedding"],
                                   tps)
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
    return os.path.join(sweep.dir, "runs", name)


def _run_keys(sweep: Sweep, r: PlannedRun) -> list[str]:
    keys = [f"run.name={r.name}", f"run.dir={run_dir(sweep, r.name)}", f"train.steps={r.steps}",
            f"train.seed={r.seed}", f"optim.lr={r.lr:.6g}", f"optim.warmup_steps={r.warmup}",
            f"train.diverge_factor={sweep.diverge_factor:g}", f"checkpoint.every={sweep.resume_every}",
            "run.progress=false"]
    if r.at:
        keys.append(f"checkpoint.at={_dot_value(r.at)}")
    if r.kind == "branch":
        keys.append(f"checkpoint.branch_from={os.path.join(run_dir(sweep, r.branch_of), 'checkpoints', str(r.branch_step))}")
    return keys


def run_config(sweep: Sweep, r: PlannedRun) -> Config:
    return load_config(sweep.base, r.overrides)


def command(sweep: Sweep, r: PlannedRun) -> str:
    """The `jaxlm train` command line of a run (what `jaxlm sweep --list` prints)."""
    return shlex.join(["jaxlm", "train"] + ([sweep.base] if sweep.base else []) + r.overrides)


def plan_table(runs: list[PlannedRun]) -> str:
    rows = [("run", "N non-emb", "N total", "tokens", "steps", "lr", "warmup", "kind")]
    for r in runs:
        kind = r.kind + (f" of {r.branch_of} at {r.branch_step}" if r.kind == "branch" else "") + (
            " (held out)" if r.holdout else "")
        rows.append((r.name, f"{r.counts['non_embedding']:,}", f"{r.counts['total']:,}", _human(r.tokens),
                     str(r.steps), f"{r.lr:.3g}", str(r.warmup), kind))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# -- running ------------------------------------------------------------------------------------

def _log_path(sweep: Sweep, name: str) -> str:
    return os.path.join(sweep.dir, "logs", f"{name}.log")


def _error_path(sweep: Sweep, name: str) -> str:
    return os.path.join(sweep.dir, "logs", f"{name}.error")


def run_status(sweep: Sweep, r: PlannedRun) -> str:
    """new, partial (started, not finished), done, diverged, or failed (its last attempt raised)."""
    from jaxlm import summary

    d = run_dir(sweep, r.name)
    s = summary.read(d) if os.path.isdir(d) else None
    if s and s.get("status") in ("done", "diverged"):
        return s["status"]
    if os.path.exists(_error_path(sweep, r.name)):
        return "failed"
    return "partial" if os.path.isdir(d) else "new"


def _flat_yaml(text: str) -> dict:
    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    return dict(walk(OmegaConf.to_container(OmegaConf.create(text))))


def check_drift(sweep: Sweep, runs: list[PlannedRun]) -> None:
    """Refuse to continue a sweep directory whose runs were trained with another config than the file
    now gives them (a finished run would be counted under the new settings). A key the stored config
    lacks is no change when the file gives it its default: a setting added to jaxlm after the run."""
    defaults = _flat_yaml(to_yaml(Config()))
    for r in runs:
        path = os.path.join(run_dir(sweep, r.name), "config.yaml")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            old = _flat_yaml(f.read())
        new = _flat_yaml(to_yaml(run_config(sweep, r)))
        differ = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(old.keys() | new.keys())
                  if old.get(k) != new.get(k) and not (k not in old and new.get(k) == defaults.get(k))]
        if differ:
            raise ConfigError(f"run {r.name} in {sweep.dir} was trained with another config than the sweep file now "
                              f"gives it: {', '.join(differ[:5])}; restore the file, use another --dir, or "
                              f"delete {run_dir(sweep, r.name)}")


def _train(sweep: Sweep, r: PlannedRun) -> str:
    """Train (or resume) one run; its log goes to <sweep>/logs/<run>.log. Returns its status."""
    import jax

    from jaxlm import checkpoint as ckpt
    from jaxlm.errors import DivergedError, JaxlmError
    from jaxlm.train import run as train_run

    d, error = run_dir(sweep, r.name), _error_path(sweep, r.name)
    restart = os.path.isdir(d) and not ckpt.steps(d)  # started, never reached a checkpoint
    os.makedirs(os.path.dirname(error), exist_ok=True)
    with open(_log_path(sweep, r.name), "a", encoding="utf-8") as logf:
        def log(msg: str) -> None:
            logf.write(msg + "\n")
            logf.flush()

        log(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {'restarting' if restart else 'starting'}: {command(sweep, r)}")
        try:
            result = train_run(run_config(sweep, r), restart=restart, handle_signals=True, log=log)
        except DivergedError as e:
            log(f"diverged: {e}")
            return "diverged"
        except JaxlmError as e:
            log(f"failed: {type(e).__name__}: {e}")
            with open(error, "w", encoding="utf-8") as f:
                f.write(f"{type(e).__name__}: {e}\n")
            return "failed"
        finally:
            jax.clear_caches()
    if os.path.exists(error):
        os.remove(error)
    return "stopped" if result.stopped_by_signal else "done"


def _describe_end(sweep: Sweep, r: PlannedRun, status: str, seconds: float) -> str:
    from jaxlm import summary

    s = summary.read(run_dir(sweep, r.name)) or {}
    ev = s.get("last_eval") or {}
    score = f", validation loss {ev['loss']:.4f}" + (f" ({ev['bpb']:.4f} bits/byte)" if "bpb" in ev else "") \
        if status == "done" and "loss" in ev else ""
    why = ""
    if status in ("diverged", "failed"):
        why = f" (see {_log_path(sweep, r.name)})"
    return f"{r.name}: {status} in {seconds:.0f}s{score}{why}"


def run_sweep(sweep: Sweep, only: str | None = None, log=print) -> int:
    """Train every unfinished run (or only `only`), then write results.csv/.json. Returns the exit code."""
    from jaxlm.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_RUNS_FAILED

    runs = plan(sweep)
    by_name = {r.name: r for r in runs}
    if only is not None and only not in by_name:
        hint = difflib.get_close_matches(only, by_name, n=1)
        raise ConfigError(f"sweep has no run '{only}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    check_drift(sweep, runs)
    _write_sweep_files(sweep, runs)
    todo = [r for r in runs if only in (None, r.name)]
    t0 = time.perf_counter()
    for i, r in enumerate(todo, 1):
        status = run_status(sweep, r)
        if status in ("done", "diverged"):
            log(f"[{i}/{len(todo)}] {r.name}: {status} already")
            continue
        source = run_status(sweep, by_name[r.branch_of]) if r.kind == "branch" else ""
        if source in ("diverged", "failed", "new"):
            log(f"[{i}/{len(todo)}] {r.name}: not run, its stable run {r.branch_of} is {source}")
            continue
        log(f"[{i}/{len(todo)}] {r.name}: {'resuming' if status == 'partial' else 'training'} {r.steps} steps "
            f"({_human(r.tokens)} tokens, N={r.counts['non_embedding']:,} non-embedding, lr {r.lr:.3g}"
            + (f", branch of {r.branch_of} at step {r.branch_step}" if r.kind == "branch" else "") + ")")
        start = time.perf_counter()
        status = _train(sweep, r)
        log(f"[{i}/{len(todo)}] " + _describe_end(sweep, r, status, time.perf_counter() - start))
        if status == "stopped":
            write_results(sweep, runs)
            log(f"sweep interrupted after {time.perf_counter() - t0:.0f}s; run the same command again to continue")
            return EXIT_PREEMPTED
    rows = write_results(sweep, runs)
    done = sum(row["status"] == "done" for row in rows)
    status = {r.name: run_status(sweep, r) for r in runs}  # each run's summary read once
    left = [r.name for r in runs if status[r.name] not in ("done", "diverged")]
    log(f"sweep {sweep.name}: {done} of {len(runs)} runs done"
        + "".join(f", {sum(row['status'] == s for row in rows)} {s}" for s in ("diverged", "failed")
                  if any(row["status"] == s for row in rows))
        + (f", {len(left)} not finished" if left else "")
        + f"; results in {os.path.join(sweep.dir, 'results.csv')} ({time.perf_counter() - t0:.0f}s)")
    unfinished = [n for n in left if only in (None, n)
                  and not (by_name[n].kind == "branch" and status[by_name[n].branch_of] == "diverged")]
    if unfinished:  # failed, or a branch not run because its stable run failed: not a finished sweep
        log(f"not finished: {', '.join(unfinished)}; fix the cause (logs/<run>.error) and run the same command "
            "again (exit 1)")
        return EXIT_RUNS_FAILED
    return EXIT_OK


def _write_sweep_files(sweep: Sweep, runs: list[PlannedRun]) -> None:
    os.makedirs(sweep.dir, exist_ok=True)
    with open(sweep.path, encoding="utf-8") as f:
        text = f.read()
    _atomic(os.path.join(sweep.dir, "sweep.yaml"), text)
    _atomic(os.path.join(sweep.dir, "plan.json"), json.dumps(
        {"sweep": sweep.name, "file": sweep.path, "base": sweep.base,
         "runs": [dict(dataclasses.asdict(r), command=command(sweep, r)) for r in runs]}, indent=1))


def _atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# -- results ------------------------------------------------------------------------------------

def result_row(sweep: Sweep, r: PlannedRun) -> dict | None:
    """One results row for a finished run (done, diverged or failed), else None."""
    from jaxlm import summary

    status = run_status(sweep, r)
    if status not in FINISHED:
        return None
    s = summary.read(run_dir(sweep, r.name)) or {}
    counts = s.get("params") or r.counts
    flops = s.get("training_flops") or {}
    ev = (s.get("last_eval") or {}) if status == "done" else {}
    row = {"name": r.name, "size": r.size, "tokens": s.get("tokens", r.tokens), "steps": s.get("steps", 0),
           "lr": r.lr, "seed": r.seed, "budget": r.budget, "isoflop_c": r.isoflop_c if r.isoflop_c else "",
           "holdout": int(r.holdout), "wall_s": round(float(s.get("wall_s", 0.0)), 2), "status": status,
           "kind": r.kind, "branch_of": r.branch_of}
    row.update({f"n_{k}": counts.get(k, "") for k in ("total", "non_embedding", "embedding", "head", "matmul")})
    row.update({f"c_{k}": flops.get(k, "") for k in CONVENTIONS})
    for key in ("loss", "bpb"):
        ci = ev.get(f"{key}_ci95") or ["", ""]
        row.update({key: ev.get(key, ""), f"{key}_lo": ci[0], f"{key}_hi": ci[1]})
    return row


def write_results(sweep: Sweep, runs: list[PlannedRun], directory: str | None = None) -> list[dict]:
    rows = [row for row in (result_row(sweep, r) for r in runs) if row is not None]
    save_results(directory or sweep.dir, rows, {"sweep": sweep.name, "file": sweep.path})
    return rows


def save_results(directory: str, rows: list[dict], about: dict) -> None:
    """results.csv (RESULT_COLUMNS) and results.json ({about..., "runs": rows}) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"results.csv.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, os.path.join(directory, "results.csv"))
    _atomic(os.path.join(directory, "results.json"), json.dumps(dict(about, runs=rows), indent=1))


def read_results(directory: str) -> list[dict]:
    path = os.path.join(directory, "results.json")
    if not os.path.exists(path):
        raise ConfigError(f"'{directory}' holds no results.json: run `jaxlm sweep SWEEP.yaml` (or point at a "
                          f"sweep directory)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["runs"]


# -- rescoring, listing, clusters -----------------------------------------------------------------

def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return "-".join(p for p in keep.split("-") if p)[:60] or "data"


def rescore(sweep_dir: str, source: str, name: str = "", log=print) -> str:
    """Score every finished run's final checkpoint on `source` with the evaluation harness; writes
    <sweep_dir>/rescored/<name>/results.csv/.json (the sweep's rows with this loss and bits per byte),
    which `jaxlm fit` reads like a sweep directory. Returns that directory."""
    from jaxlm.evaluate import evaluate

    rows = [row for row in read_results(sweep_dir) if row["status"] == "done"]
    if not rows:
        raise ConfigError(f"sweep '{sweep_dir}' has no finished run to rescore")
    out_dir = os.path.join(sweep_dir, "rescored", name or _slug(source))
    out = []
    for i, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        rec = evaluate(os.path.join(sweep_dir, "runs", row["name"]), data=source)[-1]
        new = dict(row)
        for key in ("loss", "bpb"):
            ci = rec.get(f"{key}_ci95") or ["", ""]
            new.update({key: rec.get(key, ""), f"{key}_lo": ci[0], f"{key}_hi": ci[1]})
        out.append(new)
        log(f"[{i}/{len(rows)}] {row['name']}: loss {rec['loss']:.4f}"
            + (f" ({rec['bpb']:.4f} bits/byte)" if "bpb" in rec else "") + f" in {time.perf_counter() - t0:.0f}s")
    save_results(out_dir, out, {"sweep_dir": os.path.abspath(sweep_dir), "data": source})
    log(f"rescored {len(out)} runs on {source}: {os.path.join(out_dir, 'results.csv')}")
    return out_dir


def emit_slurm(sweep: Sweep, runs: list[PlannedRun], jaxlm: str = "jaxlm") -> list[str]:
    """Job arrays for a cluster, one task per run, in <sweep>/slurm/: `first.sbatch` trains the runs
    that start from scratch, `branches.sbatch` (after the first array ends) the wsd branches;
    `submit.sh` submits both. Every task runs `jaxlm sweep FILE --dir DIR --run NAME`."""
    out = os.path.join(sweep.dir, "slurm")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    groups = {"first": [r.name for r in runs if r.kind != "branch"],
              "branches": [r.name for r in runs if r.kind == "branch"]}
    paths = []
    for part, names in groups.items():
        if not names:
            continue
        _atomic(os.path.join(out, f"{part}.txt"), "\n".join(names) + "\n")
        script = "\n".join([
            "#!/bin/bash",
            f"#SBATCH --job-name=jaxlm-{sweep.name}-{part}",
            f"#SBATCH --array=0-{len(names) - 1}",
            f"#SBATCH --output={os.path.abspath(out)}/logs/%x-%a.out",
            "#SBATCH --nodes=1",
            "#SBATCH --ntasks=1",
            "# add your cluster's partition, time limit and GPUs here (#SBATCH --gres=gpu:1, ...)",
            "set -euo pipefail",
            f"cd {shlex.quote(os.getcwd())}",
            f"NAME=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {shlex.quote(os.path.abspath(os.path.join(out, part + '.txt')))})",
            f"exec ${{JAXLM:-{jaxlm}}} sweep {shlex.quote(sweep.path)} --dir {shlex.quote(os.path.abspath(sweep.dir))} "
            "--run \"$NAME\"", ""])
        paths.append(os.path.join(out, f"{part}.sbatch"))
        _atomic(paths[-1], script)
    submit = ["#!/bin/bash", "# submit the sweep's job arrays; rerun `jaxlm sweep FILE` afterwards for results.csv",
              "set -euo pipefail", f"cd {shlex.quote(os.path.abspath(out))}", "first=$(sbatch --parsable first.sbatch)",
              "echo \"first array: job $first\""]
    if groups["branches"]:
        submit += ["branches=$(sbatch --parsable --dependency=afterany:$first branches.sbatch)",
                   "echo \"branches array: job $branches (starts when $first has ended)\""]
    paths.append(os.path.join(out, "submit.sh"))
    _atomic(paths[-1], "\n".join(submit) + "\n")
    for p in paths:
        os.chmod(p, 0o755)
    return paths
