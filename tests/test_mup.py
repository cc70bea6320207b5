"""µP (model.parametrization=mup): the multiplier table, the init it gives, the optimizer's lr and eps
multipliers with the weight-decay product kept, the forward multipliers against their folded form,
bitwise SP at m = 1, and sharded steps equal to the single-device step."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxlm import mup
from jaxlm.config import OptimConfig
from jaxlm.errors import ConfigError
from jaxlm.export import fold_mup
from jaxlm.optim import make_optimizer

from conftest import decoder, tiny_config
from test_step import train

# width 64 over base 16: m = 4; head dim 8 over a base head dim of 4; alpha_out 2; embedding lr x 3
MUP = ["model.parametrization=mup", "model.mup_base_width=16", "model.mup_base_head_dim=4",
       "model.mup_output_mult=2.0", "model.mup_embed_lr_mult=3.0"]
M, Q_MULT, OUT_MULT, EMB = 4.0, math.sqrt(4 / 8), 2.0 / 4.0, 3.0


def _family(family: str, tied: bool) -> list[str]:
    extra = ["model.family=llama", "model.n_kv_heads=2"] if family == "llama" else []
    return extra + [f"model.tie_embeddings={str(tied).lower()}"]


def _init(cfg, vocab=256):
    model = decoder(cfg, vocab)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


def _roles(params, m):
    return {"/".join(str(k.key) for k in path): r for path, r in jax.tree_util.tree_leaves_with_path(
        mup.table(params, m))}


@pytest.mark.parametrize("family,tied,zero", [("gpt2", True, True), ("gpt2", False, True), ("llama", False, True),
                                              ("llama", True, False), ("llama", False, False)])
def test_table_for_both_families_tied_and_untied(family, tied, zero):
    cfg = tiny_config(*_family(family, tied), *MUP, *(["model.mup_zero_init=true"] if zero else []))
    assert cfg.model.mup_zero_init == zero  # off unless asked for
    model, params = _init(cfg)
    roles = _roles(params, model.cfg)
    expected = {"hidden": (1 / math.sqrt(M), 1 / M, 1.0), "query": (0.0 if zero else 1 / math.sqrt(M), 1 / M, Q_MULT),
                "readout": (0.0 if zero else 1.0, 1.0, OUT_MULT), "tied": (1.0, EMB, OUT_MULT),
                "embedding": (1.0, EMB, 1.0), "norm": (1.0, 1.0, 1.0), "bias": (1.0, 1.0, 1.0)}
    for name, r in roles.items():
        assert (r.init, r.lr, r.forward) == pytest.approx(expected[r.role], rel=1e-12), (name, r)
    mlp = ("gate", "up", "down") if family == "llama" else ("up", "down")
    hidden = {f"blocks/attn/{n}/kernel" for n in "kvo"} | {f"blocks/mlp/{n}/kernel" for n in mlp}
    assert {n for n, r in roles.items() if r.role == "hidden"} == hidden
    assert [n for n, r in roles.items() if r.role == "query"] == ["blocks/attn/q/kernel"]
    assert roles["embed/embedding"].role == ("tied" if tied else "embedding")
    assert ("head/kernel" in roles) == (not tied) and roles.get("head/kernel", roles["embed/embedding"]).forward == \
        pytest.approx(OUT_MULT)
    norms = {n for n, r in roles.items() if r.role == "norm"}
    assert len(norms) == (3 if family == "llama" else 6) and all("norm" in n for n in norms)
    assert all(n.endswith("/bias") for n, r in roles.items() if r.role == "bias")
    assert (roles.get("pos_embed") is not None) == (family == "gpt2")
    # under sp the same tree has every multiplier 1
    sp = dataclasses.replace(model.cfg, parametrization="sp")
    assert {(r.init, r.lr, r.forward) for r in _roles(params, sp).values()} == {(1.0, 1.0, 1.0)}

    # the init the model gives: zero query and untied head with zero init (else std / sqrt(m) and unchanged),
    # hidden std / sqrt(m), embeddings unchanged
    blocks = params["blocks"]
    if zero:
        assert not np.any(blocks["attn"]["q"]["kernel"])
        if not tied:
            assert not np.any(params["head"]["kernel"])
    else:
        np.testing.assert_allclose(np.std(blocks["attn"]["q"]["kernel"]), 0.02 / math.sqrt(M), rtol=0.05)
        if not tied:
            np.testing.assert_allclose(np.std(params["head"]["kernel"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(blocks["attn"]["k"]["kernel"]), 0.02 / math.sqrt(M), rtol=0.05)
    np.testing.assert_allclose(np.std(blocks["mlp"]["up"]["kernel"]), 0.02 / math.sqrt(M), rtol=0.05)
    np.testing.assert_allclose(np.std(blocks["mlp"]["down"]["kernel"]), 0.02 / math.sqrt(M * 2 * 2), rtol=0.05)
    np.testing.assert_allclose(np.std(params["embed"]["embedding"]), 0.02, rtol=0.05)
    lines = mup.describe(params, model.cfg)
    assert lines[0].startswith("parametrization: mup, m = d_model/base = 64/16 = 4;")
    assert any(line.split()[1] == "query" and ("init std zero" in line) == zero for line in lines[1:])
    assert "embedding lr x3;" in lines[0] and f"readout {'on' if zero else 'off'}" in lines[0]


def test_attention_and_output_multipliers():
    m = tiny_config(*MUP).model  # head dim 8
    assert mup.attn_alpha(m) == 2.0  # sqrt(base head dim 4)
    assert mup.query_mult(m) * m.head_dim ** -0.5 == pytest.approx(mup.attn_alpha(m) / m.head_dim)
    assert mup.output_mult(m) == OUT_MULT and mup.adam_eps(1e-8, m) == pytest.approx(1e-8 / M)
    explicit = tiny_config(*MUP, "model.mup_attn_mult=3.0").model
    assert mup.query_mult(explicit) * 8 ** -0.5 == pytest.approx(3.0 / 8)
    base = tiny_config("model.parametrization=mup").model  # base width and head dim 0: this model's, m = 1
    assert (mup.width_mult(base), mup.query_mult(base), mup.output_mult(base)) == (1.0, 1.0, 1.0)


def test_forward_multipliers_equal_their_folded_form_in_a_standard_model():
    """The µP model's logits are the sp model's with q and the final norm scaled (what export writes);
    without the folding they differ, so the multipliers are really in the forward pass."""
    for family, tied in (("gpt2", True), ("llama", False)):
        cfg = tiny_config(*_family(family, tied), *MUP, "model.mup_zero_init=false")
        model, params = _init(cfg)
        sp = decoder(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, parametrization="sp")), 256)
        tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
        ours = jax.jit(model.apply)({"params": params}, tokens)
        sp_apply = jax.jit(sp.apply)
        folded = sp_apply({"params": jax.tree.map(jnp.asarray, fold_mup(jax.device_get(params), cfg.model))}, tokens)
        np.testing.assert_allclose(ours, folded, rtol=1e-5, atol=1e-6)
        assert float(jnp.max(jnp.abs(ours - sp_apply({"params": params}, tokens)))) > 1e-3, family


def _opt_tree():
    rng = np.random.default_rng(0)
    shapes = {"embed": {"embedding": (8, 4)}, "head": {"kernel": (4, 8)},
              "blocks": {"attn": {"q": {"kernel": (4, 2, 2), "bias": (2, 2)}, "k": {"kernel": (4, 2, 2)}},
                         "attn_norm": {"RMSNorm_0": {"scale": (4,)}}}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _first_update(o: OptimConfig, m, grads, params):
    tx, _ = make_optimizer(o, 10, m)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_lr_scaling_keeps_the_weight_decay_product():
    """One AdamW step at m = 4: hidden leaves move by lr * (adam(eps / m) / m + wd * p), the others by
    lr * (adam(eps / m) + wd * p) where they decay; a zero gradient gives the decay alone, lr * wd * p,
    the same as sp's."""
    m = tiny_config(*MUP, "model.family=llama", "model.tie_embeddings=false").model
    o = OptimConfig(lr=0.1, schedule="constant", warmup_steps=0, eps=1e-3, weight_decay=0.5, grad_clip=0.0)
    params = _opt_tree()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.sign(p) * (1 + jnp.abs(p)), params)

    def adam(g):  # Adam's first step: bias-corrected m / (sqrt(v) + eps) = g / (|g| + eps / m)
        return g / (jnp.abs(g) + o.eps / M)

    got = _first_update(o, m, grads, params)
    lr_mult = {"hidden": 1 / M, "query": 1 / M, "embedding": EMB}
    decays = {"hidden", "query"}  # matrices; not embeddings, the head, norms or biases
    for path, u in jax.tree_util.tree_leaves_with_path(got):
        keys = tuple(str(k.key) for k in path)
        role = mup.role(keys, m)
        g, p = _at(grads, keys), _at(params, keys)
        want = -o.lr * (adam(g) * lr_mult.get(role, 1.0) + (o.weight_decay * p if role in decays else 0.0))
        np.testing.assert_allclose(u, want, rtol=1e-6, err_msg="/".join(keys))
    zero = jax.tree.map(jnp.zeros_like, grads)
    sp = dataclasses.replace(m, parametrization="sp")
    k = ("blocks", "attn", "k", "kernel")
    decay_mup, decay_sp = _at(_first_update(o, m, zero, params), k), _at(_first_update(o, sp, zero, params), k)
    np.testing.assert_allclose(decay_mup, -o.lr * o.weight_decay * _at(params, k), rtol=1e-6)
    np.testing.assert_array_equal(decay_mup, decay_sp)


