"""Decoder-only Transformer for the gpt2 and llama families, in Flax Linen.

One set of modules serves both families; `ModelConfig.family` picks the norm (LayerNorm /
RMSNorm), the position scheme (learned table / RoPE), the MLP (GELU / SwiGLU) and the
defaults for biases and tied embeddings. Parameters and block-boundary activations carry
logical axis names only; `sharding.py` maps them onto the mesh. The operations that differ
between kernel sets (products, norms, activations, attention) come from `jaxlm.kernels`,
by the resolved `cfg.kernels` and `cfg.attention`; the parameter tree is the same for both.
Dropout (`cfg.dropout`) acts only when the caller passes `dropout=(key, rows)` (the train
step): on the attention and MLP outputs before the residual adds, and on the attention
probabilities; without it the model is deterministic. Under `cfg.parametrization=mup` the init of
each matrix and the two forward multipliers (on q, on the final hidden states) come from `jaxlm.mup`;
under sp, or wherever a multiplier is exactly 1, they are not in the program.

Shape suffixes: B batch, T sequence length, D model width, N query heads, K key/value
heads, H head dimension, F MLP width, V vocabulary.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxlm import kernels, mup
from jaxlm.config import ModelConfig


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def _normal(std: float | None, names: tuple):
    """A normal init of `std`; None: zeros (µP's zero-initialised query and readout)."""
    if std is None:
        return _zeros(names)
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _constrain(x, names: tuple):
    return nn.with_logical_constraint(x, names)


class _NormParams(nn.Module):
    """A norm through the cpu kernels' `norm`, with its parameters under Flax's own names
    (LayerNorm_0 / RMSNorm_0: scale, bias), so checkpoints and exports are those of
    nn.LayerNorm / nn.RMSNorm whichever kernels trained them."""

    cfg: ModelConfig
    rms: bool

    @nn.compact
    def __call__(self, x_BTD):
        c = self.cfg
        D = x_BTD.shape[-1]
        scale = self.param("scale", _ones(("norm",)), (D,), jnp.float32)
        bias = None
        if not self.rms and c.use_bias:
            bias = self.param("bias", _zeros(("norm",)), (D,), jnp.float32)
        return kernels.CPU.norm(x_BTD.astype(compute_dtype(c)), scale, bias, self.rms, c.norm_eps)


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama) over the last axis, statistics in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.cfg
        rms = c.family == "llama"
        name = "RMSNorm_0" if rms else "LayerNorm_0"
        if kernels.ops(c.kernels).norm is not None:
            return _NormParams(c, rms, name=name)(x_BTD)
        kw = dict(epsilon=c.norm_eps, dtype=compute_dtype(c), param_dtype=jnp.float32, scale_init=_ones(("norm",)))
        if rms:
            return nn.RMSNorm(**kw, name=name)(x_BTD)
        return nn.LayerNorm(**kw, use_bias=c.use_bias, bias_init=_zeros(("norm",)), use_fast_variance=False,
                            name=name)(x_BTD)


def rope_frequencies(c: ModelConfig) -> np.ndarray:
    """The H/2 rotary frequencies (float32): theta^(-i/(H/2)), and with model.rope_scaling=llama3 the
    frequency scaling Llama 3.1 was trained with. Wavelengths shorter than the original context over
    rope_high_freq_factor keep their frequency; those longer than it over rope_low_freq_factor are
    divided by rope_scaling_factor; in between, the two are blended linearly in context/wavelength."""
    half = c.head_dim // 2
    inv = (1.0 / c.rope_theta ** (np.arange(half, dtype=np.float32) / np.float32(half))).astype(np.float32)
    if c.rope_scaling != "llama3":
        return inv
    factor, lo, hi, ctx = (np.float32(c.rope_scaling_factor), np.float32(c.rope_low_freq_factor),
                           np.float32(c.rope_high_freq_factor), np.float32(c.rope_original_max_len))
    wavelen = np.float32(2 * np.pi) / inv
    scaled = np.where(wavelen > ctx / lo, inv / factor, inv)
    blend = (ctx / wavelen - lo) / (hi - lo)
    middle = (wavelen >= ctx / hi) & (wavelen <= ctx / lo)
    return np.where(middle, (1 - blend) * scaled / factor + blend * scaled, scaled).astype(np.float32)


