"""Hugging Face parameter names: one table per model family, read in both directions by
`jaxlm.export.to_hf` (jaxlm -> Hugging Face) and `jaxlm.export.from_hf` (Hugging Face -> jaxlm).

A row pairs jaxlm parameters (dotted paths into the params tree; in a row whose Hugging Face
name holds `{i}`, the path is inside block i) with one Hugging Face tensor and a `Layout`: the
function from the jaxlm arrays to that tensor and its exact inverse. Shapes are written in
the model's dimensions: V vocabulary, T positions (max_seq_len), D width, N heads, K
key/value heads, H head dimension, F MLP width. jaxlm kernels are [in, out] with heads as
their own axes; torch Linear weights are [out, in]; GPT-2's Conv1D weights are [in, out].

The last column says when a row applies: always (empty); "bias" only with model.bias;
"untied" only with an untied head (a tied head is the embedding, written once); "qkv_bias" with
model.bias or model.qkv_bias; "qk_norm" only with model.qk_norm (Qwen3's q_norm, k_norm); "zeros"
always, a jaxlm model without biases exporting zeros (the same function). Exported tensors
keep the table's order, the rows with `{i}` repeated for each layer where they stand.
Adding a family is adding a table here (and a layout if none fits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

Shapes = list[tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """jaxlm arrays (one per path of a row) <-> one Hugging Face tensor; `from_hf` inverts `to_hf` exactly.
    Each function gets the jaxlm shapes too; `hf_shape` is the shape `to_hf` makes from them."""
    name: str
    to_hf: Callable[[list[np.ndarray], Shapes], np.ndarray]
    from_hf: Callable[[np.ndarray, Shapes], list[np.ndarray]]
    hf_shape: Callable[[Shapes], tuple[int, ...]]


def _single(name: str, to_hf, from_hf, hf_shape) -> Layout:
    """A Layout of one jaxlm array: each function takes (array or HF tensor, its jaxlm shape)."""
    return Layout(name, lambda xs, s: to_hf(xs[0], s[0]), lambda y, s: [from_hf(y, s[0])],
                  lambda s: tuple(hf_shape(s[0])))


def _merge(s):  # [N, H, ...] -> [N*H, ...]
    return (s[0] * s[1], *s[2:])


def _concat_to_hf(xs: list[np.ndarray], shapes: Shapes) -> np.ndarray:
    return np.concatenate([x.reshape(*s[:-2], s[-2] * s[-1]) for x, s in zip(xs, shapes)], axis=-1)


def _concat_from_hf(y: np.ndarray, shapes: Shapes) -> list[np.ndarray]:
    ends = np.cumsum([s[-2] * s[-1] for s in shapes])[:-1]
    return [part.reshape(s) for part, s in zip(np.split(y, ends, axis=-1), shapes)]


SAME = _single("same", lambda x, s: x, lambda y, s: y, lambda s: s)
TRANSPOSE = _single("transpose [in, out] <-> [out, in]", lambda x, s: x.T, lambda y, s: y.T, lambda s: s[::-1])
MERGE_HEADS = _single("[N, H, ...] <-> [N*H, ...]", lambda x, s: x.reshape(_merge(s)), lambda y, s: y.reshape(s),
                      _merge)
HEADS_IN = _single("[D, N, H] <-> [N*H, D]", lambda x, s: x.reshape(s[0], s[1] * s[2]).T,
                   lambda y, s: y.T.reshape(s), lambda s: (s[1] * s[2], s[0]))
HEADS_OUT = _single("[N, H, D] <-> [D, N*H]", lambda x, s: x.reshape(_merge(s)).T, lambda y, s: y.T.reshape(s),
                    lambda s: _merge(s)[::-1])
CONCAT_HEADS = Layout("[..., N, H] each <-> [..., sum of N*H] (q | k | v)", _concat_to_hf, _concat_from_hf,
                      lambda shapes: (*shapes[0][:-2], sum(math.prod(s[-2:]) for s in shapes)))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a table: jaxlm path(s), split on " | ", each of `shape`; the Hugging Face name; the layout;
    when it applies (see the module docstring)."""
    jaxlm: str
    shape: str
    hf: str
    layout: Layout
    when: str = ""

    @property
    def paths(self) -> list[tuple[str, ...]]:
        return [tuple(p.strip().split(".")) for p in self.jaxlm.split("|")]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def applies(self, use_bias: bool, tied: bool, qkv_bias: bool = False, qk_norm: bool = False) -> bool:
        return {"bias": use_bias, "qkv_bias": use_bias or qkv_bias, "untied": not tied,
                "qk_norm": qk_norm}.get(self.when, True)

    def shapes(self, dims: dict[str, int]) -> Shapes:
        return [tuple(dims[d] for d in self.shape.split())] * len(self.paths)


def _table(*rows) -> tuple[Entry, ...]:
    return tuple(Entry(*row) for row in rows)