def _at(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _steps(family, *extra, n_devices=1, mesh=(1, 1, 1), steps=2):
    fam = ["model.family=llama", "model.n_kv_heads=8"] if family == "llama" else []
    cfg = tiny_config(*fam, "optim.eps=1e-6", f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}",
                      f"mesh.tensor={mesh[2]}", *extra)
    return train(cfg, n_devices, steps)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_m1_without_zero_init_is_bitwise_sp(family):
    metrics_sp, params_sp = _steps(family)
    metrics_mup, params_mup = _steps(family, "model.parametrization=mup", "model.mup_base_width=64",
                                     "model.mup_zero_init=false")
    for a, b in zip(metrics_sp, metrics_mup):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    jax.tree.map(np.testing.assert_array_equal, params_mup, params_sp)
    assert jax.tree.structure(params_mup) == jax.tree.structure(params_sp)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mup_five_steps_on_one_device_equal_the_2x2x2_mesh(family):
    """float32, relative 1e-5: losses and gradient norms, and each parameter relative to its leaf's scale
    (at least the init std: the key biases get an exactly zero gradient, softmax being blind to a shift of
    a query's scores, so they hold nothing but roundoff that Adam scales up by 1 / eps)."""
    extra = MUP + ["train.loss_chunk=4096", "optim.eps=4e-6", "model.mup_zero_init=true"]  # eps / m = 1e-6
    one = _steps(family, *extra, steps=5)
    mesh = _steps(family, *extra, n_devices=8, mesh=(2, 2, 2), steps=5)
    for a, b in zip(mesh[0], one[0]):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(float(np.max(np.abs(b))), 0.02))

    jax.tree.map(close, mesh[1], one[1])
    assert np.any(one[1]["blocks"]["attn"]["q"]["kernel"])  # the zero-initialised query has moved


