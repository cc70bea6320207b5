"""The sweep file (YAML): read, checked and resolved into a `Sweep` once, when it is loaded.

A sweep file names a base experiment and its overrides, the model sizes, the token budgets D
and/or compute budgets C (IsoFLOP profiles), the seeds, a learning-rate rule and a warmup rule
(docs/scaling.md has the full reference). Every mistake is a ConfigError that says what to
change, raised here rather than in the middle of a sweep.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Literal

from omegaconf import OmegaConf

from jaxlm.config import PARAMETRIZATIONS, ModelConfig, load_config
from jaxlm.errors import ConfigError
from jaxlm.metrics import FLOP_CONVENTIONS

SWEEP_KEYS = ("name", "dir", "base", "overrides", "sizes", "shape_rule", "tokens", "compute", "seeds", "lr",
              "warmup", "diverge_factor", "branch", "resume_every", "isoflop_convention", "parametrization",
              "mup_base_width", "mup_base_head_dim")
SIZE_KEYS = ("name", "n", "holdout", "lr", "tokens")
LR_RULE_KEYS = ("rule", "base", "n_ref", "exponent")
WARMUP_KEYS = ("steps", "fraction", "tokens_per_param")
LR_RULE_FORM = ("sweep 'lr' as a rule is {rule: power, base: LR, n_ref: N, exponent: X}: "
                "lr = base * (N_non_embedding / n_ref) ** exponent")
WARMUP_FORM = ("sweep 'warmup' is one of: STEPS, {steps: K}, {fraction: F} (of the run's steps), "
               "{tokens_per_param: K} (K x N_non_embedding tokens)")


@dataclass(frozen=True)
class LrRule:
    """`lr:` of a sweep file: one number for every size (constant), or
    base * (N_non_embedding / n_ref) ** exponent (power)."""

    kind: Literal["constant", "power"]
    base: float
    n_ref: float = 1.0
    exponent: float = 0.0

    def lr(self, n_non_embedding: int) -> float:
        if self.kind == "constant":
            return self.base
        return self.base * (n_non_embedding / self.n_ref) ** self.exponent


@dataclass(frozen=True)
class WarmupRule:
    """`warmup:` of a sweep file: so many steps, a fraction of the run's steps, or so many tokens per
    non-embedding parameter."""

    kind: Literal["steps", "fraction", "tokens_per_param"]
    value: float

    def steps(self, run_steps: int, n_non_embedding: int, tokens_per_step: int) -> int:
        if self.kind == "steps":
            return int(self.value)
        if self.kind == "fraction":
            return int(round(self.value * run_steps))
        return int(round(self.value * n_non_embedding / tokens_per_step))


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
    lr: LrRule
    warmup: WarmupRule
    diverge_factor: float = 1.5
    branch: bool = True
    resume_every: int = 200
    isoflop_convention: str = "6N+attn"
    parametrization: str = "sp"
    mup_base: tuple[int, int] = (0, 0)  # mup: (base width, base head dim) every size's multipliers count from


def load_sweep(path: str, sweep_dir: str | None = None) -> Sweep:
    """Read and check a sweep file (errors say what to change)."""
    raw = _read(path)
    base = _base_file(raw, path)
    overrides = _overrides(raw.get("overrides"), "sweep 'overrides'")
    cfg = load_config(base, overrides)
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    tokens, compute = _numbers(raw.get("tokens"), "tokens"), _numbers(raw.get("compute"), "compute")
    seeds = _numbers(raw.get("seeds", [cfg.train.seed]), "seeds", int)
    convention = str(raw.get("isoflop_convention", "6N+attn"))
    if convention not in FLOP_CONVENTIONS:
        raise ConfigError(f"sweep 'isoflop_convention: {convention}' is not one of {', '.join(FLOP_CONVENTIONS)}")
    factor = float(raw.get("diverge_factor", 1.5))
    if factor <= 1:
        raise ConfigError(f"sweep 'diverge_factor' must be above 1, got {factor}")
    vocab = cfg.model.vocab_size or cfg.data.tokenizer_vocab
    sizes = _sizes(raw.get("sizes"), raw.get("shape_rule") or {}, cfg.model, vocab)
    bare = [s.name for s in sizes if not s.tokens]
    if bare and not tokens and not compute:
        raise ConfigError(f"sweep needs budgets: 'tokens' (token budgets D) and/or 'compute' (IsoFLOP budgets C), "
                          f"or 'tokens' in every size (size '{bare[0]}' has none)")
    lr = lr_rule(raw.get("lr", cfg.optim.lr))
    warmup = warmup_rule(raw.get("warmup", {"steps": cfg.optim.warmup_steps}))
    parametrization = str(raw.get("parametrization", cfg.model.parametrization))
    mup_base = _mup_base(raw, parametrization, lr, sizes, cfg.model)
    return Sweep(name=name, path=os.path.abspath(path), dir=sweep_dir or raw.get("dir") or os.path.join("sweeps", name),
                 base=base, overrides=overrides, sizes=sizes, tokens=tokens, compute=compute, seeds=seeds,
                 lr=lr, warmup=warmup,
                 diverge_factor=factor, branch=bool(raw.get("branch", True)),
                 resume_every=int(raw.get("resume_every", 200)), isoflop_convention=convention,
                 parametrization=parametrization, mup_base=mup_base)


def _read(path: str) -> dict:
    """The sweep file's mapping, with its keys checked."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise ConfigError(f"could not parse sweep file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping (name:, base:, sizes:, tokens:, ...)")
    unknown_keys(raw, SWEEP_KEYS, f"sweep file {path}")
    return raw


