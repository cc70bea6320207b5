"""The kernel switch: how `model.kernels` / `model.attention` resolve per platform, and that
the two kernel sets compute the same model.

The GPU and TPU choices are resolved from a mocked platform name. The cuDNN call is
checked by jax's own cuDNN argument checks with the cuDNN version and the GPU's compute
capability mocked (those checks read the real GPU otherwise); the Pallas TPU flash kernel
runs in Pallas' TPU interpret mode on this CPU.
"""

import dataclasses
from unittest import mock

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import kernels, sharding
from jaxlm.errors import ConfigError
from jaxlm.kernels import standard
from jaxlm.step import train_loss

from conftest import decoder, tiny_config


def _model(*overrides):
    return tiny_config(*overrides).model


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_resolves_to_standard_off_the_cpu(platform):
    m = kernels.resolve(_model("model.dtype=bfloat16"), platform, seq_len=256)
    assert m.kernels == "standard"
    assert m.attention == {"gpu": "cudnn", "tpu": "pallas"}[platform]
    on_cpu = kernels.resolve(_model("model.dtype=bfloat16"), "cpu", seq_len=256)
    assert (on_cpu.kernels, on_cpu.attention) == ("cpu", "blocked")
    explicit = kernels.resolve(_model("model.kernels=standard"), "cpu", seq_len=256)
    assert (explicit.kernels, explicit.attention) == ("standard", "xla")


def test_no_flash_kernel_falls_back_to_xla_and_says_why():
    m = kernels.resolve(_model("model.dtype=float32"), "gpu", seq_len=256)
    assert m.attention == "xla"
    assert "cuDNN flash attention takes bfloat16" in kernels.describe(m, "gpu", 256)
    m = kernels.resolve(_model("model.dtype=bfloat16"), "gpu", seq_len=256)
    assert "cuDNN flash attention" in kernels.describe(m, "gpu", 256)
    wide = _model("model.dtype=bfloat16", "model.d_model=1536", "model.n_heads=8")  # head dim 192
    assert kernels.resolve(wide, "gpu", 256, capability=(8, 0)).attention == "xla"  # Ampere: at most 128
    assert kernels.resolve(wide, "gpu", 256, capability=(9, 0)).attention == "cudnn"  # Hopper: 256
    m = kernels.resolve(_model(), "tpu", seq_len=200)
    assert m.attention == "xla" and "multiple of 128" in kernels.describe(m, "tpu", 200)


def test_impossible_explicit_choices_are_refused():
    with pytest.raises(ConfigError, match="model.attention=cudnn needs an NVIDIA GPU.*devices are cpu"):
        kernels.resolve(_model("model.attention=cudnn"), "cpu", 256)
    with pytest.raises(ConfigError, match="takes bfloat16"):
        kernels.resolve(_model("model.attention=cudnn"), "gpu", 256)
    with pytest.raises(ConfigError, match="model.attention=pallas needs a TPU"):
        kernels.resolve(_model("model.attention=pallas"), "gpu", 256)
    with pytest.raises(ConfigError, match="model.kernels"):
        tiny_config("model.kernels=fast")
    with pytest.raises(ValueError, match="unresolved"):
        kernels.ops("auto")


def test_no_module_asks_the_backend_at_trace_time():
    import pathlib

    root = pathlib.Path(kernels.__file__).resolve().parents[1]
    users = [str(p.relative_to(root)) for p in root.rglob("*.py") if "default_backend" in p.read_text()]
    assert users == [], users


