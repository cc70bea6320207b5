"""model.dropout: off at rate 0 (the program is unchanged), on only while training, masks from
(train.seed, step, layer, global row), so resume is bitwise and every mesh and backend agree."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxlm import kernels
from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.kernels import dropout
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build, train_loss

from conftest import decoder, tiny_config
from test_resume import _args, _losses
from test_step import VOCAB, assert_same, batches

RATE = "model.dropout=0.1"
RANDOM = ("threefry2x32", "random_bits", "random_fold_in", "random_wrap", "random_seed")


def _batch(cfg):
    b = batches(cfg, 1)[0]
    return {k: jnp.asarray(v) for k, v in b.items()}


def _loss_jaxpr(model, params, batch, drop):
    count = jnp.float32(batch["targets"].size)
    extra = () if drop is None else (drop,)
    return str(jax.make_jaxpr(jax.value_and_grad(lambda p: train_loss(p, batch, model, count, 0.0, 0, *extra)[0]))(
        params))


def _step_jaxpr(cfg):
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, VOCAB, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    shapes = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("inputs", "targets")}
    return str(jax.make_jaxpr(stepper.train_fn)(stepper.abstract_state(), shapes))


@pytest.mark.parametrize("kernel_set", ["cpu", "standard"])
def test_rate_zero_adds_nothing_to_the_program(kernel_set):
    """At rate 0 the train step traces no random op, and a Decoder handed a dropout key traces the
    program it traces without one; at rate 0.1 both change (so this test can fail)."""
    cfg0 = tiny_config("mesh.data=1", f"model.kernels={kernel_set}")
    cfg1 = tiny_config("mesh.data=1", f"model.kernels={kernel_set}", RATE, "train.grad_accum=2")
    assert not any(p in _step_jaxpr(cfg0) for p in RANDOM)
    assert "random_fold_in" in _step_jaxpr(cfg1)
    batch = _batch(cfg0)
    drop = (dropout.step_key(0, 0), jnp.arange(cfg0.train.batch_size))
    for cfg, same in ((cfg0, True), (cfg1, False)):
        model = decoder(cfg, VOCAB, kernel_set)
        params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch["inputs"])["params"])
        plain, with_key = _loss_jaxpr(model, params, batch, None), _loss_jaxpr(model, params, batch, drop)
        assert (plain == with_key) == same


LLAMA = ("model.family=llama", "model.n_kv_heads=2", RATE)  # grouped-query heads, the layer scan
_llama = {}


def llama(kernel_set="cpu"):
    """(model, params, batch, grad): the tiny llama at rate 0.1 and its jitted (loss, gradients) of
    a step key, built once per kernel set (the remat test's reference too)."""
    if kernel_set not in _llama:
        cfg = tiny_config(*LLAMA)
        model = decoder(cfg, VOCAB, kernel_set)
        batch = _batch(cfg)
        params = model.init(jax.random.key(0), batch["inputs"])["params"]
        _llama[kernel_set] = model, params, batch, _grad_fn(model, batch)
    return _llama[kernel_set]


def _grad_fn(model, batch):
    count = jnp.float32(batch["targets"].size)
    rows = jnp.arange(batch["targets"].shape[0])
    return jax.jit(jax.value_and_grad(lambda p, key: train_loss(p, batch, model, count, 0.0, 0, (key, rows))[0]))


def test_masks_depend_on_seed_and_step_and_row_only():
    """The loss and gradient of a step's key: the same (seed, step) reproduces bitwise, another step or
    seed differs, and rate 0 differs from rate 0.1. A row's masks are the same whichever rows share
    its batch (the layout independence every mesh, pmap and grad_accum rely on)."""
    model, params, batch, grad = llama()
    runs = {(seed, step): jax.device_get(grad(params, dropout.step_key(seed, step)))
            for seed, step in ((0, 5), (0, 6), (1, 5))}
    again = jax.device_get(grad(params, dropout.step_key(0, 5)))
    leaves = lambda r: [r[0]] + jax.tree.leaves(r[1])  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(runs[0, 5]), leaves(again)))
    for other in ((0, 6), (1, 5)):
        assert runs[0, 5][0] != runs[other][0]
        assert not np.array_equal(jax.tree.leaves(runs[0, 5][1])[0], jax.tree.leaves(runs[other][1])[0])
    plain = decoder(tiny_config(*LLAMA[:2]), VOCAB)
    count = jnp.float32(batch["targets"].size)
    assert float(jax.jit(lambda p: train_loss(p, batch, plain, count, 0.0, 0)[0])(params)) != float(runs[0, 5][0])

    masks = jax.jit(_layout_masks)()
    np.testing.assert_array_equal(masks["residual"][4:5], masks["residual_alone"])
    np.testing.assert_array_equal(masks["probs"][4:5], masks["probs_alone"])
    np.testing.assert_array_equal(masks["probs"][:, :, :, 16:24, :24], masks["probs_block"])
    assert not np.array_equal(masks["residual"][0], masks["residual"][1])  # rows (so microbatches) differ
    assert not np.array_equal(masks["probs"], masks["probs_layer1"])
    assert abs(float(np.mean(masks["residual"])) - 0.75) < 0.01