def _base_file(raw: dict, path: str) -> str | None:
    """`base:` as given, or relative to the sweep file."""
    base = raw.get("base")
    if base is None:
        return None
    here = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    base = base if os.path.isfile(base) else here if os.path.isfile(here) else None
    if base is None:
        raise ConfigError(f"sweep 'base: {raw['base']}' is not a file (relative to the current directory "
                          f"or to the sweep file)")
    return base


def unknown_keys(keys, known, where: str) -> None:
    """Refuse a key that is not in `known`, naming the closest known one."""
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
        return tuple(f"{k}={dot_value(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return tuple(value)
    raise ConfigError(f"{where} must be a list of 'key=value' strings or a mapping of dotted keys")


def dot_value(v) -> str:
    """A value as the right-hand side of a 'key=value' override."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(dot_value(x) for x in v) + "]"
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


def lr_rule(value) -> LrRule:
    """`lr:` of a sweep file: a positive number or {rule: power, base, n_ref, exponent}."""
    if isinstance(value, dict):
        unknown_keys(value, LR_RULE_KEYS, "sweep 'lr'")
        if value.get("rule") != "power" or not all(k in value for k in LR_RULE_KEYS[1:]):
            raise ConfigError(LR_RULE_FORM)
        try:
            return LrRule("power", float(value["base"]), float(value["n_ref"]), float(value["exponent"]))
        except (TypeError, ValueError):
            raise ConfigError(LR_RULE_FORM) from None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"sweep 'lr' must be a positive number or a rule mapping, got {value!r}")
    return LrRule("constant", float(value))


def warmup_rule(value) -> WarmupRule:
    """`warmup:` of a sweep file: STEPS (an int >= 0) or a mapping of one of WARMUP_KEYS to a number."""
    if isinstance(value, int) and value >= 0:
        return WarmupRule("steps", value)
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(WARMUP_FORM)
    unknown_keys(value, WARMUP_KEYS, "sweep 'warmup'")
    [(kind, amount)] = value.items()
    try:
        return WarmupRule(kind, float(amount))
    except (TypeError, ValueError):
        raise ConfigError(WARMUP_FORM) from None


def _sizes(raw, shape_rule, base_model: ModelConfig, vocab: int) -> tuple[Size, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("sweep 'sizes' must be a non-empty list of mappings, each with a 'name' and model keys "
                          "(d_model, n_layers, n_heads, ...) or a target non-embedding parameter count 'n'")
    model_keys = tuple(f.name for f in dataclasses.fields(ModelConfig))
    sizes, names = [], set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"sweep sizes[{i}] must be a mapping with a 'name'")
        unknown_keys(entry, SIZE_KEYS + model_keys, f"sweep sizes[{i}] ({entry['name']})")
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


def shape_for(target_n: float, rule: dict, model: ModelConfig, vocab: int) -> dict:
    """The (d_model, n_layers, n_heads) whose non-embedding parameter count is closest (in log) to
    `target_n` under the shape rule: d_model = aspect * n_layers rounded to a multiple of head_dim
    (defaults: aspect 32, head_dim 16), n_heads = d_model / head_dim."""
    from jaxlm.metrics import model_param_counts

    unknown_keys(rule, ("aspect", "head_dim"), "sweep 'shape_rule'")
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


def _mup_base(raw: dict, parametrization: str, lr: LrRule, sizes: tuple[Size, ...],
              base_model: ModelConfig) -> tuple[int, int]:
    """(base width, base head dim) of a µP sweep: given, or the first size's. µP is what makes one
    learning rate right for every width, so a µP sweep takes one number for `lr`, and no size its own."""
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"sweep 'parametrization: {parametrization}' is not one of {', '.join(PARAMETRIZATIONS)}")
    if parametrization == "sp":
        extra = [k for k in ("mup_base_width", "mup_base_head_dim") if k in raw]
        if extra:
            raise ConfigError(f"sweep '{extra[0]}' needs 'parametrization: mup'")
        return (0, 0)
    if lr.kind != "constant":
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
