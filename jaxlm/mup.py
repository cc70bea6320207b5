"""µP (maximal update parametrization) for Adam: one table of per-leaf multipliers.

`model.parametrization=mup` follows the Adam rules of Tensor Programs V (Yang et al. 2022,
Tables 3 and 8, the formulation with an output multiplier), with the width multiplier
m = d_model / model.mup_base_width:

- hidden matrices (attention q, k, v, o; MLP gate, up, down): init std / sqrt(m) (variance / m),
  Adam lr / m;
- embeddings (token table, gpt2's position table, value embeddings): init unchanged, Adam lr times
  model.mup_embed_lr_mult (a constant tuned at the base width, 1 unless set); norms and biases:
  unchanged;
- readout: the logits are multiplied by alpha_out / m in the forward pass; an untied head
  starts at zero (model.mup_zero_init) and keeps Adam's lr; a tied head is the embedding
  table, so it keeps the table's init and lr and only the multiplier applies;
- attention: scores are alpha_attn / head_dim * q.k (instead of q.k / sqrt(head_dim)), with
  alpha_attn = sqrt(base head dim) unless set, so the scale is the standard one at the base
  head dim; the query kernel starts at zero (model.mup_zero_init) and is otherwise a hidden
  matrix. The model multiplies q by alpha_attn / sqrt(head_dim), which every attention
  kernel then scales by 1 / sqrt(head_dim);
- Adam's eps is divided by m for every leaf: under µP every gradient's entries shrink like
  1 / m (the readout multiplier carries 1 / m into the whole backward pass), so eps keeps its
  size relative to them;
- weight decay is decoupled and applied after the lr multiplier, so a hidden leaf moves by
  lr * (adam / m + wd * p): Adam's lr shrinks with width but the decay per step, lr * wd,
  stays what it is at the base width.

Under Muon (optim.name=muon) the embeddings, the head, norms and biases take AdamW and the rules
above. The hidden matrices take Muon, whose update is orthogonal (every singular value the same)
rather than Adam's nearly rank-one one, so its width rule is the spectral one (Yang, Simon and
Bernstein 2023: an update's spectral norm should stay ~ sqrt(fan_out / fan_in)). With
optim.muon_rms > 0 the update's entries have RMS muon_rms at every width, its spectral norm grows
like sqrt(width), and the multiplier is 1 / sqrt(m); with muon_rms = 0 optax's shape scaling
sqrt(max(1, fan_out / fan_in)) already keeps it, and the multiplier is 1 (`hidden_lr`).

Every multiplier is applied in the forward pass or the optimizer, never stored in the
parameters, so checkpoints, resume and init_from see ordinary parameter trees (only the
init is µP's). At m = 1 with zero init off every multiplier is exactly 1 and the program
is the standard one. Under `sp` the table is all ones.

Written by hand: no well-kept JAX library implements µP (microsoft/mup is PyTorch).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from jaxlm.config import ModelConfig, OptimConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """How µP treats one parameter leaf.

    role: embedding, tied (embedding and readout), readout, hidden, query, norm or bias;
    init: multiplier of the leaf's standard init std (0: zero init);
    lr: multiplier of Adam's update, before weight decay and the schedule's lr;
    forward: multiplier the forward pass applies to the leaf's product (the logits of a
    readout, the query of attention), 1 for the others.
    """

    role: str
    init: float
    lr: float
    forward: float


def is_mup(m: ModelConfig) -> bool:
    return m.parametrization == "mup"


def width_mult(m: ModelConfig) -> float:
    """m = d_model / mup_base_width under mup (1 when the base width is 0 = d_model); 1 under sp."""
    if not is_mup(m) or not m.mup_base_width:
        return 1.0
    return m.d_model / m.mup_base_width


def output_mult(m: ModelConfig) -> float:
    """The logits' multiplier, alpha_out / m (1 under sp)."""
    return m.mup_output_mult / width_mult(m) if is_mup(m) else 1.0


def attn_alpha(m: ModelConfig) -> float:
    """alpha_attn: mup_attn_mult, or sqrt of the base head dim."""
    return m.mup_attn_mult or math.sqrt(m.mup_base_head_dim or m.head_dim)


def query_mult(m: ModelConfig) -> float:
    """What q is multiplied by so that kernels scaling by 1/sqrt(H) compute alpha_attn / H * q.k:
    alpha_attn / sqrt(H); exactly 1 at the base head dim with the default alpha (1 under sp)."""
    if not is_mup(m):
        return 1.0
    if not m.mup_attn_mult:  # sqrt(base / H) rather than sqrt(base) / sqrt(H): exactly 1.0 when they agree
        return math.sqrt((m.mup_base_head_dim or m.head_dim) / m.head_dim)
    return m.mup_attn_mult / math.sqrt(m.head_dim)


