"""Matrix products whose weight gradient is computed in the layout XLA's CPU runtime runs fastest.

Autodiff of y = x @ W gives dW = x^T g as one dot that contracts the leading (token)
dimension of both operands. XLA hands that dot to its matrix kernel with a transposed
left operand, and on CPU the kernel runs markedly slower for it when one side is wide:
the bench model's tied output head ([2048, 384] x [2048, 8192] -> [8192, 384]) took a
median 123 ms, against 87 ms when x^T is first written out as its own [384, 2048] array
(a 3 MB copy) and multiplied in the plain row-major layout. `optimization_barrier` keeps
XLA's simplifier from folding the copy back into the dot. The input gradient and the
forward product are left to XLA (measured no different either way).

Every product here, and the attention and fused-loss products that use `einsum` below,
accumulates in float32 (`preferred_element_type`). For bfloat16 operands that is also the
fast path on CPU: XLA runs a bf16 x bf16 -> f32 dot as it is (with AVX-512 BF16 where the
CPU has it), while a bf16 x bf16 -> bf16 dot is rewritten to convert both operands to
float32 first ([2048, 384] x [384, 1536]: 2.5 ms against 5.3 ms, float32 4.8 ms).

Shape suffixes: M tokens (all leading dimensions flattened), I input, O output, V
vocabulary, D model width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_barrier = jax.lax.optimization_barrier


def stash(residuals):
    """Residuals of a custom VJP with every bfloat16 array bitcast to uint16 (free).

    Under the layer scan, residuals are stacked over layers, written and read with
    dynamic-update-slice and dynamic-slice. XLA's CPU backend runs those ops on bfloat16 by
    converting the whole stack to float32 and back, on every layer: bench model in bfloat16,
    about a quarter of the step. On uint16 they are plain copies. `unstash` undoes it.
    """
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a,
                        residuals)


def unstash(residuals):
    """The residuals `stash` was given (no other residual here is uint16)."""
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a,
                        residuals)


def einsum(spec: str, a, b, dtype=None):
    """jnp.einsum of two arrays of one dtype, accumulated in float32 and returned in `dtype`
    (default: the operands' dtype)."""
    if a.dtype != b.dtype:
        raise TypeError(f"einsum {spec}: operands of different dtypes {a.dtype} and {b.dtype}")
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype or a.dtype)


def _tensordot(a, b, axes, dtype=None):
    if a.dtype != b.dtype:
        raise TypeError(f"tensordot: operands of different dtypes {a.dtype} and {b.dtype}")
    return jnp.tensordot(a, b, axes=axes, preferred_element_type=jnp.float32).astype(dtype or a.dtype)


def weight_grad(x, g, n_in: int, n_out: int):
    """sum over the leading dims of x[..., i] * g[..., o] -> [i..., o...] in float32, as
    (x^T) @ g with x^T materialised."""
    in_shape, out_shape = x.shape[x.ndim - n_in:], g.shape[g.ndim - n_out:]
    i = math.prod(in_shape)
    x_MI1 = x.reshape(-1, i, 1)
    g_MO = g.reshape(-1, math.prod(out_shape))
    # x^T as [I, 1, M] -> [I, M]: a plain x.T gets a column-major layout (the transpose becomes
    # a bitcast) and XLA then runs a bf16 product in float32; through the unit dimension it
    # is written out row-major and the bf16 product runs as bf16 (float32: the same either way)
    x_IM = _barrier(x_MI1.transpose(1, 2, 0)).reshape(i, -1)
    return _tensordot(x_IM, g_MO, 1, jnp.float32).reshape(in_shape + out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract(x, w, n_in: int):
    """tensordot(x, w, n_in): the last `n_in` dims of x with the first `n_in` dims of w."""
    return _tensordot(x, w, n_in)


def _contract_fwd(x, w, n_in):
    return contract(x, w, n_in), stash((x, w))


def _contract_bwd(n_in, saved, g):
    x, w = unstash(saved)
    n_out = w.ndim - n_in
    g = g.astype(x.dtype)
    dx = _tensordot(g, w, (tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n_in, w.ndim))))
    return dx, weight_grad(x, g, n_in, n_out).astype(w.dtype)


contract.defvjp(_contract_fwd, _contract_bwd)


def table_grad(x, g):
    """sum over the leading dims of g[..., v] * x[..., d] -> [V, D] in float32 (a tied head's
    table gradient), computed as ((x^T) @ g)^T with both transposes materialised."""
    return _barrier(weight_grad(x, g, 1, 1)).T


@jax.custom_vjp
def attend(x, table_VD):
    """x @ table^T: logits of a head tied to the embedding table [V, D]."""
    return einsum("...d,vd->...v", x, table_VD)


def _attend_fwd(x, table_VD):
    return attend(x, table_VD), stash((x, table_VD))


def _attend_bwd(saved, g):
    x, table_VD = unstash(saved)
    g = g.astype(x.dtype)
    dx = einsum("...v,vd->...d", g, table_VD)
    return dx, table_grad(x, g).astype(table_VD.dtype)


attend.defvjp(_attend_fwd, _attend_bwd)
