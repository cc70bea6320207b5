import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.ad_checkpoint import print_saved_residuals

from jaxlm.model import rope

from conftest import decoder, tiny_config


_inits = {}


def init(cfg, kernel_set="cpu", vocab=256, T=16):
    """(model, params, tokens); initialised once per model config (an init costs seconds: the layer
    scan is compiled each time), the same arrays for every test that asks (jax arrays are immutable)."""
    key = (repr(cfg.model), cfg.train.seq_len, kernel_set, vocab, T)
    if key not in _inits:
        model = decoder(cfg, vocab, kernel_set)
        tokens = jax.random.randint(jax.random.key(1), (2, T), 0, vocab)
        params = jax.tree.map(lambda x: x, model.init(jax.random.key(0), tokens)["params"])
        _inits[key] = model, nn.unbox(params), tokens
    return _inits[key]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_shape_and_causality(family, kernel_set):
    cfg = tiny_config(f"model.family={family}", "model.n_kv_heads=2")
    model, params, tokens = init(cfg, kernel_set)
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
    logits2 = model.apply({"params": params}, changed)
    np.testing.assert_allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not np.allclose(logits[:, 10:], logits2[:, 10:])


def test_family_parameters():
    _, gpt2, _ = init(tiny_config())
    assert "pos_embed" in gpt2 and "head" not in gpt2 and "bias" in gpt2["blocks"]["mlp"]["up"]
    assert gpt2["blocks"]["attn"]["q"]["kernel"].shape == (2, 64, 8, 8)  # (layers, embed, heads, head_dim)
    _, llama, _ = init(tiny_config("model.family=llama", "model.n_kv_heads=2"))
    assert "pos_embed" not in llama and "head" in llama and "gate" in llama["blocks"]["mlp"]
    assert "bias" not in llama["blocks"]["mlp"]["up"]
    assert llama["blocks"]["attn"]["k"]["kernel"].shape == (2, 64, 2, 8)  # grouped-query: 2 kv heads


def _remat_loss(model, tokens):
    return lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)


_no_remat = {}


def _gradients_without_remat(kernel_set):
    """(params, tokens, gradients) of the llama model without remat: computed once per kernel set."""
    if kernel_set not in _no_remat:
        model, params, tokens = init(tiny_config("model.family=llama"), kernel_set)
        _no_remat[kernel_set] = params, tokens, jax.grad(_remat_loss(model, tokens))(params)
    return _no_remat[kernel_set]


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(remat, kernel_set):
    params, tokens, g0 = _gradients_without_remat(kernel_set)
    model_r = decoder(tiny_config("model.family=llama", f"model.remat={remat}"), 256, kernel_set)
    g1 = jax.grad(_remat_loss(model_r, tokens))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)



@pytest.mark.parametrize("remat,saved", [("dots", 6), ("dots_no_batch", 6), ("full", 0)])
def test_dot_policies_save_the_linear_products(remat, saved, capsys):
    """The cpu kernels' linear products are custom-VJP calls, invisible to the dot policies:
    they must still be saved by name (q, k, v, o, gate, up per layer; down feeds only the residual)."""
    cfg = tiny_config("model.family=llama", f"model.remat={remat}", "model.scan_layers=false")
    model, params, tokens = init(cfg, "cpu")
    print_saved_residuals(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2), params)
    named = [line for line in capsys.readouterr().out.splitlines() if "named 'linear'" in line]
    assert len(named) == saved * cfg.model.n_layers, named

def test_unscanned_layers_match_scanned(kernel_set):
    cfg = tiny_config()
    model, params, tokens = init(cfg, kernel_set)
    unscanned = decoder(tiny_config("model.scan_layers=false"), 256, kernel_set)
    split = dict(params)
    blocks = split.pop("blocks")
    for i in range(cfg.model.n_layers):
        split[f"block_{i}"] = jax.tree.map(lambda x: x[i], blocks)
    np.testing.assert_allclose(model.apply({"params": params}, tokens),
                               unscanned.apply({"params": split}, tokens), rtol=1e-5, atol=1e-6)


def test_unrolled_scan_matches_scan(kernel_set):
    """model.scan_unroll=0 writes every block out in one program but keeps the stacked
    parameters: same parameter tree, same outputs and gradients as the while loop."""
    cfg = tiny_config("model.n_layers=3")
    model, params, tokens = init(cfg, kernel_set)
    unrolled = decoder(tiny_config("model.n_layers=3", "model.scan_unroll=0"), 256, kernel_set)
    unrolled_params = jax.eval_shape(unrolled.init, jax.random.key(0), tokens)["params"]  # its tree, not its values
    assert jax.tree.structure(nn.unbox(unrolled_params)) == jax.tree.structure(params)
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)))
    (a, ga), (b, gb) = loss(model)(params), loss(unrolled)(params)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
    hlo = lambda m: jax.jit(lambda p: m.apply({"params": p}, tokens)).lower(params).as_text()
    assert "while" in hlo(model) and "while" not in hlo(unrolled)


def test_bfloat16_compute_keeps_float32_params(kernel_set):
    model, params, tokens = init(tiny_config("model.dtype=bfloat16"), kernel_set)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert model.apply({"params": params}, tokens).dtype == jnp.bfloat16


def test_rope_is_a_rotation_and_relative():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    y = rope(x, pos, 10000.0)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    q, k = y[0, 3, 0], y[0, 1, 0]  # <R(3)q, R(1)k> depends on 3-1 only
    y2 = rope(x, pos + 7, 10000.0)
    np.testing.assert_allclose(q @ k, y2[0, 3, 0] @ y2[0, 1, 0], rtol=1e-4)


def test_segment_ids_block_attention_across_documents(kernel_set):
    cfg = tiny_config()
    model, params, tokens = init(cfg, kernel_set)
    seg = jnp.array([[0] * 8 + [1] * 8] * 2)
    a = model.apply({"params": params}, tokens, None, seg)
    b = model.apply({"params": params}, tokens.at[:, 2].set(0), None, seg)
    np.testing.assert_allclose(a[:, 8:], b[:, 8:], atol=1e-6)  # document 2 does not see document 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_document_scores_as_if_it_were_alone(family, kernel_set):
    """Loader segment ids + positions: document 2 of a packed row gives the logits it gives on its own."""
    from jaxlm.data.loader import add_segments

    cfg = tiny_config(f"model.family={family}")
    model, params, tokens = init(cfg, kernel_set)
    eos = 3
    row = tokens[:1].at[0, 5].set(eos)  # a document tail (0..4), then EOS starting document 2 (5..15)
    packed = add_segments({"inputs": np.asarray(row)}, eos)
    a = model.apply({"params": params}, row, packed["positions"], packed["segment_ids"])
    alone = model.apply({"params": params}, row[:, 5:])
    np.testing.assert_allclose(a[:, 5:], alone, atol=2e-5)
    plain = model.apply({"params": params}, row)  # without segments document 2 sees document 1
    assert not np.allclose(plain[:, 5:], alone, atol=1e-3)
