"""Hugging Face export and import, and plain safetensors export.

Names and layouts are `jaxlm.hf_names`' tables, one per family (llama -> LlamaForCausalLM,
gpt2 -> GPT2LMHeadModel); `to_hf` and `from_hf` read the same table in opposite directions.
A model the target cannot represent (GPT-2 with grouped-query attention) is refused.

A µP model (model.parametrization=mup, docs/mup.md) multiplies q by alpha_attn / sqrt(head_dim)
and the final hidden states by alpha_out / m in its forward pass; the hf export folds both into
weights that feed nothing else (the q projection's kernel and bias, the final norm's scale and
bias), so transformers' standard models compute the same logits with a tied head too. The
safetensors export writes the stored parameters as they are (multipliers not folded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping

import jax
import numpy as np

from jaxlm import hf_names, mup
from jaxlm.config import ModelConfig, load_config, to_yaml
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, JaxlmError

DEFAULT_SHARD_BYTES = 2 * 10**9


class ExportError(JaxlmError):
    """A checkpoint that cannot be exported or imported as asked."""


# -- layer access (scanned or unrolled) ----------------------------------------------------------

def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(tree))


def layer_params(params, cfg: ModelConfig) -> list[dict]:
    """One dict per block, whether the model scans its layers (a leading layer axis) or not."""
    if cfg.scan_layers:
        stacked = params["blocks"]
        return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.n_layers)]
    return [params[f"block_{i}"] for i in range(cfg.n_layers)]


# -- jaxlm -> Hugging Face ----------------------------------------------------------------------

def check_exportable(cfg: ModelConfig) -> None:
    if cfg.family == "gpt2" and cfg.kv_heads != cfg.n_heads:
        raise ExportError(f"GPT2LMHeadModel has no grouped-query attention; this model has "
                          f"n_kv_heads={cfg.kv_heads} < n_heads={cfg.n_heads} (export it as a llama family model "
                          "instead, or use --format safetensors)")
    if cfg.family not in hf_names.TABLES:
        raise ExportError(f"no Hugging Face mapping for model.family={cfg.family}")
    if cfg.logit_softcap:
        raise ExportError(f"model.logit_softcap={cfg.logit_softcap:g} has no transformers architecture: the one "
                          "with a final soft cap (Gemma 2) differs in its norms and embedding scale (use --format "
                          "safetensors)")
    if cfg.value_embeds:
        raise ExportError(f"model.value_embeds={cfg.value_embeds} has no transformers architecture: no Hugging Face "
                          "model adds a token table to the attention values (use --format safetensors)")
    if cfg.qk_norm and (cfg.use_bias or cfg.qkv_bias):
        raise ExportError("model.qk_norm with biases has no Hugging Face architecture: Qwen3ForCausalLM (the one "
                          "with q_norm and k_norm) has attention biases on q, k, v and o together and none in the "
                          "MLP (use --format safetensors)")


def fold_mup(p: dict, cfg: ModelConfig) -> dict:
    """numpy params with µP's forward multipliers folded in: q's kernel and bias times
    `mup.query_mult`, the final norm's scale and bias times `mup.output_mult` (both 1 under sp)."""
    q, out = mup.query_mult(cfg), mup.output_mult(cfg)

    def fold(path, x):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[0] == "final_norm" and out != 1.0:
            return x * np.float32(out)
        if keys[-3:-1] == ("attn", "q") and q != 1.0:
            return x * np.float32(q)
        return x

    return jax.tree_util.tree_map_with_path(fold, p)


def _dims(cfg: ModelConfig, vocab: int) -> dict[str, int]:
    """The letters of `hf_names`' shapes."""
    return {"V": vocab, "T": cfg.max_seq_len, "D": cfg.d_model, "N": cfg.n_heads, "K": cfg.kv_heads,
            "H": cfg.head_dim, "F": cfg.ff_dim}