def rope(x_BTNH, positions_BT, inv_freq_h):
    """Rotary embedding in the rotate-half layout (the Hugging Face Llama layout), at the frequencies
    `inv_freq_h` (`rope_frequencies`)."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h, jnp.float32)
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Linear(nn.Module):
    """x @ kernel (+ bias): the first `n_in` kernel dims contract with the last `n_in` dims of x.

    Written out (rather than nn.DenseGeneral) so every kernel is created with its full
    multi-dimensional shape and logical names, e.g. (embed, heads, head_dim). The product is
    the kernel set's `contract`.
    """

    shape: tuple[int, ...]
    names: tuple[str, ...]
    std: float | None  # None: zero init
    use_bias: bool
    dtype: jnp.dtype
    kernels: str
    n_in: int = 1

    def setup(self):  # setup, not compact: the parent may read `kernel` without calling the layer
        self.kernel = self.param("kernel", _normal(self.std, self.names), self.shape, jnp.float32)
        if self.use_bias:
            self.bias = self.param("bias", _zeros(self.names[self.n_in:]), self.shape[self.n_in:], jnp.float32)

    def __call__(self, x):
        product = kernels.ops(self.kernels).contract(x.astype(self.dtype), self.kernel.astype(self.dtype), self.n_in)
        y = checkpoint_name(product, "linear")
        if self.use_bias:
            y = y + self.bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv=None, slots=None, drop=None, ve_BTKH=None):
        """kv: this layer's cache (k_BSKH, v_BSKH) or None; slots: (first slot written, valid_BS);
        drop: this layer's dropout keys [sites, B, 2] (training only) or None; ve_BTKH: this layer's
        value embedding (added to the values) or None."""
        c = self.cfg
        D, N, K, H = c.d_model, c.n_heads, c.kv_heads, c.head_dim
        linear = functools.partial(Linear, use_bias=c.use_bias, dtype=compute_dtype(c), kernels=c.kernels)
        std = mup.init_std(c, "hidden", c.init_std)
        qkv = functools.partial(linear, use_bias=c.use_qkv_bias)
        q_BTNH = qkv((D, N, H), ("embed", "heads", "head_dim"), mup.init_std(c, "query", c.init_std),
                     name="q")(x_BTD)
        k_BTKH = qkv((D, K, H), ("embed", "kv_heads", "head_dim"), std, name="k")(x_BTD)
        v_BTKH = qkv((D, K, H), ("embed", "kv_heads", "head_dim"), std, name="v")(x_BTD)
        if ve_BTKH is not None:  # value embeddings: a token's own table row joins its value (and the cache)
            v_BTKH = v_BTKH + ve_BTKH.astype(v_BTKH.dtype)
        if c.qk_norm:  # each head's q and k RMS-normalised over the head dim, before RoPE (Qwen3's order)
            q_BTNH, k_BTKH = Norm(c, name="q_norm")(q_BTNH), Norm(c, name="k_norm")(k_BTKH)
        if c.family == "llama":
            q_BTNH = rope(q_BTNH, positions_BT, rope_frequencies(c))
            k_BTKH = rope(k_BTKH, positions_BT, rope_frequencies(c))
        if mup.query_mult(c) != 1.0:  # µP: scores alpha_attn / H * q.k, the kernels scaling by 1/sqrt(H)
            q_BTNH = q_BTNH * jnp.asarray(mup.query_mult(c), q_BTNH.dtype)
        q_BTNH = _constrain(q_BTNH, ("batch", "length", "act_heads", "head_dim"))
        k_BTKH = _constrain(k_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        v_BTKH = _constrain(v_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        out_std = mup.init_std(c, "hidden", c.init_std / (2 * c.n_layers) ** 0.5)
        out = linear((N, H, D), ("heads", "head_dim", "embed"), out_std, n_in=2, name="o")
        if kv is not None:  # decoding: write this call's keys and values into the cache, attend over it
            index, valid_BS = slots
            k_BSKH = jax.lax.dynamic_update_slice_in_dim(kv[0], k_BTKH.astype(kv[0].dtype), index, axis=1)
            v_BSKH = jax.lax.dynamic_update_slice_in_dim(kv[1], v_BTKH.astype(kv[1].dtype), index, axis=1)
            query_slot_T = index + jnp.arange(x_BTD.shape[1])
            causal_TS = jnp.arange(k_BSKH.shape[1])[None, :] <= query_slot_T[:, None]
            mask = causal_TS[None, None] & valid_BS[:, None, None, :]
            out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype),
                                                    v_BSKH.astype(q_BTNH.dtype), mask=mask)
            return out(out_BTNH), (k_BSKH, v_BSKH)
        # causal; packed documents (segment ids) do not attend to each other
        probs_B2 = None if drop is None else drop[kernels.dropout.PROBS]
        out_BTNH = kernels.attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, c, probs_B2)
        return out(out_BTNH), None


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.cfg
        D, F = c.d_model, c.ff_dim
        linear = functools.partial(Linear, use_bias=c.use_bias, dtype=compute_dtype(c), kernels=c.kernels)
        up = functools.partial(linear, (D, F), ("embed", "mlp"), mup.init_std(c, "hidden", c.init_std))
        ops = kernels.ops(c.kernels)
        if c.activation == "relu2":  # plain JAX in every kernel set: relu(x)^2, gated for llama
            first = up(name="gate" if c.family == "llama" else "up")(x_BTD)
            h_BTF = jnp.square(jax.nn.relu(first))
            if c.family == "llama":
                h_BTF = h_BTF * up(name="up")(x_BTD)
        elif c.family == "llama":
            h_BTF = ops.swiglu(up(name="gate")(x_BTD), up(name="up")(x_BTD))
        else:
            h_BTF = ops.gelu(up(name="up")(x_BTD))
        h_BTF = _constrain(h_BTF, ("batch", "length", "act_mlp"))
        out_std = mup.init_std(c, "hidden", c.init_std / (2 * c.n_layers) ** 0.5)
        return linear((F, D), ("mlp", "embed"), out_std, name="down")(h_BTF)


def _dropout(h_BTD, kept_BTD, rate: float):
    """The residual branch h with dropout at `rate` (kept: its surviving elements), or h itself."""
    return h_BTD if kept_BTD is None else kernels.dropout.apply(h_BTD, kept_BTD, rate)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv=None, slots=None, drop=None, ve_BTKH=None):
        """drop: this layer's dropout keys [sites, B, 2] (a slice of `kernels.dropout.row_keys`), or
        None: no dropout; ve_BTKH: this layer's value embedding or None."""
        c = self.cfg
        kept = [None, None]  # the surviving elements of the attention and the MLP branch
        if drop is not None:  # both masks in one hash: sites ATTN_OUT and MLP_OUT are 0 and 1
            kept = kernels.dropout.residual_keep(drop[:2], x_BTD.shape[1], x_BTD.shape[2], c.dropout)
        h_BTD, kv = Attention(c, name="attn")(Norm(c, name="attn_norm")(x_BTD), positions_BT, segment_ids_BT,
                                              kv, slots, drop, ve_BTKH)
        x_BTD = x_BTD + _dropout(h_BTD, kept[kernels.dropout.ATTN_OUT], c.dropout)
        h_BTD = Mlp(c, name="mlp")(Norm(c, name="mlp_norm")(x_BTD))
        x_BTD = x_BTD + _dropout(h_BTD, kept[kernels.dropout.MLP_OUT], c.dropout)
        x_BTD = _constrain(x_BTD, ("batch", "length", "act_embed"))
        return x_BTD, kv  # (carry, output) so the block can be scanned; kv: the updated cache or None


