"""The standard kernels: plain JAX, for GPUs and TPUs (and the CPU when asked for).

Products are einsums in the compute dtype with no forced float32 result and no layout
tricks; norms are Flax's LayerNorm / RMSNorm (built in `model.py`); activations are
jax.nn's, differentiated by autodiff. XLA's fusion, layout and remat passes see every
op as it is.

Attention is `jax.nn.dot_product_attention` with the implementation chosen for the
backend (see `jaxlm.kernels.resolve`), or the Pallas flash attention kernel on TPU:

- `cudnn`: cuDNN's fused flash attention. The kernel applies the causal mask itself.
  Packed documents (segment ids) have no argument in the public API, so the fallback
  passes a [B, 1, T, T] same-document mask, which jax turns into an additive bias the
  kernel reads (the causal part stays the kernel's own).
- `pallas`: `jax.experimental.pallas.ops.tpu.flash_attention`, with segment ids in the
  kernel. It needs the sequence length to be a multiple of 128; other lengths take the
  XLA path. Grouped-query heads are repeated to the query heads. Under a mesh it runs
  per shard through `shard_map` (batch over data/fsdp, heads over tensor).
- `xla`: XLA's own path, which builds float32 [B, N, T, T] scores; segment ids are a
  [B, 1, T, T] mask.

None of them can drop attention probabilities, so training with `model.dropout` > 0 takes
`dropped_attention` on every one of them: the XLA path written out, float32 [B, N, T, T]
probabilities under autodiff (scoring and generation keep the path chosen).

Shape suffixes: B batch, T sequence length, N query heads, K key/value heads, H head
dimension, C chunk length, D model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.kernels import dropout


def contract(x, w, n_in: int):
    """tensordot(x, w, n_in) in the operands' dtype."""
    return jnp.tensordot(x, w, axes=n_in)


def attend(x, table_VD):
    """x @ table^T: logits of a head tied to the embedding table."""
    return jnp.einsum("...d,vd->...v", x, table_VD)


def gelu(x):
    """GELU, tanh approximation (GPT-2's)."""
    return jax.nn.gelu(x, approximate=True)


def swiglu(gate, up):
    return jax.nn.silu(gate) * up


def segment_mask(seg_BT):
    """[B, 1, T, T]: query and key are in the same document."""
    return seg_BT[:, None, :, None] == seg_BT[:, None, None, :]


def attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, implementation: str):
    """Causal softmax(Q K^T / sqrt(H)) V, [B, T, N, H]; seg_BT: document ids or None."""
    if implementation == "pallas" and q_BTNH.shape[1] % 128 == 0:
        return _sharded_flash(q_BTNH, k_BTKH, v_BTKH, seg_BT)
    impl = "cudnn" if implementation == "cudnn" else "xla"
    mask = None if seg_BT is None else segment_mask(seg_BT)
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask, is_causal=True, implementation=impl)


def dropped_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, keys_B2, rate: float):
    """Causal attention with an explicit softmax whose probabilities are dropped at `rate`:
    row b's mask is drawn from its key data keys_B2[b] (`dropout.probs_keep`: the blocked path's
    draws)."""
    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    q_BKGTH = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgth,bskh->bkgts", q_BKGTH, k_BTKH, preferred_element_type=jnp.float32) * h ** -0.5
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
    if seg_BT is not None:
        allowed = allowed & segment_mask(seg_BT)[:, :, None]
    p = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    kept = dropout.probs_keep(keys_B2, n, kv, t, 0, t, t, rate)
    p = jnp.where(kept, p * dropout.keep_scale(rate), 0.0)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p.astype(v_BTKH.dtype), v_BTKH)
    return o_BTKGH.reshape(b, t, n, h)