def to_hf(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF state dict (name -> float32 array) of jaxlm params (µP multipliers folded in, see `fold_mup`)."""
    check_exportable(cfg)
    p = fold_mup(_np(params), cfg)
    blocks = layer_params(p, cfg)
    dims = _dims(cfg, p["embed"]["embedding"].shape[0])
    out: dict[str, np.ndarray] = {}
    for e, name, i in hf_names.rows(hf_names.TABLES[cfg.family], cfg.n_layers):
        if not e.applies(cfg.use_bias, cfg.tied, cfg.qkv_bias, cfg.qk_norm):
            continue
        shapes = e.shapes(dims)
        xs = []
        for path, shape in zip(e.paths, shapes):
            node = p if i is None else blocks[i]
            for key in path[:-1]:
                node = node[key]
            absent = e.when == "zeros" and path[-1] not in node  # a model without biases: zeros
            xs.append(np.zeros(shape, np.float32) if absent else node[path[-1]])
        out[name] = e.layout.to_hf(xs, shapes)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """bos/eos/pad ids for config.json and generation_config.json. bos is the start token: EOS for the models
    jaxlm pretrains, which start every document and prompt with it (and the exported tokenizer prepends it),
    so generating from nothing starts there too; an imported model's own (data.bos_token)."""
    pad = tok.sp.pad_id() if tok.kind == "sentencepiece" else None
    return {"bos_token_id": tok.start_id, "eos_token_id": tok.eos_id, **({"pad_token_id": pad} if pad is not None else {})}


def _rope_config(cfg: ModelConfig) -> dict:
    """config.json's rope entries: rope_parameters (transformers 5), and rope_scaling (older versions) when scaled."""
    if cfg.rope_scaling != "llama3":
        return {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
               "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
    return {"rope_parameters": {**scaling, "rope_theta": cfg.rope_theta}, "rope_scaling": scaling}


def hf_config(cfg: ModelConfig, vocab: int, tok: Tokenizer | None) -> dict:
    ids = {}
    if tok is not None:
        ids = special_token_ids(tok)
    if cfg.family == "llama":
        qwen2 = cfg.qkv_bias and not cfg.use_bias  # biases on q, k and v only: transformers' Qwen2
        kind = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False} if qwen2 \
            else {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        if cfg.qk_norm:  # q_norm and k_norm: transformers' Qwen3
            kind = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
        return {**kind, "vocab_size": vocab,
                "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "hidden_act": "relu2" if cfg.activation == "relu2" else "silu",
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, **_rope_config(cfg),
                "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "tie_word_embeddings": cfg.tied,
                "attention_dropout": 0.0, "initializer_range": cfg.init_std, "torch_dtype": "float32",
                "dtype": "float32", **ids}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ff_dim,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
            "activation_function": "relu2" if cfg.activation == "relu2" else "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "tie_word_embeddings": cfg.tied, "initializer_range": cfg.init_std,
            "torch_dtype": "float32", "dtype": "float32", **ids}


# -- files ---------------------------------------------------------------------------------------

def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus model.safetensors.index.json above
    `max_shard_bytes`. Tensors keep their order; a tensor larger than a shard gets a shard of its own."""
    from safetensors.numpy import save_file

    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        path = os.path.join(out_dir, "model.safetensors")
        save_file(shards[0], path, metadata=meta)
        return [path]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        names.append(os.path.join(out_dir, name))
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return names


class SafetensorsFiles(Mapping):
    """The tensors of model.safetensors or a sharded set (model.safetensors.index.json), read one at a time
    when asked for, so an import holds one tensor of the checkpoint at a time beside what it built."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, "model.safetensors")):
            files = ["model.safetensors"]
        elif any(os.path.isfile(os.path.join(directory, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise ExportError(f"'{directory}' holds only pytorch_model.bin (a pickle, which jaxlm never loads); convert "
                              "it with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
                              "safe_serialization=True)")
        else:
            raise ExportError(f"'{directory}' has no model.safetensors or model.safetensors.index.json "
                              "(save the model with save_pretrained(..., safe_serialization=True))")
        self.files = [safe_open(os.path.join(directory, name), framework="numpy") for name in files]
        self.where = {k: f for f in self.files for k in f.keys()}
        self.metadata = (self.files[0].metadata() if self.files else None) or {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.where[name].get_tensor(name)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def read_safetensors(directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata of the first file) of model.safetensors or a sharded set with its index, all in memory."""
    files = SafetensorsFiles(directory)
    return {k: files[k] for k in files}, files.metadata


def _json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _fresh_dir(out_dir: str, force: bool) -> str:
    """`out_dir` as a new empty directory (a non-empty one needs force)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not force:
            raise ConfigError(f"'{out_dir}' exists and is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def export(path: str, out_dir: str, fmt: str = "hf", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
           force: bool = False, log=print) -> dict:
    """Export the checkpoint at `path` (run directory: its newest; or <run>/checkpoints/<step>)."""
    from jaxlm import checkpoint as ckpt
    from jaxlm.inference import open_checkpoints
    from jaxlm.hf_tokenizer import write_hf_tokenizer

    if fmt not in ("hf", "safetensors"):
        raise ConfigError(f"--format {fmt}: choose hf or safetensors")
    o = open_checkpoints(path, ["eval.batch_size=1", "mesh.data=1"], jax.devices()[:1])
    if fmt == "hf":
        check_exportable(o.cfg.model)
    t0 = time.perf_counter()
    params, meta, step = ckpt.restore_params(o.run_dir, o.steps[0], o.target, log)
    vocab = int(np.shape(params["embed"]["embedding"])[0])
    out_dir = _fresh_dir(out_dir, force)
    info = {"run_dir": o.run_dir, "step": step, "tokenizer_sha256": o.tokenizer.sha256, "config": meta["config"]}
    if fmt == "safetensors":
        flat = {".".join(str(getattr(k, "key", k)) for k in path_): np.asarray(x, np.float32)
                for path_, x in jax.tree_util.tree_leaves_with_path(_np(params))}
        files = write_safetensors(flat, out_dir, max_shard_bytes, {"jaxlm": json.dumps(info)})
    else:
        cfg = o.cfg.model
        files = write_safetensors(to_hf(params, cfg), out_dir, max_shard_bytes,
                                  {"jaxlm_step": str(step), "jaxlm_tokenizer_sha256": o.tokenizer.sha256})
        _json(os.path.join(out_dir, "config.json"), hf_config(cfg, vocab, o.tokenizer))
        _json(os.path.join(out_dir, "generation_config.json"),
              {**special_token_ids(o.tokenizer), "max_length": cfg.max_seq_len})
        write_hf_tokenizer(o.tokenizer, out_dir, cfg.max_seq_len, o.cfg.data.chat_template)
        _json(os.path.join(out_dir, "jaxlm_export.json"), info)
    log(f"exported step {step} of {o.run_dir} as {fmt} to {out_dir} ({len(files)} weight file"
        f"{'s' if len(files) > 1 else ''}, {time.perf_counter() - t0:.1f}s)")
    return {"out_dir": out_dir, "files": files, "step": step}


# -- Hugging Face -> jaxlm ----------------------------------------------------------------------

def model_config_from_hf(hf: dict) -> list[str]:
    """jaxlm model.* overrides for a Hugging Face config.json (llama or gpt2)."""
    kind = hf.get("model_type")
    if kind in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ExportError(f"use_sliding_window=true ({kind}'s sliding window on some layers) is not supported")
    if kind == "qwen3" and hf.get("attention_bias"):
        raise ExportError("attention_bias=true with qwen3 (biases on q, k, v and o, none in the MLP) is not "
                          "supported: jaxlm's model.bias covers the MLP too")
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        D, N = hf["hidden_size"], hf["num_attention_heads"]
        if (hf.get("head_dim") or D // N) != D // N:
            raise ExportError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads={D // N}; "
                              "jaxlm derives the head size from the width")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "relu2"):
            raise ExportError(f"hidden_act={act}: jaxlm's llama MLP is SwiGLU (silu) or relu2-gated (relu2)")
        rope = hf.get("rope_parameters") or {}
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise ExportError("attention_bias and mlp_bias differ; jaxlm has one model.bias for both")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        longest = hf["max_position_embeddings"]
        if kind == "mistral" and hf.get("sliding_window") and hf["sliding_window"] < longest:
            longest = hf["sliding_window"]  # within the window, sliding-window attention is causal attention
        return ["model.family=llama", f"model.d_model={D}", f"model.n_layers={hf['num_hidden_layers']}",
                f"model.n_heads={N}", f"model.n_kv_heads={hf.get('num_key_value_heads') or N}",
                f"model.d_ff={hf['intermediate_size']}", f"model.max_seq_len={longest}",
                *_rope_scaling_keys(hf.get("rope_scaling") or rope),
                f"model.norm_eps={hf.get('rms_norm_eps', 1e-6)}", f"model.rope_theta={theta}",
                f"model.bias={str(bool(hf.get('attention_bias', False))).lower()}",
                f"model.qkv_bias={str(kind == 'qwen2').lower()}", f"model.qk_norm={str(kind == 'qwen3').lower()}",
                f"model.activation={'auto' if act == 'silu' else act}",
                f"model.tie_embeddings={str(bool(hf.get('tie_word_embeddings', False))).lower()}"]
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "relu2"):
            raise ExportError(f"activation_function={act}: jaxlm's gpt2 MLP uses the tanh GELU (gelu_new) or relu2")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise ExportError(f"{key}=true is not supported")
        D = hf["n_embd"]
        return ["model.family=gpt2", f"model.d_model={D}", f"model.n_layers={hf['n_layer']}",
                f"model.n_heads={hf['n_head']}", f"model.d_ff={hf.get('n_inner') or 4 * D}",
                f"model.max_seq_len={hf['n_positions']}", f"model.norm_eps={hf.get('layer_norm_epsilon', 1e-5)}",
                "model.bias=true", f"model.tie_embeddings={str(bool(hf.get('tie_word_embeddings', True))).lower()}",
                f"model.activation={'relu2' if act == 'relu2' else 'auto'}"]
    raise ExportError(f"model_type={kind!r} ({', '.join(hf.get('architectures') or [])}) is not supported: jaxlm "
                      "imports llama, mistral, qwen2, qwen3 and gpt2 checkpoints")


def _rope_scaling_keys(scaling: dict) -> list[str]:
    """model.rope_* overrides for config.json's rope_scaling (or rope_parameters); refuses kinds jaxlm lacks."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return []
    if kind != "llama3":
        raise ExportError(f"rope scaling of type {kind!r} is not supported (jaxlm has llama3's)")
    return ["model.rope_scaling=llama3", f"model.rope_scaling_factor={scaling['factor']}",
            f"model.rope_low_freq_factor={scaling['low_freq_factor']}",
            f"model.rope_high_freq_factor={scaling['high_freq_factor']}",
            f"model.rope_original_max_len={scaling['original_max_position_embeddings']}"]


def from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, target) -> dict:
    """jaxlm params (numpy, shaped like `target`) from a HF state dict; names the tensor that is missing,
    unexpected or of the wrong shape."""
    used: set[str] = set()

    def get(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise ExportError(f"tensor '{name}' is missing from the checkpoint")
        x = np.asarray(tensors[name], np.float32)
        if x.shape != tuple(shape):
            raise ExportError(f"tensor '{name}' has shape {tuple(x.shape)}, expected {tuple(shape)} from config.json")
        used.add(name)
        return x

    table = hf_names.TABLES[cfg.family]
    dims = _dims(cfg, target["embed"]["embedding"].shape[0])
    params: dict = {}
    layers: list[dict] = [{} for _ in range(cfg.n_layers)]
    for e, name, i in hf_names.rows(table, cfg.n_layers):
        if not e.applies(cfg.use_bias, cfg.tied, cfg.qkv_bias, cfg.qk_norm):
            continue
        shapes = e.shapes(dims)
        for path, x in zip(e.paths, e.layout.from_hf(get(name, e.layout.hf_shape(shapes)), shapes)):
            node = params if i is None else layers[i]
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = x
    if cfg.scan_layers:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"block_{i}": layer for i, layer in enumerate(layers)})
    ignorable = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")  # buffers older versions saved
    tied_copy = {e.hf for e in table if e.when == "untied" and cfg.tied}  # a tied head's copy may be saved
    extra = [k for k in tensors if k not in used and not k.endswith(ignorable) and k not in tied_copy]
    if extra:
        raise ExportError(f"unexpected tensor '{extra[0]}' ({len(extra)} in all) for this config.json")
    want = jax.tree_util.tree_structure(target)
    got = jax.tree_util.tree_structure(params)
    if want != got:
        raise ExportError(f"imported parameter tree does not match the model: {got} vs {want}")
    return jax.tree.map(lambda x: np.ascontiguousarray(x, np.float32), params)


def _hf_special(hf_dir: str, name: str) -> str:
    """tokenizer_config.json's `name` (eos_token, bos_token: a string, or {"content": ...}); '' when absent."""
    path = os.path.join(hf_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        value = json.load(f).get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else str(value)


def import_hf(hf_dir: str, run_dir: str, tokenizer: str | None = None, overrides: list[str] | tuple[str, ...] = (),
              force: bool = False, log=print) -> str:
    """Write a jaxlm run directory (config.yaml, its tokenizer file, checkpoints/0) from a local HF checkpoint
    directory; usable by eval, generate and checkpoint.init_from. The tokenizer is `tokenizer`, else the
    folder's tokenizer.model, else its tokenizer.json (its end-of-text token from tokenizer_config.json's
    eos_token when that names one)."""
    from jaxlm import checkpoint as ckpt
    from jaxlm.config import check_vocab
    from jaxlm.data.chat import _folder_template
    from jaxlm.data.tokenizer import load_tokenizer, set_start, tokenizer_from_bytes
    from jaxlm.data.tokenizer_json import from_vocab_merges
    from jaxlm.errors import DataError
    from jaxlm.sharding import make_mesh
    from jaxlm.step import Stepper, build

    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ExportError(f"'{hf_dir}' has no config.json: not a Hugging Face checkpoint directory")
    with open(cfg_path, encoding="utf-8") as f:
        hf = json.load(f)
    model_keys = model_config_from_hf(hf)
    tok_path = tokenizer or next((os.path.join(hf_dir, n) for n in ("tokenizer.model", "tokenizer.json")
                                  if os.path.isfile(os.path.join(hf_dir, n))), "")
    vocab_merges = [os.path.join(hf_dir, n) for n in ("vocab.json", "merges.txt")]
    if not tok_path and all(map(os.path.isfile, vocab_merges)):
        tok_path = vocab_merges[0]  # GPT-2's files: a tokenizer.json is made from them
    if not os.path.exists(tok_path):
        raise ExportError(f"no tokenizer: '{tokenizer or hf_dir}' has no tokenizer.model, tokenizer.json or vocab.json + "
                          "merges.txt (pass --tokenizer PATH; jaxlm needs the file its token ids come from)")
    eos = _hf_special(hf_dir, "eos_token") if tok_path.endswith(".json") else ""
    try:
        if tok_path in vocab_merges:
            tok = tokenizer_from_bytes(from_vocab_merges(*vocab_merges), eos)
        else:
            tok = load_tokenizer(tok_path, eos)
        bos = _hf_special(hf_dir, "bos_token")
        set_start(tok, bos, tok_path)  # the model's own start token in front of documents and prompts
    except DataError as e:
        raise ExportError(str(e)) from None
    if eos:
        overrides = [f"data.eos_token={eos}", *overrides]
    if tok.start_id != tok.eos_id:
        overrides = [f"data.bos_token={tok.start_token}", *overrides]
    V = int(hf["vocab_size"])
    run_dir = _fresh_dir(run_dir, force)
    base = [f"run.dir={run_dir}", f"model.vocab_size={V if V != tok.vocab_size else 0}", "model.scan_layers=false",
            "mesh.data=1", "train.steps=1", "train.batch_size=1", "eval.batch_size=1",
            f"train.seq_len={min(256, model_keys_value(model_keys, 'model.max_seq_len'))}"]
    cfg = load_config(None, base + model_keys + list(overrides))
    template = _folder_template(hf_dir)
    if template:  # the run's config keeps the model's chat template (fine-tuning and export use it)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_template=template))
    vocab = check_vocab(cfg, tok.vocab_size)
    if vocab != V:
        raise ExportError(f"config.json vocab_size={V} does not fit the tokenizer's {tok.vocab_size} tokens")
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, vocab, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    abstract = stepper.abstract_state()
    params = from_hf(SafetensorsFiles(hf_dir), cfg.model, abstract.params)
    state = stepper.init_state(cfg.train.seed)
    state = state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract.params)))
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    tok.save(os.path.join(run_dir, tok.file_name))
    saver = ckpt.Saver(run_dir, cfg, tok.proto)
    try:
        saver.save(0, stepper.logical_state(state), data_position=0)
    finally:
        saver.close()
    log(f"imported {hf.get('architectures', [hf.get('model_type')])[0]} from {hf_dir} into {run_dir} "
        f"({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")
    return run_dir


def model_keys_value(keys: list[str], name: str) -> int:
    return int(next(k.split("=", 1)[1] for k in keys if k.startswith(name + "=")))

