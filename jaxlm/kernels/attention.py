"""Causal self-attention for training: query blocks that skip the masked half, and a VJP
that keeps only the probabilities.

`jax.nn.dot_product_attention` (its XLA path) scores every query against every key and
masks the upper triangle afterwards, and autodiff keeps several [B, N, T, T] temporaries
for the backward pass. Here the sequence is cut into `blocks` query blocks; block i
scores only keys 0 .. (i+1)C-1, so with n blocks (n+1)/2n of the full work is done (5/8
for 4 blocks). The backward pass is written out: from the saved probabilities P and
output O it forms dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K and
dK = dS^T Q, the standard identities (as in FlashAttention's backward pass).

`dropped_causal_attention` is the same kernel with attention-probability dropout: O = P' V
for P' = keep * P / (keep probability), the masks given per query block (`dropout.probs_keep`);
the backward pass uses P' for dV and keep * (dO V^T) / (keep probability) as dP.

Inputs are [B, T, heads, head_dim] like jax.nn.dot_product_attention; grouped-query
attention (fewer key/value heads) shares each key/value head among n_heads / kv_heads
query heads. Segment ids (packed documents) restrict attention to the same document.

Shape suffixes: B batch, T queries, S keys, K key/value heads, G query heads per key/value
head, C block length, H head dimension.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.kernels.dots import einsum, stash, unstash


def n_blocks(seq_len: int, block: int = 0) -> int:
    """Query blocks of at least `block` positions that divide `seq_len` (1 = no split).

    block 0 picks a quarter of the sequence, at least 16 and at most 256 positions: four
    blocks measured fastest on CPU for T = 128, 256 and 1024 (fewer waste masked work, more
    make the products too small to run well)."""
    if block <= 0:
        block = min(max(seq_len // 4, 16), 256)
    n = max(seq_len // block, 1)
    while seq_len % n:
        n -= 1
    return n


def _layout(q_BTNH, k_BTKH, v_BTKH):
    """[B, T, N, H] -> q [B, K, G, T, H]; k, v [B, K, S, H]."""
    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    q = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    k = k_BTKH.transpose(0, 2, 1, 3)
    v = v_BTKH.transpose(0, 2, 1, 3)
    return q, k, v


def _mask(i: int, c: int, s: int, seg_BT):
    """Allowed (query, key) pairs of query block i over keys 0..s-1: [1 or B, 1, 1, C, S]."""
    q_pos = i * c + np.arange(c)
    allowed = jnp.asarray(q_pos[:, None] >= np.arange(s)[None, :])[None, None, None]
    if seg_BT is not None:
        same = seg_BT[:, i * c:(i + 1) * c, None] == seg_BT[:, None, :s]
        allowed = allowed & same[:, None, None]
    return allowed


def _forward(q_BTNH, k_BTKH, v_BTKH, seg_BT, blocks: int, keeps=None, scale: float = 1.0):
    """keeps: None, or each block's surviving probabilities (bool [B, K, G, C, S]), kept ones
    multiplied by `scale` (attention-probability dropout)."""
    q, k, v = _layout(q_BTNH, k_BTKH, v_BTKH)
    t, h = q.shape[3], q.shape[4]
    c = t // blocks
    sm_scale = 1.0 / np.sqrt(h)
    probs, outs = [], []
    for i in range(blocks):
        s = (i + 1) * c
        q_i = q[:, :, :, i * c:s]  # [B, K, G, C, H]
        scores = einsum("bkgch,bksh->bkgcs", q_i, k[:, :, :s], jnp.float32) * sm_scale
        scores = jnp.where(_mask(i, c, s, seg_BT), scores, -jnp.inf)
        p = jax.nn.softmax(scores, axis=-1)  # every row keeps at least its own position
        out = einsum("bkgcs,bksh->bkgch", _dropped(p, keeps, i, scale).astype(v.dtype), v[:, :, :s])
        probs.append(p)
        outs.append(out)
    o = jnp.concatenate(outs, axis=3)  # [B, K, G, T, H]
    b, kv, g = o.shape[:3]
    o_BTNH = o.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)
    return o_BTNH, (q, k, v, o, tuple(probs))


def _dropped(p, keeps, i: int, scale: float):
    return p if keeps is None else jnp.where(keeps[i], p * scale, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, blocks: int):
    """softmax(Q K^T / sqrt(H) + causal mask) V, [B, T, N, H]; seg_BT: document ids or None."""
    return _forward(q_BTNH, k_BTKH, v_BTKH, seg_BT, blocks)[0]


def _fwd(q_BTNH, k_BTKH, v_BTKH, seg_BT, blocks):
    o_BTNH, res = _forward(q_BTNH, k_BTKH, v_BTKH, seg_BT, blocks)
    return o_BTNH, stash((res, seg_BT))


def _bwd(blocks, saved, do_BTNH):
    (q, k, v, o, probs), seg_BT = unstash(saved)
    return _backward(q, k, v, o, probs, blocks, do_BTNH) + (None,)


def _backward(q, k, v, o, probs, blocks: int, do_BTNH, keeps=None, scale: float = 1.0):
    """(dq, dk, dv) [B, T, heads, H]. With dropout (`keeps`), O = P' V for P' = keep * P * scale:
    dV = P'^T dO, and dP = keep * scale * (dO V^T) enters the softmax identity, whose
    rowsum(dP * P) is still rowsum(dO * O)."""
    b, kv, g, t, h = q.shape
    c = t // blocks
    sm_scale = 1.0 / np.sqrt(h)
    do = do_BTNH.astype(q.dtype).reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for i, p in enumerate(probs):
        s = (i + 1) * c
        do_i = do[:, :, :, i * c:s]
        dv = dv.at[:, :, :s].add(einsum("bkgcs,bkgch->bksh", _dropped(p, keeps, i, scale).astype(do.dtype), do_i,
                                        jnp.float32))
        dp = _dropped(einsum("bkgch,bksh->bkgcs", do_i, v[:, :, :s], jnp.float32), keeps, i, scale)
        ds = (p * (dp - delta[:, :, :, i * c:s, None]) * sm_scale).astype(q.dtype)
        dq_blocks.append(einsum("bkgcs,bksh->bkgch", ds, k[:, :, :s]))
        dk = dk.at[:, :, :s].add(einsum("bkgcs,bkgch->bksh", ds, q[:, :, :, i * c:s], jnp.float32))
    dq = jnp.concatenate(dq_blocks, axis=3)
    dq_BTNH = dq.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)
    dk_BTKH = dk.astype(k.dtype).transpose(0, 2, 1, 3)
    dv_BTKH = dv.astype(v.dtype).transpose(0, 2, 1, 3)
    return dq_BTNH, dk_BTKH, dv_BTKH


causal_attention.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def dropped_causal_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, keeps, blocks: int, scale: float):
    """`causal_attention` with attention-probability dropout: keeps[i] (bool [B, K, G, C, S],
    see `dropout.probs_keep`) are query block i's surviving probabilities, scaled by `scale`."""
    return _forward(q_BTNH, k_BTKH, v_BTKH, seg_BT, blocks, keeps, scale)[0]


def _dropped_fwd(q_BTNH, k_BTKH, v_BTKH, seg_BT, keeps, blocks, scale):
    o_BTNH, res = _forward(q_BTNH, k_BTKH, v_BTKH, seg_BT, blocks, keeps, scale)
    return o_BTNH, stash((res, keeps))


def _dropped_bwd(blocks, scale, saved, do_BTNH):
    (q, k, v, o, probs), keeps = unstash(saved)
    return _backward(q, k, v, o, probs, blocks, do_BTNH, keeps, scale) + (None, None)


dropped_causal_attention.defvjp(_dropped_fwd, _dropped_bwd)
