"""A sharded (or pmap) train step equals the single-device step, with and without accumulation,
for each kernel set (model.kernels=cpu and standard).

Tolerance: float32 summation order differs between meshes, so losses and grad norms are
compared to rtol 1e-5, and parameters after the Adam updates to atol 2e-5 (the learning
rate is 1e-3, so a wrong update would be off by ~1e-3). Adam's first update is about
lr * g / (|g| + eps): for a gradient near eps it turns roundoff in g into an update error
of order lr, so these runs use eps = 1e-6, well above float32 roundoff of the gradients
and far below the gradients that carry the signal.
"""

import jax
import numpy as np
import pytest

from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build

from conftest import tiny_config

VOCAB = 256
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]


def batches(cfg, n):
    rng = np.random.default_rng(123)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    out = []
    for _ in range(n):
        toks = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:]})
    return out


def train(cfg, n_devices, n_steps, snapshots=()):
    """(metrics of each step, params after the last step); with `snapshots`, {n: (metrics of the
    first n steps, params after step n)} for each n in it instead."""
    mesh = make_mesh(cfg, jax.devices()[:n_devices])
    model, tx, schedule = build(cfg, VOCAB, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state = stepper.init_state(cfg.train.seed)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    stepper.compile(state, {"inputs": (B, T), "targets": (B, T)})
    metrics, taken = [], {}
    for n, b in enumerate(batches(cfg, n_steps), 1):
        state, m = stepper.train(state, stepper.place(b, B))
        metrics.append(jax.device_get(m))
        if n in snapshots:
            taken[n] = (list(metrics), jax.device_get(stepper.params(state)))
    return taken if snapshots else (metrics, jax.device_get(stepper.params(state)))


_reference = {}


def reference(family, accum, n_steps, kernel_set="cpu"):
    """The single-device run of a config after 1 or 3 steps: one compiled run serves both."""
    key = (family, accum, kernel_set)
    if key not in _reference:
        cfg = config(family, accum, (1, 1, 1), kernel_set=kernel_set)
        _reference[key] = train(cfg, 1, 3, snapshots=(1, 3))
    return _reference[key][n_steps]


def config(family, accum, mesh, backend="jit", kernel_set="cpu"):
    extra = ["model.family=llama", "model.n_kv_heads=8"] if family == "llama" else []
    # loss_chunk: the chunked loss (chunk length differs with the rows per device)
    return tiny_config(*extra, "optim.eps=1e-6", "train.loss_chunk=4096", f"train.grad_accum={accum}",
                       f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}",
                       f"mesh.backend={backend}", f"model.kernels={kernel_set}")


def assert_same(got, want):
    (m_got, p_got), (m_want, p_want) = got, want
    for a, b in zip(m_got, m_want):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5), p_got, p_want)
    assert jax.tree.structure(p_got) == jax.tree.structure(p_want)


