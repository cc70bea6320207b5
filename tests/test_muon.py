"""optim.name=muon: which leaves Muon takes, each layer's matrix orthogonalised on its own (checked against a
Newton-Schulz iteration written out here in float64), and the same steps on every mesh as on one device."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.optim import make_optimizer, muon_labels

from conftest import decoder, tiny_config
from test_step import assert_same, train

NS = (3.4445, -4.775, 2.0315)


def _params(cfg, vocab=256):
    model = decoder(cfg, vocab, "standard")
    return flax.core.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic iteration on one matrix, float64: X / |X|_F, then X <- a X + (b A + c A A) X with A = X X^T,
    on the wide orientation."""
    x = np.asarray(g, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    a, b, c = NS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_muon_takes_the_blocks_kernels_and_adamw_everything_else(family):
    for scan in ("true", "false"):
        p = _params(tiny_config(f"model.family={family}", f"model.scan_layers={scan}"))
        labels = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(muon_labels(p))}
        for name, label in labels.items():
            in_block = name.startswith("['block")
            want = "muon" if in_block and name.endswith("['kernel']") else "adam"
            assert label == want, (name, label)
        adam = sorted(n for n, v in labels.items() if v == "adam")
        assert any("embed" in n for n in adam) and any("norm" in n.lower() for n in adam)
        assert family == "llama" or any("bias" in n for n in adam)  # gpt2's biases
        assert sum(v == "muon" for v in labels.values()) == (6 if family == "gpt2" else 7) * (1 if scan == "true" else 2)


@pytest.mark.parametrize("scan", ["true", "false"])
def test_each_layers_matrix_is_orthogonalised_on_its_own(scan):
    """The first step's update of q [D, N, H] (a D x NH matrix), o [N, H, D] (NH x D) and the MLP's down
    projection [F, D], for each layer of the stack, equals -lr * 0.2 sqrt(max(in, out)) * NS(gradient) of that
    layer's matrix alone (a positive multiple of the gradient before Newton-Schulz changes nothing: it
    normalises first)."""
    cfg = tiny_config("model.family=llama", f"model.scan_layers={scan}", "optim.name=muon", "optim.grad_clip=0",
                      "optim.weight_decay=0.1", "optim.lr=1e-3")
    p = _params(cfg)
    tx, _ = make_optimizer(cfg.optim, 10, cfg.model)
    rng = np.random.default_rng(0)
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), p)
    u, _ = tx.update(g, tx.init(p), p)
    for layer in (0, 1):
        def pick(tree, *keys):
            node = tree["blocks"] if scan == "true" else tree[f"block_{layer}"]
            for k in keys:
                node = node[k]
            return np.asarray(node["kernel"][layer] if scan == "true" else node["kernel"])

        for keys, n_in in ((("attn", "q"), 1), (("attn", "o"), 2), (("mlp", "down"), 1)):
            grad, upd, param = pick(g, *keys), pick(u, *keys), pick(p, *keys)
            rows = int(np.prod(grad.shape[:n_in]))
            matrix = grad.reshape(rows, -1)
            want = -1e-3 * (0.2 * np.sqrt(max(matrix.shape)) * _newton_schulz(matrix) + 0.1 * param.reshape(rows, -1))
            np.testing.assert_allclose(upd.reshape(rows, -1), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    if scan == "true":  # the stack as one flattened matrix would give another update
        q = np.asarray(g["blocks"]["attn"]["q"]["kernel"]).reshape(2 * 64, -1)
        flat = -1e-3 * 0.2 * np.sqrt(128) * _newton_schulz(q)
        assert np.abs(np.asarray(u["blocks"]["attn"]["q"]["kernel"]).reshape(128, -1) - flat).max() > 1e-4


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 4, 2), (1, 8, 1)], ids=lambda m: "x".join(map(str, m)))
def test_five_muon_steps_on_a_mesh_equal_one_device(mesh):
    def cfg(m):
        return tiny_config("model.family=llama", "model.n_kv_heads=8", "optim.name=muon", "optim.eps=1e-6",
                           f"mesh.data={m[0]}", f"mesh.fsdp={m[1]}", f"mesh.tensor={m[2]}", "model.kernels=standard")

    one = train(cfg((1, 1, 1)), 1, 5)
    assert_same(train(cfg(mesh), 8, 5), one)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_memory_plan_counts_one_moment_per_muon_matrix(family):
    from jaxlm.memory import block_matrices, plan

    cfg = tiny_config(f"model.family={family}", "model.n_kv_heads=4" if family == "llama" else "model.n_kv_heads=0")
    p = _params(cfg)
    n_muon = sum(x.size for x, label in zip(jax.tree.leaves(p), jax.tree.leaves(muon_labels(p))) if label == "muon")
    assert n_muon == block_matrices(cfg.model) > 0
    n = sum(x.size for x in jax.tree.leaves(p))
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    adamw = plan(cfg, cfg.model, n, 256, mesh, 0).state
    muon = plan(tiny_config(f"model.family={family}", "optim.name=muon"), cfg.model, n, 256, mesh, 0).state
    assert adamw == 3 * 4 * n and adamw - muon == 4 * n_muon