def test_the_hash_is_jax_threefry():
    """`dropout.threefry2x32`, unrolled, is bit for bit jax's threefry2x32 primitive."""
    from jax.extend.random import threefry2x32_p

    words = jax.random.bits(jax.random.key(3), (4, 1000), jnp.uint32)
    np.testing.assert_array_equal(jax.jit(dropout.threefry2x32)(*words), threefry2x32_p.bind(*words))


def _layout_masks():
    """Masks of rows 0..5 and of row 4 alone; a query block's and the whole sequence's (rate 0.25)."""
    keys = dropout.row_keys(dropout.step_key(0, 5), 2, jnp.arange(6))  # [L, sites, B, 2]
    alone = dropout.row_keys(dropout.step_key(0, 5), 2, jnp.array([4]))
    probs = lambda k, q0, q1: dropout.probs_keep(k[dropout.PROBS], 8, 2, 32, q0, q1, q1, 0.25)  # noqa: E731
    return {"residual": dropout.residual_keep(keys[1, dropout.MLP_OUT], 32, 64, 0.25),
            "residual_alone": dropout.residual_keep(alone[1, dropout.MLP_OUT], 32, 64, 0.25),
            "probs": probs(keys[0], 0, 32), "probs_alone": probs(alone[0], 0, 32),
            "probs_block": probs(keys[0], 16, 24), "probs_layer1": probs(keys[1], 0, 32)}


def test_the_plan_names_the_training_attention_path():
    import dataclasses

    m = dataclasses.replace(tiny_config(RATE, "model.dtype=bfloat16").model, kernels="standard")
    line = kernels.describe(kernels.resolve(m, "gpu", 256, (9, 0)), "gpu", 256, (9, 0))
    assert "cuDNN flash" in line and "dropout 0.1" in line and "explicit-softmax path" in line
    cpu = kernels.describe(kernels.resolve(dataclasses.replace(m, kernels="cpu"), "cpu", 256), "cpu", 256)
    assert "dropout 0.1" in cpu and "explicit-softmax" not in cpu


def test_blocked_attention_drops_the_probabilities_the_explicit_path_drops():
    """The blocked kernel's written-out backward pass with dropout equals autodiff of the
    explicit-softmax path (used by xla, cudnn and pallas while training) on the same masks:
    grouped-query heads, packed documents, four query blocks."""
    import dataclasses

    from jaxlm.config import ModelConfig

    blocked = dataclasses.replace(ModelConfig(), kernels="cpu", attention="blocked", attention_block=8, dropout=0.3)
    explicit = dataclasses.replace(blocked, attention="xla")
    B, T, N, K, H = 3, 32, 4, 2, 8
    k = jax.random.split(jax.random.key(0), 3)
    q, kk, v = jax.random.normal(k[0], (B, T, N, H)), jax.random.normal(k[1], (B, T, K, H)), \
        jax.random.normal(k[2], (B, T, K, H))
    seg = jnp.array([[0] * 10 + [1] * 22, [0] * 32, [0] * 5 + [1] * 5 + [2] * 22])
    keys = dropout.row_keys(dropout.step_key(0, 3), 1, jnp.arange(B))[0, dropout.PROBS]
    w = jnp.cos(jnp.arange(H))

    def loss(m, drop):
        return lambda q, k, v: (kernels.attention(q, k, v, seg, m, drop) * w).sum()

    a, ga = jax.jit(jax.value_and_grad(loss(blocked, keys), (0, 1, 2)))(q, kk, v)
    b, gb = jax.jit(jax.value_and_grad(loss(explicit, keys), (0, 1, 2)))(q, kk, v)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert abs(float(a) - float(jax.jit(loss(blocked, None))(q, kk, v))) > 1e-2  # the masks do something


