"""Dropout masks that are a pure function of (train.seed, step, layer, global row, position).

The key of a training step is fold_in(fold_in(key(seed), TAG), step) (`step_key`). The
model folds in the layer and the row's index in the global batch (`row_keys`), then the
site (`ATTN_OUT`, `MLP_OUT`, `PROBS`); attention probabilities fold in the head and the
query position as well, and draw the bits of one query's keys as one 1-D sequence. So a
row's masks do not depend on how the batch is laid out: not on the mesh (jit), not on the
device a row lands on (pmap, which passes each device's global row indices), not on the
microbatch a row falls into, and not on the attention path (the blocked path draws a
prefix of the bits the explicit path draws for a query).

Bits are threefry (`jax.random.bits`, partitionable in this JAX: the values do not depend
on the sharding of the output). Each 32-bit word gives two 16-bit draws, so the rate is
realised as a multiple of 2^-16 (`threshold`) and kept values are scaled by the inverse
of the realised keep probability, which keeps the expectation exact.

Shape suffixes: L layers, B rows, T sequence length, D width, K key/value heads, G query
heads per key/value head, C queries, S keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TAG = 0x44524F50  # "DROP": the dropout stream of (seed, step), apart from the init's key(seed)
ATTN_OUT, MLP_OUT, PROBS = 0, 1, 2  # sites within a layer
_ONE = 1 << 16


def step_key(seed: int, step):
    """The dropout key of a training step: fold_in(fold_in(key(seed), TAG), step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), TAG), step)


def _fold(keys, data):
    """One key folded with each of `data` [n], or each of a batch of keys folded with one datum."""
    if keys.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(keys, data)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def row_keys(key, n_layers: int, rows_B):
    """[L, B] keys: layer l, global row rows_B[b]."""
    layer_L = _fold(key, jnp.arange(n_layers, dtype=jnp.uint32))
    return jax.vmap(lambda k: _fold(k, rows_B.astype(jnp.uint32)))(layer_L)


def site_keys(keys_B, site: int):
    return _fold(keys_B, jnp.uint32(site))


def threshold(rate: float) -> int:
    """A 16-bit draw is dropped when below this: round(rate * 2^16), at most 2^16 - 1."""
    return min(int(round(rate * _ONE)), _ONE - 1)


def keep_scale(rate: float) -> float:
    """1 / the realised keep probability."""
    return _ONE / (_ONE - threshold(rate))


def _bits16(key, shape):
    """uint16 draws of `shape`, two per threefry word along the last axis; a shorter last axis
    gives a prefix of a longer one's draws."""
    *lead, n = shape
    words = jax.random.bits(key, (*lead, (n + 1) // 2), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., n/2, 2]
    return halves.reshape(*lead, 2 * ((n + 1) // 2))[..., :n]


def keep(keys_B, shape, rate: float):
    """bool [B, *shape]: which elements of each row survive (row b drawn from keys_B[b])."""
    return jax.vmap(lambda k: _bits16(k, shape))(keys_B) >= threshold(rate)


def apply(x_B_, keys_B, rate: float):
    """x with each row's dropped elements zeroed and the rest scaled by 1 / keep probability."""
    kept = keep(keys_B, x_B_.shape[1:], rate)
    return jnp.where(kept, x_B_ * jnp.asarray(keep_scale(rate), x_B_.dtype), jnp.zeros((), x_B_.dtype))


def head_keys(keys_B, n_heads: int):
    """[B, N] keys of each row's heads."""
    return jax.vmap(lambda k: _fold(k, jnp.arange(n_heads, dtype=jnp.uint32)))(keys_B)


def probs_keep(heads_BN, kv_heads: int, q0: int, q1: int, s: int, rate: float):
    """bool [B, K, G, C, S]: the surviving attention probabilities of queries q0..q1-1 over
    keys 0..s-1, query head n = k * G + g (the grouped layout of `attention._layout`)."""
    queries = jnp.arange(q0, q1, dtype=jnp.uint32)
    keys_BNC = jax.vmap(jax.vmap(lambda k: _fold(k, queries)))(heads_BN)
    bits = jax.vmap(jax.vmap(jax.vmap(lambda k: _bits16(k, (s,)))))(keys_BNC)  # [B, N, C, S]
    b, n = heads_BN.shape
    return bits.reshape(b, kv_heads, n // kv_heads, q1 - q0, s) >= threshold(rate)
