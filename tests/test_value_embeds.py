"""Value embeddings (model.value_embeds): extra token tables added to the attention values of the
first and last layers. What they add and where, their parameters' roles (µP, Muon, weight decay,
counts), the KV-cache decode, the same steps on a mesh as on one device, and the refusals."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import mup
from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.generate import Generator, Sampling, recompute_greedy
from jaxlm.metrics import count_params
from jaxlm.model import value_embed_layers
from jaxlm.optim import decay_mask, muon_labels
from jaxlm.sharding import make_mesh

from conftest import decoder, tiny_config
from test_step import assert_same, train


@pytest.mark.parametrize("layers,tables,want", [(3, 1, [0, None, 0]), (4, 2, [0, 1, 0, 1]), (3, 2, [0, 1, 1]),
                                                (6, 2, [0, 1, None, None, 0, 1]), (2, 0, [None, None])])
def test_table_j_serves_layer_j_and_the_jth_of_the_last_layers(layers, tables, want):
    cfg = tiny_config(f"model.n_layers={layers}", f"model.value_embeds={tables}")
    assert value_embed_layers(cfg.model) == want


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_a_constant_table_row_is_a_value_bias_in_exactly_the_layers_it_serves(scan):
    """With every row of the table equal to r, the values of the layers it serves get + r: the same
    logits as the model without value embeddings whose v bias is b + r in layers 0 and 2 and b in
    layer 1 (3 layers, 1 table). Adding r in layer 1 as well must change the logits."""
    common = ["model.family=llama", "model.n_layers=3", "model.qkv_bias=true", "model.n_kv_heads=4",
              "model.init_std=0.2", f"model.scan_layers={str(scan).lower()}", "model.kernels=standard"]
    with_ve, without = tiny_config(*common, "model.value_embeds=1"), tiny_config(*common)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    p_ve = flax.core.meta.unbox(decoder(with_ve, 256, "standard").init(jax.random.key(0), tokens)["params"])
    m = with_ve.model
    assert p_ve["value_embed_0"].shape == (256, m.kv_heads, m.head_dim) and not np.any(p_ve["value_embed_0"])
    r = np.asarray(jax.random.normal(jax.random.key(2), (m.kv_heads, m.head_dim)), np.float32)
    p_ve["value_embed_0"] = jnp.broadcast_to(r, p_ve["value_embed_0"].shape)
    got = decoder(with_ve, 256, "standard").apply({"params": p_ve}, tokens)

    def biased(layers):
        p = {k: v for k, v in p_ve.items() if k != "value_embed_0"}
        p = jax.tree.map(np.array, p)
        for i in layers:
            if scan:
                p["blocks"]["attn"]["v"]["bias"][i] += r
            else:
                p[f"block_{i}"]["attn"]["v"]["bias"] += r
        return decoder(without, 256, "standard").apply({"params": p}, tokens)

    np.testing.assert_allclose(got, biased([0, 2]), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(got - biased([0, 1, 2]))) > 1e-3


def test_tables_are_embeddings_for_mup_adamw_under_muon_decay_and_the_counts():
    cfg = tiny_config("model.family=llama", "model.value_embeds=2", "model.tie_embeddings=true")
    params = flax.core.meta.unbox(decoder(cfg, 256).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    table = cfg.model.kv_heads * cfg.model.head_dim * 256
    assert mup.role(("value_embed_1",), cfg.model) == "embedding"  # not "tied", though the head is
    assert muon_labels(params)["value_embed_0"] == "adam"
    assert decay_mask(params, False)["value_embed_0"] is False and decay_mask(params, True)["value_embed_1"] is True
    counts = count_params(params)
    assert counts["embedding"] == 256 * cfg.model.d_model + 2 * table
    assert counts["head"] == 256 * cfg.model.d_model  # the tied head is the token table, not a value table


def test_cached_greedy_decode_equals_full_forward_decoding_with_value_embeddings():
    cfg = load_config(None, ["model.family=llama", "model.d_model=64", "model.n_layers=3", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.max_seq_len=64", "train.seq_len=32", "model.init_std=0.3",
                             "model.value_embeds=1", "model.scan_layers=false"])
    model = decoder(cfg, 300)
    params = flax.core.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    params["value_embed_0"] = 0.5 * jax.random.normal(jax.random.key(3), params["value_embed_0"].shape)
    gen = Generator(model, cfg.model, make_mesh(cfg, jax.devices()[:1]))
    prompts = [[1], [1, 7, 9, 200, 31], [1] + list(range(40, 51))]
    got = gen.generate(params, prompts, 20, Sampling(temperature=0))
    assert len({tuple(g) for g in got}) == 3
    for p, g in zip(prompts, got):
        assert g == recompute_greedy(model, params, p, 20)


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 8, 1)], ids=lambda m: "x".join(map(str, m)))
def test_steps_with_value_embeddings_on_a_mesh_equal_one_device(mesh):
    def cfg(m):
        return tiny_config("model.family=llama", "model.n_kv_heads=8", "model.value_embeds=1", "model.dropout=0.1",
                           "optim.eps=1e-6", "train.loss_chunk=4096", f"mesh.data={m[0]}", f"mesh.fsdp={m[1]}", f"mesh.tensor={m[2]}")

    got, want = train(cfg(mesh), 8, 3), train(cfg((1, 1, 1)), 1, 3)
    assert_same(got, want)
    assert np.any(want[1]["value_embed_0"] != 0)  # the zero tables learn


@pytest.mark.parametrize("override,match", [
    (["model.value_embeds=3"], "model.value_embeds must be between 0 and model.n_layers=2, got 3"),
    (["model.value_embeds=-1"], "model.value_embeds must be between 0"),
])
def test_bad_value_embed_settings_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(*override)


def test_export_refuses_value_embeddings_by_name():
    from jaxlm.export import ExportError, to_hf

    with pytest.raises(ExportError, match="model.value_embeds=1 has no transformers architecture"):
        to_hf({}, tiny_config("model.family=llama", "model.value_embeds=1").model)