def _flash(q_BTNH, k_BTKH, v_BTKH, seg_BT):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    n, k = q_BTNH.shape[2], k_BTKH.shape[2]
    q_BNTH = q_BTNH.transpose(0, 2, 1, 3)
    k_BNTH = jnp.repeat(k_BTKH, n // k, axis=2).transpose(0, 2, 1, 3)
    v_BNTH = jnp.repeat(v_BTKH, n // k, axis=2).transpose(0, 2, 1, 3)
    segments = None if seg_BT is None else fa.SegmentIds(q=seg_BT, kv=seg_BT)
    block = next(b for b in (512, 256, 128) if q_BTNH.shape[1] % b == 0)  # T is a multiple of 128
    sizes = fa.BlockSizes(**{f.name: 1 if f.name == "block_b" else block for f in dataclasses.fields(fa.BlockSizes)})
    o_BNTH = fa.flash_attention(q_BNTH, k_BNTH, v_BNTH, segment_ids=segments, causal=True,
                                sm_scale=q_BTNH.shape[-1] ** -0.5, block_sizes=sizes)
    return o_BNTH.transpose(0, 2, 1, 3)


def _sharded_flash(q_BTNH, k_BTKH, v_BTKH, seg_BT):
    """The flash kernel per shard: a Pallas call is opaque to the SPMD partitioner."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _flash(q_BTNH, k_BTKH, v_BTKH, seg_BT)
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "head_dim"))
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "act_kv_heads", "head_dim"))
    seg_spec = nn.logical_to_mesh_axes(("batch", "length"))
    if seg_BT is None:
        fn = jax.shard_map(lambda q, k, v: _flash(q, k, v, None), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                           out_specs=q_spec, check_vma=False)
        return fn(q_BTNH, k_BTKH, v_BTKH)
    fn = jax.shard_map(_flash, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)
    return fn(q_BTNH, k_BTKH, v_BTKH, seg_BT)


def softcap(logits, cap: float):
    """cap * tanh(logits / cap) (model.logit_softcap), in the logits' dtype; the logits when cap is 0."""
    return logits if not cap else (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)


def head_logits(x_BCD, w, tied: bool, dtype, cap: float = 0.0):
    """Logits of hidden states through the output head, in float32, soft-capped at `cap` (0: not); w:
    the embedding table [V, D] when `tied`, else the head kernel [D, V]."""
    x_BCD, w = x_BCD.astype(dtype), w.astype(dtype)
    z = attend(x_BCD, w) if tied else contract(x_BCD, w, 1)
    return softcap(nn.with_logical_constraint(z, ("batch", "length", "act_vocab")).astype(jnp.float32), cap)


def chunks(x_BT_, c: int):
    """[B, T, ...] -> [T / C, B, C, ...], the layout lax.scan walks."""
    b, t = x_BT_.shape[:2]
    return jnp.moveaxis(x_BT_.reshape((b, t // c, c) + x_BT_.shape[2:]), 1, 0)


def unchunks(x_NBC_):
    """The inverse of `chunks`."""
    n, b, c = x_NBC_.shape[:3]
    return jnp.moveaxis(x_NBC_, 0, 1).reshape((b, n * c) + x_NBC_.shape[3:])


def _nll_logz(logits_BCV, targets_BC):
    logz_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    return logz_BC - target_BC, logz_BC


def chunked_loss(x_BTD, w, targets_BT, weight_BT, z_weight_BT, tied: bool, chunk: int, dtype, cap: float = 0.0):
    """sum(weight * NLL) + sum(z_weight * logZ^2), with the two sums, walking the sequence in
    chunks of `chunk` positions: the same contract as `kernels.loss.fused_loss`, by autodiff.

    Each chunk's logits are rematerialised in the backward pass (`jax.checkpoint`), so no
    [B, T, V] array is kept; the cost is a second forward product of the head per chunk.
    """

    @jax.checkpoint
    def body(sums, xs):
        x_BCD, t_BC, wt_BC, zw_BC = xs
        nll_BC, logz_BC = _nll_logz(head_logits(x_BCD, w, tied, dtype, cap), t_BC)
        return sums + jnp.stack([jnp.sum(wt_BC * nll_BC), jnp.sum(zw_BC * jnp.square(logz_BC))]), None

    xs = tuple(chunks(a, chunk) for a in (x_BTD, targets_BT, weight_BT, z_weight_BT))
    sums, _ = jax.lax.scan(body, jnp.zeros((2,), jnp.float32), xs)
    return sums[0] + sums[1], sums[0], sums[1]


def chunked_nll(x_BTD, w, targets_BT, tied: bool, chunk: int, dtype, logits=head_logits, cap: float = 0.0):
    """NLL [B, T] float32 of every target, computing the logits `chunk` positions at a time
    (evaluation: no backward pass). `logits(x_BCD, w, tied, dtype, cap)` is the head of the
    model's kernel set."""

    def one(xs):
        x_BCD, t_BC = xs
        return _nll_logz(logits(x_BCD, w, tied, dtype, cap), t_BC)[0]

    return unchunks(jax.lax.map(one, (chunks(x_BTD, chunk), chunks(targets_BT, chunk))))