# µP at width 64 over a base of 16 (m = 4), embedding lr x 3
MUP = ["model.parametrization=mup", "model.mup_base_width=16", "model.mup_embed_lr_mult=3.0"]


@pytest.mark.parametrize("rms,hidden", [(0.2, 0.5), (0.0, 1.0)])
def test_mup_under_muon_scales_the_hidden_matrices_by_the_spectral_rule(rms, hidden):
    """µP's first Muon step against sp's on the same gradients (no decay): the hidden matrices move by
    1 / sqrt(m) of sp's with the update RMS pinned (optim.muon_rms > 0) and by as much with optax's shape
    scaling (muon_rms = 0); on the AdamW side the embedding moves by mup_embed_lr_mult of sp's, the head,
    norms and biases as sp's."""
    base = ["model.family=llama", "model.tie_embeddings=false", "optim.name=muon", "optim.grad_clip=0",
            "optim.weight_decay=0", "optim.eps=1e-12", f"optim.muon_rms={rms}"]
    sp, mu = tiny_config(*base), tiny_config(*base, *MUP)
    p = _params(sp)
    rng = np.random.default_rng(0)
    g = jax.tree.map(lambda x: jnp.asarray(1e-3 * rng.choice([-1, 1], x.shape) * (1 + rng.random(x.shape)),
                                           jnp.float32), p)  # no entry near 0, where Adam's eps would count

    def first(cfg):
        tx, _ = make_optimizer(cfg.optim, 10, cfg.model)
        return tx.update(g, tx.init(p), p)[0]

    u_sp, u_mu = first(sp), first(mu)
    labels = muon_labels(p)
    seen = set()
    for (path, a), b, label in zip(jax.tree_util.tree_leaves_with_path(u_mu), jax.tree.leaves(u_sp),
                                   jax.tree.leaves(labels)):
        name = jax.tree_util.keystr(path)
        want = hidden if label == "muon" else 3.0 if "embed" in name else 1.0
        seen.add((label, want))
        np.testing.assert_allclose(np.asarray(a), want * np.asarray(b), rtol=1e-5, atol=1e-12, err_msg=name)
    assert seen == {("muon", hidden), ("adam", 3.0), ("adam", 1.0)}


def test_mup_under_muon_at_the_base_width_is_sp_muon_bit_for_bit():
    """m = 1, alpha_out 1, embedding multiplier 1, no zero init: every multiplier is 1 and left out."""
    sp = train(tiny_config("model.family=llama", "optim.name=muon", "model.kernels=standard"), 1, 2)
    mu = train(tiny_config("model.family=llama", "optim.name=muon", "model.kernels=standard",
                           "model.parametrization=mup", "model.mup_base_width=64"), 1, 2)
    for a, b in zip(sp[0], mu[0]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    jax.tree.map(np.testing.assert_array_equal, mu[1], sp[1])


def test_five_mup_muon_steps_on_the_2x2x2_mesh_equal_one_device():
    def cfg(m):
        return tiny_config("model.family=llama", "model.n_kv_heads=8", "optim.name=muon", "optim.eps=4e-6",
                           f"mesh.data={m[0]}", f"mesh.fsdp={m[1]}", f"mesh.tensor={m[2]}", "model.kernels=standard",
                           *MUP, "model.mup_output_mult=2.0")

    one = train(cfg((1, 1, 1)), 1, 5)
    assert_same(train(cfg((2, 2, 2)), 8, 5), one)
