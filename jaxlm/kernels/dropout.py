"""Dropout masks that are a pure function of (train.seed, step, layer, site, global row, position).

The key of a training step is fold_in(fold_in(key(seed), TAG), step) (`step_key`). The
model derives a key for each (layer, site, global row) from it, once for the whole step
(`row_keys`: one threefry hash of the step key and the counter (layer * SITES + site,
row), a fold_in of the pair; sites `ATTN_OUT`, `MLP_OUT`, `PROBS`). Each element's draw
is then a threefry hash of its row's key and the element's own coordinates: (position,
column) for a residual branch [T, D], (head, query, key) for attention probabilities
[N, T, T]. So a row's masks do not depend on how the batch is laid out: not on the mesh
(jit), not on the device a row lands on (pmap, which passes each device's global row
indices), not on the microbatch it falls into, not on the attention path (the blocked
path hashes the coordinates of its query blocks only, and gets the same draws there as
the explicit path), and not on `jax_threefry_partitionable` (no `jax.random.bits` layout
is involved).

The hash is threefry2x32 written out in jnp ops (`threefry2x32`, bit for bit the function
of jax's `threefry2x32` primitive): on the CPU jax lowers that primitive to a while loop
over its rounds, which measured 4-5x slower to compile and to run than the 20 rounds
unrolled into one elementwise fusion; accelerators get the unrolled form from jax anyway.

One hash (two 32-bit words) gives four 16-bit draws, along the last axis. The rate is
realised as a multiple of 2^-16 (`threshold`: 0.1 drops 6554 / 65536 = 0.100006) and
kept values are scaled by the inverse of the realised keep probability, which keeps the
expectation exact.

Shape suffixes: L layers, B rows, T sequence length, D width, N heads, K key/value heads,
G query heads per key/value head, C queries, S keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TAG = 0x44524F50  # "DROP": the dropout stream of (seed, step), apart from the init's key(seed)
ATTN_OUT, MLP_OUT, PROBS = 0, 1, 2  # sites within a layer
SITES = 3
_ONE = 1 << 16


def step_key(seed: int, step):
    """The dropout key of a training step: fold_in(fold_in(key(seed), TAG), step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), TAG), step)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011) of key (k1, k2) and counter (x1, x2),
    uint32 arrays of one shape: the two output words. The same function as
    `jax.extend.random.threefry2x32_p`, unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _hash(keys_X2, hi, lo):
    """threefry2x32 of key data [..., 2] (leading dims X) and counters (hi, lo) that broadcast
    against the dims after X: two uint32 words, each of shape X + those dims."""
    trail = jnp.broadcast_shapes(jnp.shape(hi), jnp.shape(lo))
    shape = keys_X2.shape[:-1] + trail
    k1, k2 = (jnp.broadcast_to(keys_X2[..., i].reshape(keys_X2.shape[:-1] + (1,) * len(trail)), shape)
              for i in (0, 1))
    return threefry2x32(k1, k2, jnp.broadcast_to(jnp.asarray(hi, jnp.uint32), shape),
                        jnp.broadcast_to(jnp.asarray(lo, jnp.uint32), shape))


def row_keys(key, n_layers: int, rows_B):
    """uint32 [L, SITES, B, 2]: the key data of (layer, site, global row rows_B[b])."""
    sites = jnp.arange(n_layers * SITES, dtype=jnp.uint32).reshape(n_layers, SITES, 1)
    w1, w2 = _hash(jax.random.key_data(key), sites, rows_B.astype(jnp.uint32)[None, None, :])
    return jnp.stack([w1, w2], axis=-1)


def threshold(rate: float) -> int:
    """A 16-bit draw is dropped when below this: round(rate * 2^16), at most 2^16 - 1."""
    return min(int(round(rate * _ONE)), _ONE - 1)


def keep_scale(rate: float) -> float:
    """1 / the realised keep probability."""
    return _ONE / (_ONE - threshold(rate))


def _draws(keys_X2, hi, lo, n: int):
    """uint32 [X..., ..., n] of 16-bit draws: each key hashed with counters (hi, lo), 4 draws per
    counter along the last axis (lo counts groups of 4 of that axis; the first n kept)."""
    w1, w2 = _hash(keys_X2, hi, lo)
    draws = jnp.stack([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16], axis=-1)
    return draws.reshape(w1.shape[:-1] + (4 * w1.shape[-1],))[..., :n]


def _iota(n: int, start: int = 0):
    return jnp.arange(start, start + n, dtype=jnp.uint32)


def residual_keep(keys_X2, t: int, d: int, rate: float):
    """bool [X..., T, D]: the surviving elements of residual branches [T, D], one per key
    (e.g. keys [sites, B, 2] of a layer: every site's mask at once)."""
    return _draws(keys_X2, _iota(t)[:, None], _iota(-(-d // 4))[None, :], d) >= threshold(rate)


def apply(x, kept, rate: float):
    """x with the elements `kept` is False for zeroed, the rest scaled by 1 / keep probability."""
    return jnp.where(kept, x * jnp.asarray(keep_scale(rate), x.dtype), jnp.zeros((), x.dtype))


def probs_keep(keys_B2, n_heads: int, kv_heads: int, t: int, q0: int, q1: int, s: int, rate: float):
    """bool [B, K, G, C, S]: the surviving attention probabilities of queries q0..q1-1 over keys
    0..s-1 of a sequence of t, query head n = k * G + g (the grouped layout of
    `attention._layout`). Counters: (head, query * ceil(t / 4) + key // 4)."""
    w = -(-t // 4)
    if t * w >= 2**32:
        raise ValueError(f"attention dropout counts (query, key) pairs in 32 bits: a sequence of {t} is too long")
    lo = _iota(q1 - q0, q0)[:, None] * w + _iota(-(-s // 4))[None, :]  # [C, S/4]
    draws = _draws(keys_B2, _iota(n_heads)[:, None, None], lo[None], s)  # [B, N, C, S]
    return draws.reshape(keys_B2.shape[0], kv_heads, n_heads // kv_heads, q1 - q0, s) >= threshold(rate)
