"""The static checks of a `Config` (no devices, no data) and the allowed values they check.

`config.load_config` runs `validate`; `resolve_mesh_shape` and `check_vocab` run once the
devices and the tokenizer are known. Every error says what to change.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from jaxlm.errors import ConfigError

if TYPE_CHECKING:  # config imports this module: the schema is only needed for annotations
    from jaxlm.config import Config, ModelConfig

FAMILIES = ("gpt2", "llama")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "blocked", "xla", "cudnn", "pallas")
KERNELS = ("auto", "cpu", "standard")
SCHEDULES = ("constant", "cosine", "linear", "wsd", "inverse_sqrt")
BACKENDS = ("jit", "pmap")
WANDB_MODES = ("online", "offline", "disabled")
DIST_MODES = ("auto", "always", "never")
PARAMETRIZATIONS = ("sp", "mup")


def _choice(key: str, value: str, choices: tuple[str, ...]):
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}"
                          + (f"; did you mean '{hint[0]}'?" if hint else ""))


def validate(cfg: Config) -> None:
    """Checks that need no devices and no data. Raises ConfigError saying what to change."""
    _validate_counts(cfg)
    _validate_training(cfg)
    _validate_mup(cfg.model)
    _validate_rates(cfg)
    _validate_choices(cfg)
    _validate_dist_and_wandb(cfg)
    _validate_shapes(cfg)
    _validate_mesh_sizes(cfg)


def _validate_counts(cfg: Config) -> None:
    """Sizes and counts that must be positive, or at least 0."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    positive = {
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.max_seq_len": m.max_seq_len, "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.seq_len": t.seq_len, "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
        "data.tokenizer_vocab": cfg.data.tokenizer_vocab, "data.prefetch": cfg.data.prefetch,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {v}")
    non_negative = {
        "model.n_kv_heads": m.n_kv_heads, "model.d_ff": m.d_ff, "model.vocab_size": m.vocab_size,
        "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
        "optim.grad_clip": o.grad_clip, "optim.z_loss": o.z_loss, "eval.every": cfg.eval.every,
        "eval.batch_size": cfg.eval.batch_size, "eval.max_batches": cfg.eval.max_batches,
        "checkpoint.every": cfg.checkpoint.every, "run.peak_tflops": cfg.run.peak_tflops,
        "checkpoint.keep_every": cfg.checkpoint.keep_every, "train.max_bad_steps": t.max_bad_steps,
        "train.max_rollbacks": t.max_rollbacks, "model.attention_block": m.attention_block,
        "model.scan_unroll": m.scan_unroll, "train.diverge_factor": t.diverge_factor,
    }
    for key, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if t.loss_chunk < -1:
        raise ConfigError(f"train.loss_chunk must be -1 (auto), 0 (plain logits) or a positive budget, got "
                          f"{t.loss_chunk}")


def _validate_rates(cfg: Config) -> None:
    """The learning rate and the fractions of the schedule and of the held-out text."""
    o = cfg.optim
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    if not 0 < cfg.data.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction must be in (0, 1), got {cfg.data.valid_fraction}")
    if not cfg.data.build_chunk_mb > 0:
        raise ConfigError(f"data.build_chunk_mb must be > 0, got {cfg.data.build_chunk_mb}")


def _validate_choices(cfg: Config) -> None:
    m = cfg.model
    _choice("model.family", m.family, FAMILIES)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.remat", m.remat, REMAT_POLICIES)
    _choice("model.attention", m.attention, ATTENTION)
    _choice("model.kernels", m.kernels, KERNELS)
    _choice("model.rope_scaling", m.rope_scaling, ("none", "llama3"))
    if m.qkv_bias and m.family != "llama":
        raise ConfigError("model.qkv_bias=true is for the llama family (gpt2 has biases everywhere: model.bias)")
    if m.qk_norm and m.family != "llama":
        raise ConfigError("model.qk_norm=true is for the llama family (RMSNorm, as Qwen3)")
    _choice("model.activation", m.activation, ("auto", "relu2"))
    if not 0 <= m.value_embeds <= m.n_layers:
        raise ConfigError(f"model.value_embeds must be between 0 and model.n_layers={m.n_layers}, got {m.value_embeds}")
    if m.logit_softcap < 0:
        raise ConfigError(f"model.logit_softcap must be >= 0 (0 = none), got {m.logit_softcap}")
    if m.rope_scaling == "llama3" and not (m.rope_scaling_factor > 0 and 0 < m.rope_low_freq_factor
                                           < m.rope_high_freq_factor and m.rope_original_max_len > 0):
        raise ConfigError("model.rope_scaling=llama3 needs rope_scaling_factor > 0, 0 < rope_low_freq_factor < "
                          "rope_high_freq_factor and rope_original_max_len > 0")
    _choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    _choice("optim.name", cfg.optim.name, ("adamw", "muon"))
    _choice("mesh.backend", cfg.mesh.backend, BACKENDS)
    _choice("train.on_bad_steps", cfg.train.on_bad_steps, ("stop", "rollback"))
    _choice("data.tokenizer_type", cfg.data.tokenizer_type, ("bpe", "unigram", "bytelevel"))
    _choice("data.tokens_format", cfg.data.tokens_format, ("llmc", "raw"))
    _choice("data.sampling", cfg.data.sampling, ("random", "epochs"))
    _choice("data.format", cfg.data.format, ("text", "sft"))
    _choice("data.loss_on", cfg.data.loss_on, ("completion", "all"))
    _choice("data.tokens_dtype", cfg.data.tokens_dtype, ("uint16", "uint32"))
    _choice("data.invalid_utf8", cfg.data.invalid_utf8, ("error", "replace"))
    _choice("dist.mode", cfg.dist.mode, DIST_MODES)


