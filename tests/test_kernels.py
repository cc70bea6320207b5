"""The cpu kernels (jaxlm/kernels/) equal the plain formulas they replace, and the CPU
program keeps the shape they were written for.

Blocked causal attention against jax.nn.dot_product_attention, the fused chunked loss
against plain logits, GELU and SwiGLU with their written-out backward passes against
autodiff, the products of `dots` against autodiff of the plain products: outputs and
gradients, float32, tolerances at float32 roundoff.
"""

import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.kernels.attention import causal_attention, n_blocks
from jaxlm.kernels.dots import attend, contract, stash, table_grad, unstash, weight_grad
from jaxlm.kernels.layers import gelu, norm, swiglu
from jaxlm.kernels.loss import chunk_length
from jaxlm.step import CPU_LOGITS_BUDGET, logits_budget, loss_chunk, train_loss

from conftest import decoder, tiny_config


def _close(got, want, tol):
    """Each leaf within tol of its own largest value, or of 1e-3 of the largest value of any
    leaf when that is more: a gradient that is zero in exact arithmetic (a key bias: softmax
    ignores a shift shared by all keys) is float32 roundoff of the others' size."""
    floor = 1e-3 * max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = max(float(jnp.max(jnp.abs(b))), floor) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) <= tol * scale, (float(jnp.max(jnp.abs(a - b))), scale)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("segments", [False, True])