def _cudnn_mocks():
    """jax's cuDNN checks with a cuDNN 9.10 on a Hopper GPU in place of the real lookups."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    return (mock.patch.object(fa, "check_cudnn_version", return_value=91000),
            mock.patch.object(fa, "check_compute_capability", return_value=True),
            mock.patch.object(fa, "is_cuda_compute_capability_equal", return_value=False))


@pytest.mark.parametrize("segments", [False, True])
def test_the_cudnn_call_passes_jaxs_cudnn_checks(segments):
    """The config the GPU resolves to hands jax.nn.dot_product_attention(implementation='cudnn')
    arguments its cuDNN checks accept, forward and backward; without packed documents no
    [T, T] array is built (the kernel masks causally itself)."""
    m = kernels.resolve(_model("model.family=llama", "model.n_kv_heads=2", "model.dtype=bfloat16",
                               "model.d_model=256", "model.n_heads=4"), "gpu", seq_len=128)
    assert m.attention == "cudnn"
    B, T, N, K, H = 2, 128, m.n_heads, m.kv_heads, m.head_dim
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32) if segments else None

    def loss(q, k, v, s):
        return kernels.attention(q, k, v, s, m).astype(jnp.float32).sum()

    a, b, c = _cudnn_mocks()
    with a, b, c:
        out = jax.eval_shape(lambda q, k, v, s: kernels.attention(q, k, v, s, m), q, kv, kv, seg)
        grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg)
        jaxpr = jax.make_jaxpr(lambda q, k, v, s: kernels.attention(q, k, v, s, m))(q, kv, kv, seg)
        with pytest.raises(NotImplementedError, match="fp16/bf16"):  # the checks do refuse float32
            f32 = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
            jax.eval_shape(lambda x: standard.attention(x, x, x, None, "cudnn"), f32)
    assert out.shape == (B, T, N, H) and [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]
    square = [v for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if getattr(v.aval, "shape", ())[-2:] == (T, T)]
    assert bool(square) == segments, square


def _loss_and_grads(model, params, batch):
    count = jnp.sum(batch["mask"]).astype(jnp.float32)

    def f(p):
        return train_loss(p, batch, model, count, 1e-3, 0)[0]

    return jax.jit(jax.value_and_grad(f))(params)


def _batch(vocab, B, T, segments, seed=0):
    r = np.random.default_rng(seed)
    toks = r.integers(0, vocab, (B, T + 1))
    batch = {"inputs": jnp.asarray(toks[:, :-1], jnp.int32), "targets": jnp.asarray(toks[:, 1:], jnp.int32),
             "mask": jnp.asarray(r.random((B, T)) < 0.9, jnp.int32)}
    if segments:
        seg = np.cumsum(r.random((B, T)) < 0.1, axis=1).astype(np.int32)
        batch["segment_ids"] = jnp.asarray(seg)
        starts = np.concatenate([np.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        pos = np.zeros((B, T), np.int32)
        for b in range(B):
            for t in range(1, T):
                pos[b, t] = 0 if starts[b, t] else pos[b, t - 1] + 1
        batch["positions"] = jnp.asarray(pos)
    return batch


def _rel(got, want):
    """||got - want|| / ||want|| over the whole gradient tree."""
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    norm = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(want))
    return (diff / norm) ** 0.5


_params = {}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
def test_cpu_and_standard_kernels_give_the_same_loss_and_gradients(family, segments):
    extra = ["model.family=llama", "model.n_kv_heads=2"] if family == "llama" else []  # llama: GQA, untied
    cfg = tiny_config(*extra)
    vocab, B, T = 256, 4, 32
    batch = _batch(vocab, B, T, segments)
    cpu, std = decoder(cfg, vocab, "cpu"), decoder(cfg, vocab, "standard")
    assert (cpu.cfg.attention, std.cfg.attention) == ("blocked", "xla")
    if family not in _params:  # one init per family (seconds each): with and without segments share it
        _params[family] = nn.unbox(cpu.init(jax.random.key(0), batch["inputs"])["params"])
    params = _params[family]
    (l_cpu, g_cpu), (l_std, g_std) = _loss_and_grads(cpu, params, batch), _loss_and_grads(std, params, batch)
    np.testing.assert_allclose(l_std, l_cpu, rtol=1e-5)
    assert _rel(g_std, g_cpu) <= 1e-5
    assert jax.tree.structure(g_std) == jax.tree.structure(g_cpu)


@pytest.mark.parametrize("kernel_set_name", ["cpu", "standard"])
def test_chunked_losses_equal_plain_logits(kernel_set_name):
    """Each kernel set's chunked loss (cpu: fused; standard: rematerialised chunks) equals its
    plain logits, for the tied gpt2 and the untied llama heads."""
    for extra in ([], ["model.family=llama", "model.n_kv_heads=4"]):
        cfg = tiny_config("model.n_layers=1", *extra)
        model = decoder(cfg, 96, kernel_set_name)
        batch = _batch(96, 2, 16, False, seed=1)
        params = nn.unbox(model.init(jax.random.key(0), batch["inputs"])["params"])
        count = jnp.sum(batch["mask"]).astype(jnp.float32)

        def run(chunk):
            f = jax.value_and_grad(lambda p: train_loss(p, batch, model, count, 1e-2, chunk)[0])
            return jax.jit(f)(params)

        (l0, g0), (l4, g4) = run(0), run(4)
        np.testing.assert_allclose(l4, l0, rtol=1e-6)
        assert _rel(g4, g0) <= 1e-5


def test_pallas_flash_attention_model_equals_xla_in_interpret_mode():
    """What a TPU runs (standard kernels, Pallas flash attention with segment ids and GQA)
    equals the XLA path: the kernel interpreted on this CPU, loss and gradients."""
    from jax.experimental.pallas import tpu as pltpu

    cfg = tiny_config("model.family=llama", "model.n_kv_heads=2", "model.max_seq_len=128", "train.seq_len=128")
    tpu = decoder(cfg, 128, "standard", platform="tpu")
    xla = decoder(cfg, 128, "standard")
    assert (tpu.cfg.attention, xla.cfg.attention) == ("pallas", "xla")
    batch = _batch(128, 1, 128, True, seed=2)
    params = nn.unbox(xla.init(jax.random.key(0), batch["inputs"])["params"])
    with pltpu.force_tpu_interpret_mode():
        l_tpu, g_tpu = _loss_and_grads(tpu, params, batch)
    l_xla, g_xla = _loss_and_grads(xla, params, batch)
    np.testing.assert_allclose(l_tpu, l_xla, rtol=1e-5)
    assert _rel(g_tpu, g_xla) <= 1e-5


def test_pallas_flash_attention_runs_per_shard_under_a_mesh():
    """Under a (2, 2, 2) mesh the Pallas call runs inside shard_map on each device's rows and
    heads, and equals the XLA path on the whole batch."""
    from jax.experimental.pallas import tpu as pltpu

    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = sharding.make_mesh(cfg, jax.devices())
    r = np.random.default_rng(3)
    B, T, N, K, H = 4, 128, 4, 2, 16
    q = jnp.asarray(r.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.cumsum(r.random((B, T)) < 0.05, axis=1), jnp.int32)
    with sharding.activate(mesh), pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda q, k, v, s: standard.attention(q, k, v, s, "pallas"))(q, k, v, seg)
        hlo = jax.jit(lambda q, k, v, s: standard.attention(q, k, v, s, "pallas")).lower(q, k, v, seg).as_text()
    want = standard.attention(q, k, v, seg, "xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert "manual_computation" in hlo  # the shard_map region (the XLA path has none)


def test_describe_names_the_kernels_in_the_plan():
    m = kernels.resolve(_model(), "cpu", 256)
    assert kernels.describe(m, "cpu", 256).startswith("kernels: cpu")
    m = kernels.resolve(dataclasses.replace(_model(), kernels="standard"), "cpu", 256)
    line = kernels.describe(m, "cpu", 256)
    assert line.startswith("kernels: standard") and "attention: XLA path" in line


@pytest.mark.parametrize("family", ["llama"])  # SwiGLU, RMSNorm, GQA, untied head
def test_the_standard_program_is_plain_jax(family):
    """kernels=standard in bfloat16: no optimization barrier, no uint16 stash, no custom VJP,
    and the linear products return bfloat16 (no forced float32 result); the cpu set has all
    of these (the contrast keeps the test honest)."""
    cfg = tiny_config(f"model.family={family}", "model.dtype=bfloat16", "model.n_kv_heads=0")
    batch = _batch(256, 2, 32, False)

    def eqns(kernel_set):
        model = decoder(cfg, 256, kernel_set)
        params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch["inputs"])["params"])  # traced only
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: train_loss(p, batch, model, 64.0, 0.0, 0)[0]))(params)

        def walk(j):
            for e in j.eqns:
                yield e
                for sub in jax.extend.core.jaxprs_in_params(e.params):
                    yield from walk(sub)

        return list(walk(jaxpr.jaxpr))

    def census(es):
        names = {e.primitive.name for e in es}
        u16 = any(getattr(v.aval, "dtype", None) == jnp.uint16 for e in es for v in e.outvars)
        bf16_dots = sum(1 for e in es if e.primitive.name == "dot_general" and e.outvars[0].aval.dtype == jnp.bfloat16)
        return ("optimization_barrier" in names, u16, any("custom_vjp" in n for n in names), bf16_dots)

    barrier, u16, custom, bf16_dots = census(eqns("standard"))
    assert (barrier, u16, custom) == (False, False, False)
    assert bf16_dots >= 7 * cfg.model.n_layers  # q, k, v, o, up (gate), down: forward alone
    assert census(eqns("cpu"))[:3] == (True, True, True)


@pytest.mark.parametrize("kernel_set_name,mesh", [("cpu", (2, 2, 2)), ("standard", (1, 2, 1))])
def test_scoring_in_sequence_chunks_equals_the_plain_logits(kernel_set_name, mesh):
    """A model whose float32 [B, T, V] logits exceed the logits budget is scored in sequence
    chunks on the same mesh; the per-token NLL equals the unchunked scorer's (relative 1e-6)."""
    from jaxlm.step import Stepper, build

    V = 384  # a vocabulary no other dimension of the model shares, so its logits are recognisable in HLO

    def scores(budget):
        cfg = tiny_config(f"model.kernels={kernel_set_name}", f"train.loss_chunk={budget}", "eval.batch_size=8",
                          f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}")
        m = sharding.make_mesh(cfg, jax.devices()[:int(np.prod(mesh))])
        model, tx, schedule = build(cfg, V, m)
        stepper = Stepper(cfg, model, tx, schedule, m)
        state = stepper.init_state(0)
        batch = _batch(256, 8, 32, True, seed=4)
        keys = ("inputs", "targets", "mask", "segment_ids", "positions")
        placed = stepper.place({k: np.asarray(batch[k]) for k in keys}, 8)
        # the eval step alone, compiled as Stepper.compile compiles it (the train step is not needed here)
        with sharding.activate(m):
            stepper._eval = stepper._eval_jit().lower(state.params, placed).compile()
        hlo = stepper._eval.as_text()
        return np.asarray(stepper.eval_step(state.params, placed)), hlo

    rows = 8 // (mesh[0] * mesh[1])
    budget = rows * 8 * V  # logits of 8 positions per device: 4 chunks of the 32
    chunked, hlo_chunked = scores(budget)
    plain, hlo_plain = scores(0)
    assert rows * 32 * V > budget
    np.testing.assert_allclose(chunked, plain, rtol=1e-6, atol=0)
    assert float(np.abs(plain).max()) > 1.0  # real NLLs, not a masked-out batch
    full = f"f32[{rows},32,{V // mesh[2]}]"  # one device's whole logits (vocab split over tensor)
    assert full in hlo_plain and full not in hlo_chunked
