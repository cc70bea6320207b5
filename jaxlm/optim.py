"""Optax optimizer: learning-rate schedules with linear warmup, AdamW with a decay mask, clipping,
under model.parametrization=mup the per-leaf lr multipliers of `jaxlm.mup` (docs/mup.md), and Muon.

Muon (`optim.name=muon`) is optax.contrib's pieces, put together here because jaxlm needs its
own choices: the hidden matrices (every kernel of a block) take `scale_by_muon`, whose
Newton-Schulz iteration runs on each matrix as the layer uses it. A q, k or v kernel
[D, N, H] is one D x (N H) matrix, o [N, H, D] one (N H) x D matrix, and a scanned stack's
leading layer axis is a batch axis, so each layer is orthogonalised on its own, never the
flattened stack (`muon_dimensions`). The update is scaled to RMS `optim.muon_rms`
(`scale_by_shape`'s consistent_rms: sqrt(max(fan_in, fan_out)) times it; 0.2 is about AdamW's
update RMS), then the decoupled weight decay under jaxlm's decay mask, then the schedule. The
embeddings, the head, norms and biases take jaxlm's AdamW (with its decay mask) at
`optim.adam_lr` on the same schedule shape. Under µP the AdamW leaves take µP's Adam rules and
the hidden matrices Muon's width rule (`mup.hidden_lr`: 1 / sqrt(m) with the update RMS pinned)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxlm import mup
from jaxlm.config import ModelConfig, OptimConfig


def decay_start(o: OptimConfig, total_steps: int) -> int:
    """The step at which wsd's decay begins (also where a sweep branches a shorter budget off)."""
    return max(o.warmup_steps, int(total_steps * (1 - o.decay_fraction)))


def make_schedule(o: OptimConfig, total_steps: int):
    """step -> learning rate. Warmup is linear from lr/warmup_steps to lr over warmup_steps."""
    warmup = o.warmup_steps
    floor = o.min_lr_ratio
    decay_start_step = decay_start(o, total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
        progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        if o.schedule == "constant":
            factor = 1.0
        elif o.schedule == "cosine":
            factor = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        elif o.schedule == "linear":
            factor = 1 - (1 - floor) * progress
        elif o.schedule == "wsd":
            q = jnp.clip((step - decay_start_step) / max(total_steps - decay_start_step, 1), 0.0, 1.0)
            factor = 1 - (1 - floor) * q
        elif o.schedule == "inverse_sqrt":
            factor = jnp.sqrt(max(warmup, 1) / jnp.maximum(step + 1, max(warmup, 1)))
        else:
            raise ValueError(o.schedule)
        return o.lr * warm * factor

    return schedule


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: matrices, never norms or biases; embeddings optionally."""

    def wants_decay(path, leaf) -> bool:
        name = jax.tree_util.keystr(path)
        if "embed" in name or "head" in name:  # token/position embeddings and the output head
            return decay_embeddings
        return "kernel" in name

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def scale_by_table(m: ModelConfig, o: OptimConfig | None = None) -> optax.GradientTransformation:
    """Each leaf's update times its µP lr multiplier (`mup.table`, built from the update tree, which
    under `optax.partition` holds only that partition's leaves); leaves whose multiplier is 1 are
    passed through untouched."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, k: u if k == 1.0 else u * jnp.asarray(k, u.dtype), updates,
                            mup.lr_multipliers(updates, m, o)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adamw(o: OptimConfig, m: ModelConfig | None, schedule) -> optax.GradientTransformation:
    """optax.adamw with jaxlm's decay mask; with a µP model `m` its chain with eps / m and the µP lr
    multipliers between Adam and the decoupled weight decay: a leaf moves by lr * (adam * k + wd * p),
    so its lr is scaled by k while lr * wd stays."""
    if m is None:
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=lambda p: decay_mask(p, o.decay_embeddings))
    return optax.chain(
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=mup.adam_eps(o.eps, m)),
        scale_by_table(m),
        optax.add_decayed_weights(o.weight_decay, lambda p: decay_mask(p, o.decay_embeddings)),
        optax.scale_by_learning_rate(schedule),
    )


def _keys(path) -> list[str]:
    """A leaf's path as names, without the `value` of a boxed (logically partitioned) parameter."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return keys[:-1] if keys and keys[-1] == "value" else keys


def muon_labels(params):
    """"muon" for the hidden matrices (the kernels of the blocks), "adam" for every other leaf."""

    def label(path, leaf) -> str:
        keys = _keys(path)
        hidden = keys[-1] == "kernel" and (keys[0] == "blocks" or keys[0].startswith("block_"))
        return "muon" if hidden and leaf.ndim >= 2 else "adam"

    return jax.tree_util.tree_map_with_path(label, params)


def muon_dimensions(params):
    """Each hidden matrix's `MuonDimensionNumbers`: its input axes (two for the attention output's
    [N, H, D], else the first), its output axes (the rest), a scanned stack's layer axis left out (a
    batch axis: orthogonalised per layer); None for the AdamW leaves."""
    from optax.contrib import MuonDimensionNumbers

    def dims(path, leaf, label):
        if label != "muon":
            return None
        keys = _keys(path)
        first = 1 if keys[0] == "blocks" else 0
        n_in = 2 if keys[-2] == "o" else 1
        return MuonDimensionNumbers(tuple(range(first, first + n_in)), tuple(range(first + n_in, leaf.ndim)))

    return jax.tree_util.tree_map_with_path(dims, params, muon_labels(params))


def _muon(o: OptimConfig, schedule, total_steps: int, m: ModelConfig | None) -> optax.GradientTransformation:
    """Muon on the hidden matrices, `_adamw` on the rest; `m`: a µP model, or None."""
    from optax.contrib import scale_by_muon
    from optax.contrib._muon import scale_by_shape  # not exported by optax.contrib (optax 0.2.8)

    adam_schedule = make_schedule(dataclasses.replace(o, lr=o.adam_lr or o.lr), total_steps)
    matrices = optax.chain(
        scale_by_muon(beta=o.muon_beta, ns_steps=o.muon_ns_steps, eps=o.eps if m is None else mup.adam_eps(o.eps, m),
                      weight_dimension_numbers=muon_dimensions),
        scale_by_shape(weight_dimension_numbers=muon_dimensions, consistent_rms=o.muon_rms or None),
        *([] if m is None else [scale_by_table(m, o)]),  # the sp chain (and its state tree) as it was
        optax.add_decayed_weights(o.weight_decay, lambda p: decay_mask(p, o.decay_embeddings)),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.partition({"muon": matrices, "adam": _adamw(o, m, adam_schedule)}, muon_labels)


def make_optimizer(o: OptimConfig, total_steps: int, model: ModelConfig | None = None):
    """(optax transformation, schedule); `model` with parametrization=mup adds µP's multipliers."""
    schedule = make_schedule(o, total_steps)
    m = model if model is not None and mup.is_mup(model) else None  # the µP model, or None: no multipliers
    adam = _muon(o, schedule, total_steps, m) if o.name == "muon" else _adamw(o, m, schedule)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(), adam)
    return tx, schedule