# RoPE: jaxlm and transformers' Llama both use the rotate-half layout with the same frequencies, so q and k
# need no permutation.
LLAMA = _table(  # LlamaForCausalLM
    ("embed.embedding", "V D", "model.embed_tokens.weight", SAME),
    ("attn.q.kernel", "D N H", "model.layers.{i}.self_attn.q_proj.weight", HEADS_IN),
    ("attn.q.bias", "N H", "model.layers.{i}.self_attn.q_proj.bias", MERGE_HEADS, "qkv_bias"),
    ("attn.k.kernel", "D K H", "model.layers.{i}.self_attn.k_proj.weight", HEADS_IN),
    ("attn.k.bias", "K H", "model.layers.{i}.self_attn.k_proj.bias", MERGE_HEADS, "qkv_bias"),
    ("attn.v.kernel", "D K H", "model.layers.{i}.self_attn.v_proj.weight", HEADS_IN),
    ("attn.v.bias", "K H", "model.layers.{i}.self_attn.v_proj.bias", MERGE_HEADS, "qkv_bias"),
    ("attn.o.kernel", "N H D", "model.layers.{i}.self_attn.o_proj.weight", HEADS_OUT),
    ("attn.q_norm.RMSNorm_0.scale", "H", "model.layers.{i}.self_attn.q_norm.weight", SAME, "qk_norm"),
    ("attn.k_norm.RMSNorm_0.scale", "H", "model.layers.{i}.self_attn.k_norm.weight", SAME, "qk_norm"),
    ("mlp.gate.kernel", "D F", "model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),
    ("mlp.up.kernel", "D F", "model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),
    ("mlp.down.kernel", "F D", "model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),
    ("attn.o.bias", "D", "model.layers.{i}.self_attn.o_proj.bias", SAME, "bias"),
    ("mlp.gate.bias", "F", "model.layers.{i}.mlp.gate_proj.bias", SAME, "bias"),
    ("mlp.up.bias", "F", "model.layers.{i}.mlp.up_proj.bias", SAME, "bias"),
    ("mlp.down.bias", "D", "model.layers.{i}.mlp.down_proj.bias", SAME, "bias"),
    ("attn_norm.RMSNorm_0.scale", "D", "model.layers.{i}.input_layernorm.weight", SAME),
    ("mlp_norm.RMSNorm_0.scale", "D", "model.layers.{i}.post_attention_layernorm.weight", SAME),
    ("final_norm.RMSNorm_0.scale", "D", "model.norm.weight", SAME),
    ("head.kernel", "D V", "lm_head.weight", TRANSPOSE, "untied"),
)

GPT2 = _table(  # GPT2LMHeadModel: biases always, Conv1D weights [in, out]
    ("embed.embedding", "V D", "transformer.wte.weight", SAME),
    ("pos_embed", "T D", "transformer.wpe.weight", SAME),
    ("attn_norm.LayerNorm_0.scale", "D", "transformer.h.{i}.ln_1.weight", SAME),
    ("attn_norm.LayerNorm_0.bias", "D", "transformer.h.{i}.ln_1.bias", SAME, "zeros"),
    ("attn.q.kernel | attn.k.kernel | attn.v.kernel", "D N H", "transformer.h.{i}.attn.c_attn.weight", CONCAT_HEADS),
    ("attn.q.bias | attn.k.bias | attn.v.bias", "N H", "transformer.h.{i}.attn.c_attn.bias", CONCAT_HEADS, "zeros"),
    ("attn.o.kernel", "N H D", "transformer.h.{i}.attn.c_proj.weight", MERGE_HEADS),
    ("attn.o.bias", "D", "transformer.h.{i}.attn.c_proj.bias", SAME, "zeros"),
    ("mlp_norm.LayerNorm_0.scale", "D", "transformer.h.{i}.ln_2.weight", SAME),
    ("mlp_norm.LayerNorm_0.bias", "D", "transformer.h.{i}.ln_2.bias", SAME, "zeros"),
    ("mlp.up.kernel", "D F", "transformer.h.{i}.mlp.c_fc.weight", SAME),
    ("mlp.up.bias", "F", "transformer.h.{i}.mlp.c_fc.bias", SAME, "zeros"),
    ("mlp.down.kernel", "F D", "transformer.h.{i}.mlp.c_proj.weight", SAME),
    ("mlp.down.bias", "D", "transformer.h.{i}.mlp.c_proj.bias", SAME, "zeros"),
    ("final_norm.LayerNorm_0.scale", "D", "transformer.ln_f.weight", SAME),
    ("final_norm.LayerNorm_0.bias", "D", "transformer.ln_f.bias", SAME, "zeros"),
    ("head.kernel", "D V", "lm_head.weight", TRANSPOSE, "untied"),
)

TABLES = {"llama": LLAMA, "gpt2": GPT2}


def rows(table: tuple[Entry, ...], n_layers: int) -> list[tuple[Entry, str, int | None]]:
    """(entry, Hugging Face name, layer or None) in table order, each run of per-layer entries repeated
    for layers 0 .. n_layers-1 where it stands."""
    out: list[tuple[Entry, str, int | None]] = []
    run: list[Entry] = []
    for e in (*table, None):
        if e is not None and e.per_layer:
            run.append(e)
            continue
        out += [(r, r.hf.format(i=i), i) for i in range(n_layers) for r in run]
        run = []
        if e is not None:
            out.append((e, e.hf, None))
    return out
