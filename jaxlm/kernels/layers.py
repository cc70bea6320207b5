"""Norm, GELU and SwiGLU with written-out backward passes: the CPU kernels' layers.

Autodiff of each formula keeps several float32 temporaries as large as the activation
for the backward pass (x - mean and the normalised x for a norm; x^3, the tanh and
products for GELU); these keep only their inputs (and a norm's two per-row statistics)
and recompute the rest. The residuals go through `dots.stash`, so bfloat16 ones are
stacked over layers as uint16 (see there). The standard kernels use Flax's LayerNorm /
RMSNorm and jax.nn's activations under autodiff instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.kernels.dots import stash, unstash


def _norm_stats(x32, rms: bool, eps: float):
    """(mean, 1/sqrt(var + eps)) over the last axis, each [..., 1]; mean is 0 for RMSNorm."""
    if rms:
        return jnp.zeros_like(x32[..., :1]), jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    mean = jnp.mean(x32, -1, keepdims=True)
    centred = x32 - mean
    return mean, jax.lax.rsqrt(jnp.mean(centred * centred, -1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm(x, scale, bias, rms: bool, eps: float):
    """LayerNorm ((x - mean) / std * scale + bias), or RMSNorm (x / rms * scale) when `rms`,
    over the last axis, in float32; bias may be None.

    The backward pass keeps only x and the two per-row statistics: autodiff of the formula
    kept x - mean, the normalised x and more, each as large as x, for every norm of every
    layer (the next layer's product keeps the output anyway).
    """
    return _norm_fwd(x, scale, bias, rms, eps)[0]


def _norm_fwd(x, scale, bias, rms, eps):
    x32 = x.astype(jnp.float32)
    mean, inv = _norm_stats(x32, rms, eps)
    y = (x32 - mean) * inv * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), stash((x, mean, inv, scale, bias))


def _norm_bwd(rms, eps, saved, g):
    x, mean, inv, scale, bias = unstash(saved)
    xhat = (x.astype(jnp.float32) - mean) * inv
    g32 = g.astype(jnp.float32)
    dxhat = g32 * scale.astype(jnp.float32)
    proj = jnp.mean(dxhat * xhat, -1, keepdims=True)
    centre = 0.0 if rms else jnp.mean(dxhat, -1, keepdims=True)
    dx = inv * (dxhat - centre - xhat * proj)
    lead = tuple(range(x.ndim - 1))
    dscale = jnp.sum(g32 * xhat, lead).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(g32, lead).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


norm.defvjp(_norm_fwd, _norm_bwd)


_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


@jax.custom_vjp
def gelu(x):
    """GELU, tanh approximation (GPT-2's), whose backward pass keeps only the input.

    Autodiff of the formula would keep x^3, the tanh and several products for the
    backward pass, each as large as the MLP activation; this recomputes them instead.
    """
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jnp.tanh(_GELU_C * (x32 + 0.044715 * x32 * x32 * x32)))).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), stash(x)


def _gelu_bwd(saved, g):
    x = unstash(saved)
    x32 = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x32 + 0.044715 * x32 * x32 * x32))
    d = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x32 * x32)
    return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up (Llama's MLP), whose backward pass keeps only the two inputs."""
    g32 = gate.astype(jnp.float32)
    return (g32 * jax.nn.sigmoid(g32) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), stash((gate, up))


def _swiglu_bwd(saved, g):
    gate, up = unstash(saved)
    g32, u32, d32 = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    silu = g32 * sig
    d_gate = d32 * u32 * sig * (1.0 + g32 * (1.0 - sig))
    return d_gate.astype(gate.dtype), (d32 * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