# The cpu kernels' linear products are custom-VJP calls (kernels.dots.contract), which the
# dot policies do not see; they are named "linear" and saved by name as well.
_save_linear = jax.checkpoint_policies.save_only_these_names("linear")
_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _save_linear),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _save_linear),
}


class Decoder(nn.Module):
    """tokens_BT -> logits_BTV. `vocab_size` is resolved (tokenizer size, maybe padded), and so
    are `cfg.kernels` and `cfg.attention` (see `jaxlm.kernels.resolve`).

    With `cache` (see `init_cache`) it is a decode step: the keys and values of tokens_BT
    are written into cache slots index .. index+T-1, attention covers the valid slots up to
    each query's own, and it returns (logits_BTV, updated cache).

    With `hidden=True` it returns (final hidden states x_BTD, head matrix) instead of
    logits: the embedding table [V, D] when the head is tied, else the head kernel [D, V].

    `dropout=(key, rows_B)` turns dropout on (training, `cfg.dropout` > 0): key is the step's
    (`kernels.dropout.step_key`), rows_B the global batch index of each row of tokens_BT.
    Without it (evaluation, scoring, generation) or at rate 0 the model is deterministic and
    its program has no dropout in it.
    """

    cfg: ModelConfig
    vocab_size: int

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, hidden=False, dropout=None):
        c = self.cfg
        dt = compute_dtype(c)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        embed = nn.Embed(self.vocab_size, c.d_model, embedding_init=_normal(c.init_std, ("vocab", "embed")),
                         dtype=dt, param_dtype=jnp.float32, name="embed")
        # Gather rows from a table replicated for the lookup (FSDP gathers weights for compute
        # anyway); a lookup into a vocab- and width-sharded table makes XLA replicate it silently.
        table_VD = _constrain(embed.embedding, (None, "act_embed"))
        x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(dt)
        if c.family == "gpt2":
            pos_TD = self.param("pos_embed", _normal(c.init_std / 2, ("length", "embed")),
                                (c.max_seq_len, c.d_model), jnp.float32)
            pos_TD = _constrain(pos_TD, (None, "act_embed"))
            x_BTD = x_BTD + jnp.take(pos_TD, positions_BT, axis=0).astype(dt)
        x_BTD = _constrain(x_BTD, ("batch", "length", "act_embed"))

        ve_L = value_embeddings(self, c, tokens_BT, self.vocab_size, dt)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        kv = slots = None
        if cache is not None:
            kv, slots = (cache["k"], cache["v"]), (cache["index"], cache["valid"])
        # keys [L, sites, B, 2], layer by layer like the parameters; no argument at all without dropout
        drop = () if dropout is None or c.dropout == 0 or cache is not None else (
            kernels.dropout.row_keys(dropout[0], c.n_layers, dropout[1]),)
        # the blocks' optional trailing arguments, layer by layer: dropout keys, then value embeddings
        # (with a None for the keys when there are none, so each keeps its position)
        extra, axes = drop, (0,) * len(drop)
        if ve_L is not None:
            extra, axes = (extra or (None,)) + (ve_L,), (axes or (nn.broadcast,)) + (0,)
        if c.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast) + axes,
                            length=c.n_layers, unroll=c.scan_unroll or c.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTD, kv = stack(c, name="blocks")(x_BTD, positions_BT, segment_ids_BT, kv, slots, *extra)
        else:
            layers = []
            for i in range(c.n_layers):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                x_BTD, layer_kv = block(c, name=f"block_{i}")(x_BTD, positions_BT, segment_ids_BT, layer_kv, slots,
                                                              *(None if e is None else e[i] for e in extra))
                layers.append(layer_kv)
            if kv is not None:
                kv = tuple(jnp.stack([lk[j] for lk in layers]) for j in (0, 1))

        x_BTD = Norm(c, name="final_norm")(x_BTD)
        if mup.output_mult(c) != 1.0:  # µP: logits alpha_out / m * h.W, on h so every loss path sees it
            x_BTD = x_BTD * jnp.asarray(mup.output_mult(c), x_BTD.dtype)
        if not c.tied:
            head = Linear((c.d_model, self.vocab_size), ("embed", "vocab"), mup.init_std(c, "readout", c.init_std),
                          use_bias=False, dtype=dt, kernels=c.kernels, name="head")
        if hidden:  # the loss applies the head itself, in chunks of the sequence (see step.train_loss)
            return x_BTD, (embed.embedding if c.tied else head.kernel)
        if c.tied:
            logits_BTV = kernels.ops(c.kernels).attend(x_BTD.astype(dt), embed.embedding.astype(dt))
        else:
            logits_BTV = head(x_BTD)
        logits_BTV = kernels.standard.softcap(_constrain(logits_BTV, ("batch", "length", "act_vocab")),
                                              c.logit_softcap)
        if cache is None:
            return logits_BTV
        return logits_BTV, {**cache, "k": kv[0], "v": kv[1], "index": cache["index"] + tokens_BT.shape[1]}