@pytest.mark.parametrize("remat,kernel_set", [("dots", "cpu"), ("full", "standard")])
def test_remat_recomputes_the_same_masks(remat, kernel_set):
    """The backward pass of a rematerialised block draws its masks again: the gradients are those
    without remat."""
    model, params, batch, grad = llama(kernel_set)
    key = dropout.step_key(0, 1)
    want = grad(params, key)[1]
    got = _grad_fn(decoder(tiny_config(*LLAMA, f"model.remat={remat}"), VOCAB, kernel_set), batch)(params, key)[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


# --- mesh equivalence: one device against data / fsdp / tensor meshes and pmap, tiny gpt2 with two
# microbatches, 2 steps (step 1 has its own masks); the state is initialised once and placed.

_one = {}


def _train(cfg, n_devices, n_steps=2):
    """(metrics of each step, params after the last), from the one-device run's initial state."""
    mesh = make_mesh(cfg, jax.devices()[:n_devices])
    model, tx, schedule = build(cfg, VOCAB, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    if "init" not in _one:
        _one["init"] = jax.device_get(stepper.logical_state(stepper.init_state(cfg.train.seed)))
    state = stepper.adopt(_one["init"]) if cfg.mesh.backend == "pmap" else \
        jax.device_put(_one["init"], stepper.state_shardings)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    stepper.compile(state, {"inputs": (B, T), "targets": (B, T)})
    metrics = []
    for b in batches(cfg, n_steps):
        state, m = stepper.train(state, stepper.place(b, B))
        metrics.append(jax.device_get(m))
    return metrics, jax.device_get(stepper.params(state))


def _mesh_cfg(mesh=(1, 1, 1), accum=2, backend="jit", kernel_set="cpu"):
    # loss_chunk: the chunked loss, whose model call returns hidden states (as test_step's runs)
    return tiny_config(RATE, "optim.eps=1e-6", "train.loss_chunk=4096", f"train.grad_accum={accum}",
                       f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}",
                       f"mesh.backend={backend}", f"model.kernels={kernel_set}")


def _reference():
    if "ref" not in _one:
        _one["ref"] = _train(_mesh_cfg(), 1)
    return _one["ref"]


@pytest.mark.parametrize("mesh,accum,backend,kernel_set", [((8, 1, 1), 1, "jit", "cpu"),
                                                           ((1, 8, 1), 2, "jit", "standard"),
                                                           ((1, 1, 8), 2, "jit", "cpu"), ((8, 1, 1), 2, "pmap", "cpu")],
                         ids=["data8-one-microbatch", "fsdp8-standard", "tensor8", "pmap8"])
def test_every_mesh_drops_what_one_device_drops(mesh, accum, backend, kernel_set):
    """Against the one-device cpu run with two microbatches, to the tolerances of test_step (float32
    summation order). data8 takes the batch in one piece: a row's masks follow its global index, not
    its microbatch. The standard set on fsdp=8 takes the explicit-softmax path (its masks against the
    blocked path's); pmap gives each device's rows their global indices."""
    assert_same(_train(_mesh_cfg(mesh, accum, backend, kernel_set), 8), _reference())


# --- end to end: a dropout run resumed from its checkpoint, then scored and sampled

@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """A 6-step dropout run (checkpoints 3 and 6) and a copy resumed from checkpoint 3."""
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("dropout")
    (root / "corpus").mkdir()
    source = write_corpus(root / "corpus")
    straight, resumed = root / "straight", root / "resumed"
    assert main(_args(source, straight, 6, "checkpoint.every=3", RATE)) == 0
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    assert main(_args(source, resumed, 6, "checkpoint.every=3", RATE)) == 0
    return straight, resumed


def test_resume_with_dropout_is_bitwise(dropout_run):
    straight, resumed = dropout_run
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == list(range(6))
    assert got == expected  # every step, bitwise
    assert (resumed / "checkpoints" / "6").is_dir()  # steps 3..5 ran again after the restore
    assert load_config(str(resumed / "config.yaml")).model.dropout == 0.1


def test_scoring_and_generation_ignore_dropout(dropout_run):
    """The dropout run's checkpoint scores and samples the same, bitwise, with its own config
    (model.dropout=0.1) and with model.dropout=0, and the same twice."""
    from jaxlm.evaluate import evaluate
    from jaxlm.generate import Sampling, load

    run_dir = str(dropout_run[0])
    one = jax.devices()[:1]
    quiet = lambda *a, **k: None  # noqa: E731
    scores = [evaluate(run_dir, devices=one, write=False, log=quiet, overrides=o)[0]["loss"]
              for o in ((), (), ("model.dropout=0.0",))]
    assert scores[0] == scores[1] == scores[2]
    samples = []
    for o in ((), ("model.dropout=0.0",)):
        m = load(run_dir, overrides=o, devices=one, log=quiet)
        assert m.model.cfg.dropout == (0.0 if o else 0.1)
        samples.append(m.generator.generate(m.params, [[m.tokenizer.eos_id]] * 2, 12, Sampling(temperature=1.0)))
    assert samples[0] == samples[1]
