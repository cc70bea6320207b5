"""Cross-entropy fused with the output projection, computed in chunks of the sequence.

The plain path builds logits [B, T, V] in float32, keeps them (and their softmax) alive
for the backward pass, and runs three large matrix products around them. Here the
training loss is a custom-VJP function of the final hidden states and the head matrix:
the forward pass walks the sequence in chunks of `chunk` positions with `lax.scan`; for
each chunk it forms the logits, the log-partition, the weighted NLL and z-loss, and,
because the loss is a weighted sum with weights fixed before the call, also the
gradients of that sum with respect to the chunk's hidden states and to the head. Only
those gradients ([B, T, D] and the head's shape) are kept; the backward pass scales them
by the incoming cotangent. No [B, T, V] array ever exists, and no logits are recomputed.

Shape suffixes: B batch, T sequence length, C chunk length, D model width, V vocabulary.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.kernels.dots import einsum, table_grad, weight_grad
from jaxlm.kernels.standard import chunks, softcap, unchunks


def chunk_length(seq_len: int, rows: int, vocab: int, budget: int) -> int:
    """The largest divisor of `seq_len` whose logits chunk [rows, C, V] has at most `budget`
    elements (at least 1)."""
    best = 1
    for c in range(1, seq_len + 1):
        if seq_len % c == 0 and rows * c * vocab <= budget:
            best = c
    return best


def head_logits(x_BCD, w, tied: bool, dtype, cap: float = 0.0):
    """Chunk logits in float32, computed in `dtype` like the model's own head, soft-capped at `cap`."""
    if tied:  # w: the embedding table [V, D]
        z = einsum("bcd,vd->bcv", x_BCD.astype(dtype), w.astype(dtype))
    else:  # w: the head kernel [D, V]
        z = einsum("bcd,dv->bcv", x_BCD.astype(dtype), w.astype(dtype))
    return softcap(nn.with_logical_constraint(z, ("batch", "length", "act_vocab")).astype(jnp.float32), cap)


def _forward(x_BTD, w, targets_BT, weight_BT, z_weight_BT, tied: bool, chunk: int, dtype, cap: float):
    """((loss, sum of weight*NLL, sum of z_weight*logZ^2), (d loss/d x, d loss/d w)): the
    custom VJP's forward rule."""

    def body(dw, xs):
        x_BCD, t_BC, wt_BC, zw_BC = xs
        logits_BCV = head_logits(x_BCD, w, tied, dtype, cap)
        max_BC = jax.lax.stop_gradient(jnp.max(logits_BCV, axis=-1))
        exp_BCV = jnp.exp(logits_BCV - max_BC[..., None])  # the one exp per logit
        sum_BC = jnp.sum(exp_BCV, axis=-1)
        logz_BC = max_BC + jnp.log(sum_BC)
        is_target_BCV = jnp.arange(logits_BCV.shape[-1]) == t_BC[..., None]
        target_logit_BC = jnp.sum(jnp.where(is_target_BCV, logits_BCV, 0.0), axis=-1)
        nll_BC = logz_BC - target_logit_BC
        sums = jnp.stack([jnp.sum(wt_BC * nll_BC), jnp.sum(zw_BC * jnp.square(logz_BC))])
        # d/dlogits of wt*(logZ - z_t) + zw*logZ^2 = (wt + 2 zw logZ) softmax - wt onehot(t)
        coef_BC = (wt_BC + 2.0 * zw_BC * logz_BC) / sum_BC
        dlogits_BCV = coef_BC[..., None] * exp_BCV - jnp.where(is_target_BCV, wt_BC[..., None], 0.0)
        if cap:  # through cap * tanh(z / cap): d/dz = 1 - tanh^2 = 1 - (capped / cap)^2
            dlogits_BCV = dlogits_BCV * (1.0 - jnp.square(logits_BCV / cap))
        dlogits_BCV = dlogits_BCV.astype(dtype)
        if tied:
            dx_BCD = einsum("bcv,vd->bcd", dlogits_BCV, w.astype(dtype))
        else:
            dx_BCD = einsum("bcv,dv->bcd", dlogits_BCV, w.astype(dtype))
        if tied:
            dw_chunk = table_grad(x_BCD.astype(dtype), dlogits_BCV)
        else:
            dw_chunk = weight_grad(x_BCD.astype(dtype), dlogits_BCV, 1, 1)
        return dw + dw_chunk.astype(jnp.float32), (sums, dx_BCD.astype(x_BTD.dtype))

    xs = tuple(chunks(a, chunk) for a in (x_BTD, targets_BT, weight_BT, z_weight_BT))
    dw, (sums_N2, dx_NBCD) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    sums = jnp.sum(sums_N2, axis=0)
    return (sums[0] + sums[1], sums[0], sums[1]), (unchunks(dx_NBCD), dw.astype(w.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def fused_loss(x_BTD, w, targets_BT, weight_BT, z_weight_BT, tied: bool, chunk: int, dtype, cap: float = 0.0):
    """sum(weight * NLL) + sum(z_weight * logZ^2) over the batch, with the two sums as well.

    x_BTD: final hidden states (after the last norm); w: the embedding table [V, D] when
    `tied`, else the head kernel [D, V]; cap: the logits' soft cap (0: none). The weights carry
    no gradient. Returns (loss, weighted NLL sum, weighted z sum); only `loss` may be
    differentiated.
    """
    return _forward(x_BTD, w, targets_BT, weight_BT, z_weight_BT, tied, chunk, dtype, cap)[0]


def _fused_bwd(tied, chunk, dtype, cap, grads, cotangents):
    g = cotangents[0]  # the sums are diagnostics: their cotangents are ignored
    dx_BTD, dw = grads
    return (dx_BTD * g.astype(dx_BTD.dtype), dw * g.astype(dw.dtype), None, None, None)


fused_loss.defvjp(_forward, _fused_bwd)