def test_blocked_attention_equals_dense(kv_heads, segments):
    r = np.random.default_rng(0)
    B, T, N, H = 2, 16, 4, 8
    q, dout = (jnp.asarray(r.standard_normal((B, T, N, H)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(r.standard_normal((B, T, kv_heads, H)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.cumsum(r.random((B, T)) < 0.2, axis=1), jnp.int32) if segments else None
    mask = None if seg is None else seg[:, None, :, None] == seg[:, None, None, :]

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)

    def vjp(f):
        def run(q, k, v):
            out, back = jax.vjp(f, q, k, v)
            return (out,) + back(dout)
        return jax.jit(run)(q, k, v)

    want = vjp(dense)
    for blocks in (1, 2, 4):
        got = vjp(lambda q, k, v: causal_attention(q, k, v, seg, blocks))
        _close(got, want, 1e-5)
    assert float(jnp.max(jnp.abs(want[0]))) > 0.1  # not a degenerate all-zero comparison


def test_block_and_chunk_sizes():
    assert [n_blocks(256, b) for b in (64, 100, 256, 512)] == [4, 2, 1, 1]
    assert n_blocks(96, 64) == 1 and n_blocks(192, 64) == 3
    assert [n_blocks(t) for t in (32, 64, 128, 256, 1024, 4096)] == [2, 4, 4, 4, 4, 16]
    assert chunk_length(256, 8, 8192, 2_000_000) == 16  # 8 x 16 x 8192 = 1,048,576 <= 2M < 8 x 32 x 8192
    assert chunk_length(100, 4, 1000, 10) == 1


def test_loss_is_chunked_only_when_the_logits_exceed_the_budget():
    assert loss_chunk(256, 8, 8192, 2**25) == 0  # 16.8M logits: plain
    assert loss_chunk(256, 8, 32768, 2**25) == 128  # 67M: two chunks of 8 x 128 x 32768 = 2^25
    assert loss_chunk(256, 64, 65536, 0) == 0  # budget 0: always plain


class _Device:
    def __init__(self, platform, stats, device_kind="unknown"):
        self.platform, self._stats, self.device_kind = platform, stats, device_kind

    def memory_stats(self):
        return self._stats


def test_the_logits_budget_follows_the_device():
    auto = tiny_config()
    assert auto.train.loss_chunk == -1
    assert logits_budget(auto, _Device("cpu", None)) == CPU_LOGITS_BUDGET == 2**25
    h200 = _Device("gpu", {"bytes_limit": 140 * 2**30})
    assert logits_budget(auto, h200) == 140 * 2**30 // 64  # a sixteenth of memory in float32 logits
    assert loss_chunk(1024, 16, 50304, logits_budget(auto, h200)) == 0  # gpt2-124m, 16 rows: plain
    assert logits_budget(auto, _Device("tpu", None)) == CPU_LOGITS_BUDGET  # memory not reported
    # a compile-only TPU reports no memory; its chip's HBM comes from the table
    assert logits_budget(auto, _Device("tpu", None, "TPU v5 lite")) == 16 * 2**30 // 64
    assert logits_budget(tiny_config("train.loss_chunk=4096"), h200) == 4096
    assert logits_budget(tiny_config("train.loss_chunk=0"), _Device("cpu", None)) == 0


def test_gelu_and_swiglu_gradients_equal_autodiff():
    r = np.random.default_rng(2)
    x, u, w = (jnp.asarray(r.standard_normal((16, 24)) * 3, jnp.float32) for _ in range(3))
    np.testing.assert_allclose(gelu(x), nn.gelu(x, approximate=True), atol=1e-6)
    _close(jax.grad(lambda x: jnp.sum(w * gelu(x)))(x),
           jax.grad(lambda x: jnp.sum(w * nn.gelu(x, approximate=True)))(x), 1e-5)
    np.testing.assert_allclose(swiglu(x, u), nn.silu(x) * u, rtol=1e-6, atol=1e-6)
    _close(jax.grad(lambda a, b: jnp.sum(w * swiglu(a, b)), (0, 1))(x, u),
           jax.grad(lambda a, b: jnp.sum(w * nn.silu(a) * b), (0, 1))(x, u), 1e-5)


@pytest.mark.parametrize("rms", [False, True])
def test_norm_equals_flax_norm_and_its_gradients(rms):
    r = np.random.default_rng(4)
    x, w = (jnp.asarray(r.standard_normal((3, 5, 16)) * 3 + 1, jnp.float32) for _ in range(2))
    p = {"scale": jnp.asarray(r.standard_normal(16), jnp.float32)}
    if not rms:
        p["bias"] = jnp.asarray(r.standard_normal(16), jnp.float32)
    ref = nn.RMSNorm(epsilon=1e-5) if rms else nn.LayerNorm(epsilon=1e-5)
    want = lambda x, p: jnp.sum(w * ref.apply({"params": p}, x))
    got = lambda x, p: jnp.sum(w * norm(x, p["scale"], p.get("bias"), rms, 1e-5))
    np.testing.assert_allclose(norm(x, p["scale"], p.get("bias"), rms, 1e-5), ref.apply({"params": p}, x),
                               rtol=1e-5, atol=1e-5)
    _close(jax.grad(got, (0, 1))(x, p), jax.grad(want, (0, 1))(x, p), 1e-5)
    assert jax.grad(got, (0, 1))(x, p)[1].keys() == p.keys()


@pytest.mark.parametrize("n_in", [1, 2])
def test_contract_and_attend_gradients_equal_autodiff(n_in):
    r = np.random.default_rng(3)
    x_shape, w_shape = ((2, 5, 6), (6, 3, 4)) if n_in == 1 else ((2, 5, 3, 4), (3, 4, 6))
    x, w = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in (x_shape, w_shape))
    dy = jnp.asarray(r.standard_normal(x_shape[:x.ndim - n_in] + w_shape[n_in:]), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: contract(x, w, n_in), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.tensordot(x, w, axes=n_in), x, w)
    _close(y, y_ref, 1e-6)
    _close(vjp(dy), vjp_ref(dy), 1e-6)

    table = jnp.asarray(r.standard_normal((7, 6)), jnp.float32)
    h = jnp.asarray(r.standard_normal((2, 5, 6)), jnp.float32)
    dz = jnp.asarray(r.standard_normal((2, 5, 7)), jnp.float32)
    z, vjp = jax.vjp(attend, h, table)
    z_ref, vjp_ref = jax.vjp(lambda h, t: h @ t.T, h, table)
    _close(z, z_ref, 1e-6)
    _close(vjp(dz), vjp_ref(dz), 1e-6)
    _close(weight_grad(h, dz, 1, 1), jnp.einsum("btd,btv->dv", h, dz), 1e-6)
    _close(table_grad(h, dz), jnp.einsum("btd,btv->vd", h, dz), 1e-6)


def test_weight_gradient_keeps_the_transposed_input_as_its_own_array():
    """The barrier that stops XLA folding x^T back into the product (the slow layout) is in
    the backward pass of both products."""
    x, w, t = jnp.ones((4, 6)), jnp.ones((6, 3)), jnp.ones((5, 6))
    for f, args in ((lambda x, w: jnp.sum(contract(x, w, 1)), (x, w)), (lambda x, t: jnp.sum(attend(x, t)), (x, t))):
        hlo = jax.jit(jax.grad(f, argnums=1)).lower(*args).as_text()
        assert "optimization_barrier" in hlo


def _dot_operand_dtypes(hlo: str):
    """(lhs, rhs, result) element types of every dot in compiled HLO text."""
    types = {}
    for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo):
        types[m.group(1)] = m.group(2)
    return [(types.get(a), types.get(b), out)
            for out, a, b in re.findall(r"= (\w+)\[[^=]*? dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_gradient_runs_every_product_on_bfloat16_operands(family):
    """With model.dtype=bfloat16 every product of the compiled loss gradient takes bf16
    operands and accumulates in float32 (XLA's CPU runtime runs that natively; a bf16 -> bf16
    product, or one whose operand XLA sees transposed, is run on float32 copies)."""
    cfg = tiny_config(f"model.family={family}", "model.dtype=bfloat16", "model.d_model=128",
                      "model.n_heads=4", "model.n_kv_heads=0", "train.seq_len=64")
    model = decoder(cfg, 256, "cpu")
    tokens = jnp.zeros((4, 64), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])  # compiled, never run
    batch = {"inputs": tokens, "targets": tokens}
    grad = jax.jit(jax.grad(lambda p: train_loss(p, batch, model, 256.0, 0.0, 0)[0]))
    dots = _dot_operand_dtypes(grad.lower(params).compile().as_text())
    assert len(dots) >= 7 * cfg.model.n_layers, dots  # each block: 7 products forward, more backward
    assert all(d == ("bf16", "bf16", "f32") for d in dots), dots


def test_scanned_bfloat16_residuals_are_not_stacked_as_bfloat16():
    """The layer scan stacks each block's residuals; the custom VJPs hand bf16 residuals over
    as uint16, since XLA's CPU runtime would copy a whole bf16 stack to float32 and back for
    every layer's slice. The stash / unstash round trip is exact."""
    cfg = tiny_config("model.dtype=bfloat16", "model.n_layers=3")
    model = decoder(cfg, 256, "cpu")
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])  # traced, never run
    loss = lambda p: jnp.mean(model.apply({"params": p}, tokens).astype(jnp.float32) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)

    def scans(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from scans(sub)

    stacked = [v.aval for eqn in scans(jaxpr.jaxpr) for v in eqn.outvars[eqn.params["num_carry"]:]
               if v.aval.shape[:1] == (3,)]
    assert any(a.dtype == jnp.uint16 for a in stacked), stacked
    assert not any(a.dtype == jnp.bfloat16 for a in stacked), stacked
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.bfloat16)
    back = unstash(stash((x, jnp.ones(3), None)))
    assert back[0].dtype == jnp.bfloat16 and bool(jnp.all(back[0] == x)) and back[2] is None
