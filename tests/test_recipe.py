"""Recipe options of the model: model.qk_norm (Qwen3's per-head RMSNorm of q and k before RoPE),
model.activation=relu2 and model.logit_softcap. Their forward passes are checked against transformers' Qwen3 and GPT-2 in
tests/test_export.py (random models imported and exported back); here: what they compute inside
the model, their parameters' roles, the soft cap's loss and gradients on every loss path, the
refused settings, and the same steps on a mesh as on one device."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import mup
from jaxlm.errors import ConfigError
from jaxlm.optim import muon_labels

from conftest import decoder, tiny_config
from test_step import assert_same, train

RECIPE = ["model.family=llama", "model.n_kv_heads=8", "model.qk_norm=true", "model.activation=relu2",
          "model.logit_softcap=2.0"]


def test_qk_norm_normalises_each_heads_query_and_key_and_relu2_squares():
    cfg = tiny_config(*RECIPE, "model.scan_layers=false", "model.kernels=standard")
    model = decoder(cfg, 256, "standard")
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    variables = model.init(jax.random.key(0), tokens)
    params = flax.core.meta.unbox(variables["params"])
    attn = params["block_0"]["attn"]
    assert attn["q_norm"]["RMSNorm_0"]["scale"].shape == (cfg.model.head_dim,)
    assert attn["k_norm"]["RMSNorm_0"]["scale"].shape == (cfg.model.head_dim,)
    scale = jnp.linspace(0.5, 2.0, cfg.model.head_dim)
    params["block_0"]["attn"]["q_norm"]["RMSNorm_0"]["scale"] = scale
    _, state = model.apply({"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]["block_0"]
    eps = cfg.model.norm_eps

    def rms_norm(x):  # over each head's H entries
        x = np.asarray(x, np.float64)
        return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)

    for name, s in (("q", scale), ("k", 1.0)):  # [B, T, N, H] (K for k), before RoPE
        raw, normed = inter["attn"][name]["__call__"][0], inter["attn"][f"{name}_norm"]["__call__"][0]
        np.testing.assert_allclose(normed, rms_norm(raw) * np.asarray(s), rtol=1e-4, atol=1e-6)
    # relu2 gated: the MLP's hidden activation is relu(gate)^2 * up
    gate, up = inter["mlp"]["gate"]["__call__"][0], inter["mlp"]["up"]["__call__"][0]
    down_in = np.square(np.maximum(np.asarray(gate), 0)) * np.asarray(up)
    want = down_in @ np.asarray(params["block_0"]["mlp"]["down"]["kernel"])
    np.testing.assert_allclose(inter["mlp"]["__call__"][0], want, rtol=1e-4, atol=1e-6)


def test_the_norm_scales_are_norms_for_mup_and_adamw_leaves_under_muon():
    cfg = tiny_config(*RECIPE)
    params = flax.core.meta.unbox(decoder(cfg, 256).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    attn = params["blocks"]["attn"]
    assert mup.role(("blocks", "attn", "q_norm", "RMSNorm_0", "scale"), cfg.model) == "norm"
    labels = muon_labels(params)["blocks"]["attn"]
    assert labels["q_norm"]["RMSNorm_0"]["scale"] == "adam" and labels["q"]["kernel"] == "muon"
    assert attn["k_norm"]["RMSNorm_0"]["scale"].shape == (2, cfg.model.head_dim)  # scanned: one per layer


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 1, 8)], ids=lambda m: "x".join(map(str, m)))
def test_three_recipe_steps_on_a_mesh_equal_one_device(mesh):
    def cfg(m):
        return tiny_config(*RECIPE, "optim.eps=1e-6", "train.loss_chunk=4096", f"mesh.data={m[0]}",
                           f"mesh.fsdp={m[1]}", f"mesh.tensor={m[2]}")

    assert_same(train(cfg(mesh), 8, 3), train(cfg((1, 1, 1)), 1, 3))


@pytest.mark.parametrize("override,match", [
    (["model.family=gpt2", "model.qk_norm=true"], "model.qk_norm=true is for the llama family"),
    (["model.activation=relu"], "model.activation='relu' is not one of auto, relu2"),
    (["model.logit_softcap=-1"], "model.logit_softcap must be >= 0"),
])
def test_bad_recipe_settings_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(*override)


@pytest.mark.parametrize("tied", [False, True])
def test_the_soft_cap_is_the_same_loss_and_gradient_on_every_loss_path(tied):
    """cap * tanh(z / cap) on the logits: the plain path (the model's logits, autodiff), the cpu set's fused
    chunked loss (its own backward rule) and the standard set's chunked loss (autodiff) give the same loss and
    gradients; a cap of 0.5 changes the loss (the small model's logits reach past it)."""
    from jaxlm.step import train_loss

    tokens = jax.random.randint(jax.random.key(2), (4, 17), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    out = {}
    for kernel_set in ("cpu", "standard"):
        for cap in (0.0, 0.5):
            cfg = tiny_config("model.family=llama", f"model.tie_embeddings={str(tied).lower()}",
                              f"model.logit_softcap={cap}", "model.init_std=0.2")
            model = decoder(cfg, 256, kernel_set)
            params = flax.core.meta.unbox(model.init(jax.random.key(0), batch["inputs"])["params"])
            for chunk in (0, 4):
                f = jax.jit(jax.value_and_grad(lambda p: train_loss(p, batch, model, 64.0, 1e-3, chunk)[0]))
                out[kernel_set, cap, chunk] = f(params)
    want_loss, want_grad = out["standard", 0.5, 0]
    for key, (loss, grad) in out.items():
        if key[1] == 0.5:
            np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=str(key))
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, want_grad)
    assert abs(float(out["standard", 0.0, 0][0]) - float(want_loss)) > 1e-2


def test_export_refuses_the_soft_cap_by_name():
    from jaxlm.export import ExportError, to_hf

    with pytest.raises(ExportError, match="model.logit_softcap=30 has no transformers architecture"):
        to_hf({}, tiny_config("model.family=llama", "model.logit_softcap=30").model)
