"""Matrix products whose weight gradient is computed in the layout XLA's CPU runtime runs fastest.

Autodiff of y = x @ W gives dW = x^T g as one dot that contracts the leading (token)
dimension of both operands. XLA hands that dot to its matrix kernel with a transposed
left operand, and on CPU the kernel runs markedly slower for it when one side is wide:
the bench model's tied output head ([2048, 384] x [2048, 8192] -> [8192, 384]) took a
median 123 ms, against 87 ms when x^T is first written out as its own [384, 2048] array
(a 3 MB copy) and multiplied in the plain row-major layout. `optimization_barrier` keeps
XLA's simplifier from folding the copy back into the dot. The input gradient and the
forward product are left to XLA (measured no different either way).

Shape suffixes: M tokens (all leading dimensions flattened), I input, O output, V
vocabulary, D model width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_barrier = jax.lax.optimization_barrier


def weight_grad(x, g, n_in: int, n_out: int):
    """sum over the leading dims of x[..., i] * g[..., o] -> [i..., o...], as (x^T) @ g with
    x^T materialised."""
    in_shape, out_shape = x.shape[x.ndim - n_in:], g.shape[g.ndim - n_out:]
    x_MI = x.reshape(-1, math.prod(in_shape))
    g_MO = g.reshape(-1, math.prod(out_shape))
    return (_barrier(x_MI.T) @ g_MO).reshape(in_shape + out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract(x, w, n_in: int):
    """tensordot(x, w, n_in): the last `n_in` dims of x with the first `n_in` dims of w."""
    return jnp.tensordot(x, w, axes=n_in)


def _contract_fwd(x, w, n_in):
    return contract(x, w, n_in), (x, w)


def _contract_bwd(n_in, saved, g):
    x, w = saved
    n_out = w.ndim - n_in
    dx = jnp.tensordot(g, w, axes=(tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n_in, w.ndim))))
    return dx.astype(x.dtype), weight_grad(x, g, n_in, n_out).astype(w.dtype)


contract.defvjp(_contract_fwd, _contract_bwd)


def table_grad(x, g):
    """sum over the leading dims of g[..., v] * x[..., d] -> [V, D] (a tied head's table
    gradient), computed as ((x^T) @ g)^T with both transposes materialised."""
    return _barrier(weight_grad(x, g, 1, 1)).T


@jax.custom_vjp
def attend(x, table_VD):
    """x @ table^T: logits of a head tied to the embedding table [V, D]."""
    return jnp.einsum("...d,vd->...v", x, table_VD)


def _attend_fwd(x, table_VD):
    return attend(x, table_VD), (x, table_VD)


def _attend_bwd(saved, g):
    x, table_VD = saved
    dx = jnp.einsum("...v,vd->...d", g, table_VD)
    return dx.astype(x.dtype), table_grad(x, g).astype(table_VD.dtype)


attend.defvjp(_attend_fwd, _attend_bwd)