def _validate_dist_and_wandb(cfg: Config) -> None:
    if cfg.dist.heartbeat_s < 2 or cfg.dist.init_timeout_s < 1:
        raise ConfigError(f"dist.heartbeat_s must be at least 2 and dist.init_timeout_s at least 1, got "
                          f"{cfg.dist.heartbeat_s} and {cfg.dist.init_timeout_s}")
    if cfg.run.wandb_mode:
        _choice("run.wandb_mode", cfg.run.wandb_mode, WANDB_MODES)


def _validate_shapes(cfg: Config) -> None:
    """Heads that divide the width, a sequence the model accepts, a batch the microbatches divide."""
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
            f"pick n_heads among {_divisors(m.d_model)} or change d_model")
    if m.n_heads % m.kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={m.kv_heads} does not divide model.n_heads={m.n_heads}; "
            f"pick n_kv_heads among {_divisors(m.n_heads)}")
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got d_model/n_heads={m.head_dim}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          f"raise model.max_seq_len or lower train.seq_len")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum={t.grad_accum}")


def _validate_mesh_sizes(cfg: Config) -> None:
    """Mesh axis sizes as written; `resolve_mesh_shape` checks them against the devices."""
    sizes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "mesh.tensor": cfg.mesh.tensor}
    for key, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"{key} must be a positive size or -1 (the rest), got {v}")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


def _validate_training(cfg: Config) -> None:
    """The checks of dropout, divergence and where a run starts from."""
    t, m = cfg.train, cfg.model
    if 0 < t.diverge_factor <= 1:
        raise ConfigError(f"train.diverge_factor must be above 1 (or 0 = off), got {t.diverge_factor}")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    c = cfg.checkpoint
    if c.init_from and c.branch_from:
        raise ConfigError("checkpoint.init_from (params only, fresh optimizer at step 0) and checkpoint.branch_from "
                          "(the whole training state) exclude each other; set one")
    bad_at = [s for s in c.at if not 0 < s <= t.steps]
    if bad_at:
        raise ConfigError(f"checkpoint.at steps must be in 1..train.steps={t.steps}, got {bad_at}")


def _validate_mup(m: ModelConfig) -> None:
    _choice("model.parametrization", m.parametrization, PARAMETRIZATIONS)
    for key, v in {"model.mup_base_width": m.mup_base_width, "model.mup_base_head_dim": m.mup_base_head_dim,
                   "model.mup_attn_mult": m.mup_attn_mult}.items():
        if v < 0:
            raise ConfigError(f"{key} must be >= 0 (0 = the default), got {v}")
    if m.mup_output_mult <= 0:
        raise ConfigError(f"model.mup_output_mult (alpha_out) must be > 0, got {m.mup_output_mult}")
    if m.mup_embed_lr_mult <= 0:
        raise ConfigError(f"model.mup_embed_lr_mult must be > 0, got {m.mup_embed_lr_mult}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_mesh_shape(cfg: Config, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 filled in; checks the product and every divisibility."""
    mc, m = cfg.mesh, cfg.model
    shape = [mc.data, mc.fsdp, mc.tensor]
    known = 1
    for v in shape:
        if v != -1:
            known *= v
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(f"mesh sizes {shape} leave no whole number for -1 with {n_devices} devices; "
                              f"choose sizes whose product divides {n_devices}")
        shape[shape.index(-1)] = n_devices // known
    data, fsdp, tensor = shape
    if data * fsdp * tensor != n_devices:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {data * fsdp * tensor} but there are "
            f"{n_devices} devices; make the product {n_devices} (or set one axis to -1)")
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % (data * fsdp):
        raise ConfigError(
            f"the microbatch train.batch_size/train.grad_accum = {micro} is not divisible by the "
            f"data-parallel size mesh.data*mesh.fsdp = {data * fsdp}; change train.batch_size or the mesh")
    if cfg.eval.batch_size % (data * fsdp):
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} is not divisible by the data-parallel size "
                          f"mesh.data*mesh.fsdp = {data * fsdp}")
    if cfg.mesh.backend == "pmap" and (fsdp != 1 or tensor != 1):
        raise ConfigError("mesh.backend=pmap is data parallel only: set mesh.fsdp=1 and mesh.tensor=1")
    for key, v in {"model.n_heads": m.n_heads, "model.n_kv_heads": m.kv_heads, "MLP width": m.ff_dim}.items():
        if v % tensor:
            raise ConfigError(f"mesh.tensor={tensor} does not divide {key}={v}; pick mesh.tensor among "
                              f"{_divisors(v)}")
    if m.d_model % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} does not divide model.d_model={m.d_model}; "
                          f"pick mesh.fsdp among {_divisors(m.d_model)}")
    return data, fsdp, tensor


def check_vocab(cfg: Config, tokenizer_vocab: int, tensor: int = 1) -> int:
    """The model's vocabulary size given the tokenizer's; raises if they cannot match."""
    v = cfg.model.vocab_size
    if v == 0:
        v = tokenizer_vocab
    elif v < tokenizer_vocab or (v > tokenizer_vocab and v % 128):
        preset = f" (from model.preset={cfg.model.preset})" if cfg.model.preset else ""
        raise ConfigError(
            f"model.vocab_size={v}{preset} does not match the tokenizer's {tokenizer_vocab} tokens; set "
            f"model.vocab_size=0 (use the tokenizer's) or a multiple of 128 above it")
    if v % tensor:
        raise ConfigError(f"mesh.tensor={tensor} does not divide the vocabulary size {v}; "
                          f"set model.vocab_size to a multiple of 128 above {tokenizer_vocab}")
    return v