def _id(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else None


# (mesh, family): every mesh once, each family on two of them
ALTERNATING = [((8, 1, 1), "gpt2"), ((1, 8, 1), "llama"), ((1, 1, 8), "gpt2"), ((2, 2, 2), "llama")]
OTHER_FAMILY = [(mesh, {"gpt2": "llama", "llama": "gpt2"}[family]) for mesh, family in ALTERNATING]


@pytest.mark.parametrize("mesh,family", ALTERNATING, ids=_id)
def test_one_step_equals_single_device(family, mesh):
    """One step without accumulation, the cpu set, on each mesh (every family x mesh pair runs
    in the accumulated test below; accumulation is all this one leaves out)."""
    assert_same(train(config(family, 1, mesh), 8, 1), reference(family, 1, 1))


@pytest.mark.parametrize("mesh,family,kernel_set",
                         [(m, f, "cpu") for m in MESHES for f in ("gpt2", "llama")]
                         + [(m, f, "standard") for m, f in OTHER_FAMILY], ids=_id)
def test_three_accumulated_steps_equal_single_device(family, mesh, kernel_set):
    """Three steps of two microbatches each: the cpu set (custom VJPs, whose sharding is jaxlm's
    own) for every family x mesh pair; the standard set (plain jax ops, partitioned by XLA from
    the same parameter and batch shardings) on every mesh, each family on two of them."""
    assert_same(train(config(family, 2, mesh, kernel_set=kernel_set), 8, 3), reference(family, 2, 3, kernel_set))


@pytest.mark.parametrize("accum,kernel_set", [(1, "cpu"), (2, "cpu"), (2, "standard")])
def test_pmap_backend_equals_single_device(accum, kernel_set):
    n = 1 if accum == 1 else 3
    assert_same(train(config("gpt2", accum, (8, 1, 1), backend="pmap", kernel_set=kernel_set), 8, n),
                reference("gpt2", accum, n, kernel_set))


def test_accumulation_equals_one_big_batch():
    """Two microbatches of 8 give the update of one batch of 16 (up to float32 rounding): the
    single-device runs of gpt2 with grad_accum=2 and grad_accum=1, three steps each."""
    assert_same(reference("gpt2", 2, 3), reference("gpt2", 1, 3))


def test_training_reduces_loss(kernel_set):
    cfg = tiny_config("optim.lr=3e-3", "mesh.data=1", f"model.kernels={kernel_set}")
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, VOCAB, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state = stepper.init_state(0)
    b = stepper.place(batches(cfg, 1)[0], cfg.train.batch_size)
    losses = []
    for _ in range(20):  # memorise one batch
        state, m = stepper.train(state, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 1.0


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of (sharded) arrays: the largest per-device total."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values()) if totals else 0


def test_fsdp_shards_state_and_tensor_shards_weights():
    def state_of(mesh_shape):
        cfg = tiny_config("model.d_model=128", f"mesh.data={mesh_shape[0]}", f"mesh.fsdp={mesh_shape[1]}",
                          f"mesh.tensor={mesh_shape[2]}")
        n = int(np.prod(mesh_shape))
        mesh = make_mesh(cfg, jax.devices()[:n])
        model, tx, schedule = build(cfg, VOCAB, mesh)
        stepper = Stepper(cfg, model, tx, schedule, mesh)
        return stepper.init_state(0)

    single = per_device_bytes(state_of((1, 1, 1)))
    fsdp = per_device_bytes(state_of((1, 8, 1)))
    assert fsdp <= single / 6, (fsdp, single)

    tp = state_of((1, 1, 8)).params["blocks"]
    for name, leaf in [("q", tp["attn"]["q"]["kernel"]), ("o", tp["attn"]["o"]["kernel"]),
                       ("up", tp["mlp"]["up"]["kernel"]), ("down", tp["mlp"]["down"]["kernel"])]:
        shard = leaf.addressable_shards[0].data.shape
        assert np.prod(shard) * 8 == np.prod(leaf.shape), (name, leaf.shape, shard)
        assert "tensor" in str(leaf.sharding.spec), (name, leaf.sharding.spec)


@pytest.mark.parametrize("backend", ["jit", "pmap"])
def test_init_is_compiled_once_and_each_seed_is_its_own(backend):
    """A second seed reuses the compiled init (one program in its cache) and gives another state; the
    same seed gives the same state bitwise."""
    cfg = config("gpt2", 1, (8, 1, 1), backend=backend)
    mesh = make_mesh(cfg, jax.devices()[:8])
    model, tx, schedule = build(cfg, VOCAB, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    first = jax.device_get(stepper.params(stepper.init_state(0)))
    other = jax.device_get(stepper.params(stepper.init_state(1)))
    again = jax.device_get(stepper.params(stepper.init_state(0)))
    assert stepper._init._cache_size() == 1
    leaves = jax.tree.leaves
    assert all(np.array_equal(a, b) for a, b in zip(leaves(first), leaves(again)))
    assert not np.array_equal(first["blocks"]["attn"]["q"]["kernel"], other["blocks"]["attn"]["q"]["kernel"])