def value_embed_layers(c: ModelConfig) -> list:
    """Which value-embedding table each layer adds to its values (None: none): table j serves layer j
    and layer n_layers - value_embeds + j (modded-nanogpt's first and last layers); where the two
    ranges overlap (value_embeds > n_layers / 2) the first wins."""
    n, k = c.n_layers, c.value_embeds
    return [i if i < k else (i - (n - k) if i >= n - k else None) for i in range(n)]


def value_embeddings(module: nn.Module, c: ModelConfig, tokens_BT, vocab_size: int, dt):
    """The value embeddings of `tokens_BT`, a [B, T, K, H] or None for each layer; stacked into
    [L, B, T, K, H] under model.scan_layers, with zeros where a layer has no table (so the scanned
    block adds exactly nothing there). None when model.value_embeds is 0. The tables are parameters
    `value_embed_j` [V, K, H] of `module`, zero at init: training starts from the model without them."""
    if not c.value_embeds:
        return None
    shape = (vocab_size, c.kv_heads, c.head_dim)
    tables = [module.param(f"value_embed_{j}", _zeros(("vocab", "kv_heads", "head_dim")), shape, jnp.float32)
              for j in range(c.value_embeds)]
    rows = [jnp.take(_constrain(t, (None, "act_kv_heads", "head_dim")), tokens_BT, axis=0).astype(dt) for t in tables]
    per_layer = [None if j is None else rows[j] for j in value_embed_layers(c)]
    if not c.scan_layers:
        return per_layer
    zeros = jnp.zeros(tokens_BT.shape + shape[1:], dt)
    return jnp.stack([zeros if v is None else v for v in per_layer])


def init_cache(cfg: ModelConfig, batch: int, length: int, valid_BS) -> dict:
    """An empty KV cache of `length` slots: k, v [layers, B, S, kv_heads, head_dim], the slot
    the next call writes (index), and which slots hold real tokens (valid_BS: False for padding)."""
    shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, compute_dtype(cfg)), "v": jnp.zeros(shape, compute_dtype(cfg)),
            "index": jnp.zeros((), jnp.int32), "valid": valid_BS}