def hidden_lr(m: ModelConfig, optim: OptimConfig | None = None) -> float:
    """The lr multiplier of the hidden matrices (and the query): 1 / m under AdamW; under Muon
    1 / sqrt(m) when its update RMS is pinned (optim.muon_rms > 0), 1 with optax's shape scaling."""
    w = width_mult(m)
    if optim is None or optim.name != "muon":
        return 1.0 / w
    return 1.0 / math.sqrt(w) if optim.muon_rms > 0 else 1.0


def adam_eps(eps: float, m: ModelConfig) -> float:
    return eps / width_mult(m)


def role(path: tuple[str, ...], m: ModelConfig) -> str:
    """The µP role of the parameter at `path` (its dict keys, e.g. ('blocks', 'attn', 'q', 'kernel'))."""
    leaf = path[-1]
    if leaf == "embedding":
        return "tied" if m.tied else "embedding"
    if path[0] == "pos_embed" or path[0].startswith("value_embed"):
        return "embedding"
    if path[0] == "head" and leaf == "kernel":
        return "readout"
    if any(p.endswith("norm") for p in path):
        return "norm"
    if leaf == "bias":
        return "bias"
    if leaf == "kernel" and len(path) >= 2 and path[-2] == "q":
        return "query"
    if leaf == "kernel":
        return "hidden"
    raise ValueError(f"no µP rule for the parameter {'/'.join(path)}; add its role to jaxlm.mup.role")


def rule(name: str, m: ModelConfig, optim: OptimConfig | None = None) -> Rule:
    """The multipliers of a role under the model's parametrization (and the optimizer: see `hidden_lr`)."""
    if not is_mup(m):
        return Rule(name, 1.0, 1.0, 1.0)
    w = width_mult(m)
    zero = m.mup_zero_init
    if name in ("hidden", "query"):
        init = 0.0 if (name == "query" and zero) else 1.0 / math.sqrt(w)
        return Rule(name, init, hidden_lr(m, optim), query_mult(m) if name == "query" else 1.0)
    if name == "readout":
        return Rule(name, 0.0 if zero else 1.0, 1.0, output_mult(m))
    if name == "tied":
        return Rule(name, 1.0, m.mup_embed_lr_mult, output_mult(m))
    if name == "embedding":
        return Rule(name, 1.0, m.mup_embed_lr_mult, 1.0)
    return Rule(name, 1.0, 1.0, 1.0)


def init_std(m: ModelConfig, name: str, std: float) -> float | None:
    """The init std of a leaf of role `name` whose standard std is `std`; None: zero init."""
    factor = rule(name, m).init
    if factor == 0.0:
        return None
    return std if factor == 1.0 else std * factor


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def table(params, m: ModelConfig, optim: OptimConfig | None = None):
    """The tree of `Rule`s shaped like `params` (real arrays or shapes)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: rule(role(_keys(path), m), m, optim), params)


def lr_multipliers(params, m: ModelConfig, optim: OptimConfig | None = None):
    """The per-leaf lr multipliers (floats) shaped like `params`."""
    return jax.tree.map(lambda r: r.lr, table(params, m, optim))


def describe(params, m: ModelConfig, optim: OptimConfig | None = None) -> list[str]:
    """The plan's µP lines: the width multiplier and scales, then one line per role with its multipliers and
    leaves (the blocks of an unscanned model folded into block_*)."""
    w = width_mult(m)
    lines = [f"parametrization: mup, m = d_model/base = {m.d_model}/{m.mup_base_width or m.d_model} = {w:g}; "
             f"attention scores x alpha_attn/head_dim = {attn_alpha(m):g}/{m.head_dim} (q x {query_mult(m):.4g}); "
             f"logits x alpha_out/m = {output_mult(m):.4g}; Adam eps = optim.eps/{w:g}; "
             f"embedding lr x{m.mup_embed_lr_mult:g}; weight decay lr*wd kept; zero init of query and untied "
             f"readout {'on' if m.mup_zero_init else 'off'}"]
    if optim is not None and optim.name == "muon":
        lines[0] += (f"; Muon on the hidden matrices: lr x{hidden_lr(m, optim):.4g} "
                     + ("(1/sqrt(m), update RMS pinned)" if optim.muon_rms > 0 else "(shape scaling, lr x1)"))
    roles: dict[Rule, list[str]] = {}
    for path, r in jax.tree_util.tree_leaves_with_path(table(params, m, optim)):
        name = "/".join("block_*" if k.startswith("block_") else k for k in _keys(path))
        if name not in roles.setdefault(r, []):
            roles[r].append(name)
    for r, names in roles.items():
        init = "zero" if r.init == 0 else f"x{r.init:.4g}"
        lines.append(f"  mup {r.role:<9} init std {init:<7} lr x{r.lr:<7.4g} forward x{r.forward:<7.4g} "
                     + ", ".join(names))
    return lines