@pytest.mark.parametrize("override,match", [
    ("model.parametrization=mpu", "model.parametrization='mpu' is not one of sp, mup; did you mean 'mup'"),
    ("model.mup_base_width=-8", "model.mup_base_width must be >= 0"),
    ("model.mup_attn_mult=-1", "model.mup_attn_mult must be >= 0"),
    ("model.mup_output_mult=0", r"model.mup_output_mult \(alpha_out\) must be > 0"),
    ("model.mup_embed_lr_mult=-1", "model.mup_embed_lr_mult must be > 0"),
])
def test_bad_mup_settings_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("model.parametrization=mup", override)


def test_optimizer_under_sp_is_optax_adamw():
    """The sp optimizer is the chain it always was (same state tree), whatever the mup keys say."""
    m = tiny_config("model.mup_base_width=16").model
    o = OptimConfig()
    params = _opt_tree()
    tx, _ = make_optimizer(o, 10, m)
    plain, _ = make_optimizer(o, 10)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
    assert isinstance(tx.init(params)[1][0], optax.ScaleByAdamState)


def test_mup_run_resumes_bitwise_and_init_from_takes_params_across_parametrizations(tmp_path, small_corpus, capsys):
    """Checkpoints hold plain parameters: a µP run resumed from its step-3 checkpoint repeats the uninterrupted
    losses bit for bit; resuming it as sp is refused (the optimizer states differ), starting an sp run from its
    params (init_from) is not."""
    import shutil

    from jaxlm.cli import main
    from jaxlm.metrics import read_metrics
    from test_cli import TINY_CLI

    def args(run_dir, *extra):
        return ["train", f"data.source={small_corpus}", f"run.dir={run_dir}", "train.steps=6", "train.log_every=1",
                "eval.every=0", "checkpoint.every=3", "run.tensorboard=false", "model.parametrization=mup",
                "model.mup_base_width=8", "optim.lr=1e-2"] + TINY_CLI + list(extra)

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(straight)) == 0
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    assert main(args(resumed)) == 0
    assert "resuming" in capsys.readouterr().err
    assert sorted(losses(resumed)) == list(range(6)) and losses(resumed) == losses(straight)
    assert main(args(resumed, "model.parametrization=sp", "train.steps=9")) == 2
    assert "model.parametrization ('mup' -> 'sp')" in capsys.readouterr().err
    assert main(args(tmp_path / "sp", "model.parametrization=sp", f"checkpoint.init_from={straight}",
                     "train.steps=1")) == 0
    assert "initialised params from" in capsys.readouterr().err
