"""Typed, frozen configuration: one dataclass per concern, YAML deltas, dotted overrides.

OmegaConf structured configs do the merging and type conversion; this module adds named
model presets and "did you mean" for unknown keys; `load_config` ends with the checks of
`jaxlm.config_checks`, which must fail before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from jaxlm.config_checks import validate
from jaxlm.config_checks import PARAMETRIZATIONS, check_vocab  # noqa: F401 (still imported from here)
from jaxlm.errors import ConfigError


def _f(default: Any, help: str):
    """A dataclass field with a help string (shown by `jaxlm train --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    preset: str = _f("", "named preset applied before the other model keys (see PRESETS)")
    family: str = _f("gpt2", "gpt2 (LayerNorm, learned positions, GELU) or llama (RMSNorm, RoPE, SwiGLU, GQA)")
    vocab_size: int = _f(0, "0 = the tokenizer's vocabulary size; larger only as a multiple of 128 (padding)")
    d_model: int = _f(256, "residual stream width")
    n_layers: int = _f(4, "number of decoder blocks")
    n_heads: int = _f(4, "attention heads")
    n_kv_heads: int = _f(0, "key/value heads for grouped-query attention; 0 = n_heads")
    d_ff: int = _f(0, "MLP hidden width; 0 = 4*d_model (gpt2) or 8/3*d_model rounded to 64 (llama)")
    max_seq_len: int = _f(1024, "longest sequence the model accepts (gpt2: size of the position table)")
    bias: Optional[bool] = _f(None, "biases in dense layers and norms; default: gpt2 yes, llama no")
    qkv_bias: bool = _f(False, "llama: biases on the q, k and v projections only (Qwen2's layout)")
    qk_norm: bool = _f(False, "llama: RMSNorm of each head's query and key (a learned scale over the head dim) "
                       "before RoPE, as Qwen3 and OLMo 2; exports as Qwen3ForCausalLM")
    logit_softcap: float = _f(0.0, "cap the logits smoothly at this size, cap * tanh(logits / cap) (Gemma 2, "
                              "modded-nanogpt); 0 = none; no transformers architecture matches, so export refuses it")
    value_embeds: int = _f(0, "value embeddings (modded-nanogpt): this many extra token tables of the value width, "
                           "table j added to the values of layer j and of layer n_layers - value_embeds + j (the "
                           "first and last layers share them), zero at init; 0 = none; export refuses them")
    activation: str = _f("auto", "the MLP's nonlinearity: auto = the family's (gpt2 tanh GELU, llama SwiGLU), or relu2: "
                         "relu(x)^2 (gpt2: relu2(up); llama: relu2(gate) * up); exports as hidden_act relu2")
    tie_embeddings: Optional[bool] = _f(None, "share input embedding and output head; default: gpt2 yes, llama no")
    norm_eps: float = _f(1e-5, "epsilon of LayerNorm / RMSNorm")
    rope_theta: float = _f(10000.0, "RoPE base frequency (llama)")
    rope_scaling: str = _f("none", "RoPE frequency scaling: none, or llama3 (Llama 3.1's; the rope_* keys below)")
    rope_scaling_factor: float = _f(8.0, "llama3 scaling: low frequencies are divided by this")
    rope_low_freq_factor: float = _f(1.0, "llama3 scaling: wavelengths above original_len / this are scaled")
    rope_high_freq_factor: float = _f(4.0, "llama3 scaling: wavelengths below original_len / this are kept")
    rope_original_max_len: int = _f(8192, "llama3 scaling: the context length the model was first trained at")
    init_std: float = _f(0.02, "std of the normal init; residual projections are scaled by 1/sqrt(2*n_layers)")
    dtype: str = _f("float32", "compute dtype: float32 or bfloat16 (parameters stay float32)")
    remat: str = _f("none", "rematerialisation per block: none, full, dots, dots_no_batch")
    scan_layers: bool = _f(True, "stack blocks with nn.scan so compile time does not grow with depth")
    scan_unroll: int = _f(1, "blocks per iteration of the layer scan; 0 = all: no loop, stacked "
                          "parameters kept (compile time then grows with depth)")
    kernels: str = _f("auto", "kernel set: cpu (tuned for XLA's CPU runtime), standard (plain JAX), auto = cpu on "
                      "the CPU backend, standard on GPUs and TPUs")
    attention: str = _f("auto", "training and scoring attention: blocked (causal query blocks, cpu kernels), xla "
                        "(jax.nn.dot_product_attention's XLA path), cudnn (cuDNN flash, GPU), pallas (Pallas flash, "
                        "TPU); auto = blocked with cpu kernels, else cudnn on GPU / pallas on TPU where the shape "
                        "allows, else xla")
    dropout: float = _f(0.0, "dropout rate on the residual branches (attention and MLP outputs) and the attention "
                        "probabilities while training; off in evaluation and generation; its randomness is drawn "
                        "from (train.seed, step), so resume and every mesh give the same result")
    attention_block: int = _f(0, "blocked attention: query block length (the sequence is cut into T/block "
                              "blocks); 0 = auto, a quarter of the sequence, at least 16 and at most 256")
    parametrization: str = _f("sp", "sp (standard) or mup (maximal update parametrization, docs/mup.md): with "
                              "m = d_model / mup_base_width, hidden matrices start with init variance / m and take "
                              "Adam's lr / m, the logits are multiplied by mup_output_mult / m, attention scores "
                              "by mup_attn_mult / head_dim, Adam's eps is divided by m; an lr tuned at the base "
                              "width carries over to wider models")
    mup_base_width: int = _f(0, "mup: the width the lr and init were tuned at (m = d_model / this); 0 = d_model "
                             "(m = 1); the MLP and attention widths are assumed to grow with d_model")
    mup_base_head_dim: int = _f(0, "mup: the head dim at the base width, where the attention scale "
                                "mup_attn_mult / head_dim equals 1/sqrt(head_dim); 0 = this model's head dim (the "
                                "width grows by adding heads)")
    mup_attn_mult: float = _f(0.0, "mup: alpha_attn, attention scores are alpha_attn / head_dim * q.k; "
                              "0 = sqrt(mup_base_head_dim), the standard scale at the base head dim")
    mup_output_mult: float = _f(1.0, "mup: alpha_out, the logits are alpha_out / m * h.W_out")
    mup_embed_lr_mult: float = _f(1.0, "mup: the embedding tables' learning-rate multiplier (token table, gpt2's "
                                  "position table, a tied table), tuned at the base width with mup_output_mult "
                                  "(tools/mup_base.py) and kept at every width")
    mup_zero_init: bool = _f(False, "mup: initialise the query and an untied readout (head) to zero (a tied head "
                             "is the embedding table and keeps its init); off by default: on, the optimum lr "
                             "moved 1.07 (log2) across widths 64-256 at 400 steps, off 0.17 (docs/mup.md)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "llama":
            return 64 * -(-(8 * self.d_model // 3) // 64)
        return 4 * self.d_model

    @property
    def use_bias(self) -> bool:
        return self.family == "gpt2" if self.bias is None else self.bias

    @property
    def use_qkv_bias(self) -> bool:
        return self.use_bias or self.qkv_bias

    @property
    def tied(self) -> bool:
        return self.family == "gpt2" if self.tie_embeddings is None else self.tie_embeddings


def default_cache_root() -> str:
    """Where jaxlm caches what it computes once per machine (token caches, tokenizers, the CPU
    peak) when data.cache_dir is empty: $JAXLM_CACHE_DIR, else ~/.cache/jaxlm."""
    return os.path.abspath(os.path.expanduser(os.environ.get("JAXLM_CACHE_DIR") or os.path.join("~", ".cache",
                                                                                              "jaxlm")))


@dataclass(frozen=True)
class DataConfig:
    source: str = _f("tfds:tiny_shakespeare", "training text: tfds:NAME[/CONFIG][:SPLIT], text:GLOB, jsonl:GLOB, "
                     "parquet:GLOB or hf:PATH[:SPLIT]; a mixture is 'SOURCE@WEIGHT; SOURCE@WEIGHT; ...' (rows drawn "
                     "by weight)")
    valid_source: str = _f("", "validation text; empty = the TFDS or hf: validation split, else the held-out fraction")
    valid_fraction: float = _f(0.05, "share of the text held out for validation when there is no split")
    text_field: str = _f("text", "feature (TFDS), field (jsonl) or column (Parquet) holding the text")
    doc_separator: str = _f("", "text files: split each file into documents at this string (e.g. '\\n\\n\\n\\n'); "
                            "empty = one document per file")
    invalid_utf8: str = _f("error", "invalid UTF-8 in text/jsonl files: error, or replace (with U+FFFD, counted)")
    tfds_data_dir: str = _f("", "TFDS data dir; empty = $TFDS_DATA_DIR or TFDS's default")
    tfds_download: bool = _f(False, "prepare a missing TFDS dataset with TFDS's download_and_prepare (needs network "
                                    "and the `prepare` extra with TensorFlow)")
    tokenizer: str = _f("", "a sentencepiece .model, a Hugging Face tokenizer.json, or a folder holding one; empty = "
                        "train one on the training text")
    eos_token: str = _f("", "tokenizer.json: the end-of-text token put before each document; empty = the first of "
                        "<|endoftext|>, <|end_of_text|>, </s>, <eos>, <|end|> the file has")
    bos_token: str = _f("", "the token in front of every document and prompt: empty = EOS (jaxlm's rule for the "
                        "models it pretrains); an imported model's own start token, e.g. <|begin_of_text|>")
    tokens_tokenizer: str = _f("", "tokens: sources: the tokenizer their ids come from (a .model, tokenizer.json or "
                               "folder); empty = data.tokenizer; it must be the run's tokenizer")
    tokens_format: str = _f("llmc", "tokens: .bin files: llmc (llm.c / modded-nanogpt shards: 1024-byte header) or "
                            "raw (headerless, data.tokens_dtype: nanoGPT's train.bin)")
    tokens_dtype: str = _f("uint16", "tokens: raw .bin files: uint16 or uint32")
    sampling: str = _f("epochs", "training windows: epochs (each window of each source once per epoch, in a seeded "
                       "order without replacement) or random (uniform offsets, drawn with replacement: runs made "
                       "before this key existed)")
    tokenizer_vocab: int = _f(1024, "vocabulary size of a trained tokenizer")
    tokenizer_type: str = _f("bpe", "a trained tokenizer: bpe or unigram (sentencepiece), or bytelevel (a GPT-2-style "
                             "byte-level BPE tokenizer.json)")
    tokenizer_max_bytes: int = _f(20_000_000, "cap on the text sample the tokenizer is trained on")
    cache_dir: str = _f("", "token cache; empty = $JAXLM_CACHE_DIR or ~/.cache/jaxlm")
    build_chunk_mb: float = _f(32.0, "token cache build: documents are encoded in chunks of about this many MB of "
                               "text, shared between the processes of a run and kept when a build is interrupted")
    format: str = _f("text", "text (documents: every token is a target) or sft (jsonl examples, {prompt, completion} "
                     "or {messages}, packed into rows with segment ids; the loss counts data.loss_on)")
    loss_on: str = _f("completion", "sft: the targets the loss counts: completion (completions and assistant "
                      "replies, with the end token after them) or all")
    chat_template: str = _f("", "sft messages: a Jinja chat template (a file, or the template itself); empty = "
                            "the tokenizer folder's tokenizer_config.json chat_template, else jaxlm's own")
    segment_ids: bool = _f(False, "rows carry document ids and in-document positions: attention never crosses "
                           "a document boundary")
    prefetch: int = _f(2, "batches prepared ahead on a background thread")

    @property
    def segmented(self) -> bool:
        """Rows carry segment ids and positions (always for packed fine-tuning examples)."""
        return self.segment_ids or self.format == "sft"


@dataclass(frozen=True)
class OptimConfig:
    name: str = _f("adamw", "adamw, or muon (Newton-Schulz-orthogonalised momentum on the hidden matrices, AdamW on "
                   "embeddings, head, norms and biases; docs/training.md)")
    lr: float = _f(1e-3, "peak learning rate")
    schedule: str = _f("cosine", "constant, cosine, linear, wsd (warmup-stable-decay) or inverse_sqrt")
    warmup_steps: int = _f(100, "linear warmup from 0 to lr")
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of lr (cosine, linear, wsd)")
    decay_fraction: float = _f(0.2, "wsd: share of the steps spent decaying at the end")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.1, "decoupled weight decay (never on norms or biases)")
    decay_embeddings: bool = _f(False, "apply weight decay to embeddings and the output head too")
    grad_clip: float = _f(1.0, "global gradient-norm clip; 0 = off")
    z_loss: float = _f(0.0, "weight of the z-loss (log-partition squared) term; 0 = off")
    adam_lr: float = _f(0.0, "muon: the peak learning rate of the AdamW leaves (embeddings, head, norms, biases); "
                        "0 = optim.lr")
    muon_beta: float = _f(0.95, "muon: momentum of the hidden matrices (Nesterov)")
    muon_ns_steps: int = _f(5, "muon: Newton-Schulz iterations")
    muon_rms: float = _f(0.2, "muon: each matrix update's RMS is scaled to this (0.2: about AdamW's), so an AdamW "
                         "learning rate is a sensible start; 0 = Keller Jordan's sqrt(max(1, out/in)) instead")


@dataclass(frozen=True)
class MeshConfig:
    data: int = _f(-1, "data-parallel axis size; -1 = all devices left over")
    fsdp: int = _f(1, "fully-sharded data-parallel axis size (shards params and optimizer state)")
    tensor: int = _f(1, "tensor-parallel axis size (shards heads, MLP and vocab)")
    backend: str = _f("jit", "jit (sharded jit, all three axes) or pmap (legacy data parallel)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(1000, "optimizer steps")
    seed: int = _f(0, "seed of the init and of the data order")
    batch_size: int = _f(32, "global batch in sequences")
    seq_len: int = _f(256, "tokens per sequence")
    grad_accum: int = _f(1, "microbatches per step (lax.scan inside the step)")
    loss_chunk: int = _f(-1, "logits per device the training loss and evaluation may hold at once: above it the "
                         "loss is fused with the output head and walks the sequence in chunks (no [B, T, V] "
                         "array); -1 = auto (2^25 on CPU, a sixteenth of device memory in float32 logits on "
                         "GPU/TPU), 0 = always the plain logits")
    log_every: int = _f(10, "steps between metrics records")
    max_bad_steps: int = _f(5, "a step with a non-finite loss or gradient is skipped (params and optimizer state "
                            "unchanged); this many in a row are tolerated, one more triggers train.on_bad_steps")
    on_bad_steps: str = _f("stop", "after max_bad_steps consecutive bad steps: stop (exit 3), or rollback to the "
                           "last checkpoint and skip the batches since it")
    max_rollbacks: int = _f(3, "rollbacks allowed in one run before it stops")
    diverge_factor: float = _f(0.0, "stop the run as diverged (exit 3) when a logged training loss after warmup is "
                               "above this multiple of the lowest logged so far; 0 = off (non-finite losses "
                               "are train.max_bad_steps' business)")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(200, "steps between validation passes; 0 = only at the end")
    batch_size: int = _f(0, "validation batch in sequences; 0 = train.batch_size")
    max_batches: int = _f(0, "cap on validation batches; 0 = the whole validation set")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _f(0, "steps between checkpoints; 0 = only at the end")
    keep: int = _f(3, "number of recent checkpoints kept")
    keep_every: int = _f(0, "also keep every checkpoint whose step is a multiple of this; 0 = none")
    enabled: bool = _f(True, "write checkpoints at all")
    init_from: str = _f("", "start a new run from another run's params (its newest usable checkpoint, or "
                        "<run>/checkpoints/<step>) with a fresh optimizer at step 0")
    branch_from: str = _f("", "start a new run as a branch of <run>/checkpoints/<step>: its params, optimizer state, "
                          "step and data position, under this run's own schedule and steps (e.g. the cooldown of a "
                          "wsd run from its stable phase); the model, data and batch must be that run's")
    at: List[int] = field(default_factory=list, metadata={"help": "also save a checkpoint after these steps, and "
                                                                  "keep it (e.g. a sweep's branch points)"})


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("default", "run name")
    dir: str = _f("", "run directory; empty = runs/<name>")
    peak_tflops: float = _f(0.0, "per-device peak TFLOP/s for MFU; 0 = from the device kind")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    progress: bool = _f(True, "show a progress bar")
    wandb: bool = _f(False, "log to Weights & Biases from process 0: config, scalars, run summary; needs the "
                     "wandb extra (pip install 'jaxlm[wandb]')")
    wandb_project: str = _f("jaxlm", "W&B project")
    wandb_entity: str = _f("", "W&B entity (user or team); empty = your default entity")
    wandb_mode: str = _f("", "W&B mode: online, offline or disabled; empty = wandb's default / $WANDB_MODE")

    @property
    def path(self) -> str:
        return self.dir or os.path.join("runs", self.name)


@dataclass(frozen=True)
class DistConfig:
    mode: str = _f("auto", "joining several processes (jax.distributed): auto = when explicit settings or a "
                   "known cluster (SLURM, Open MPI, TPU pod, Kubernetes) are found; always = join, leaving every "
                   "setting to JAX's detection; never = one process")
    coordinator: str = _f("", "host:port of process 0's coordination service; empty = $JAX_COORDINATOR_ADDRESS "
                          "or the cluster's")
    num_processes: int = _f(0, "processes in the run; 0 = $JAX_NUM_PROCESSES or the cluster's")
    process_id: int = _f(-1, "this process's index; -1 = $JAX_PROCESS_ID or the cluster's")
    init_timeout_s: int = _f(300, "seconds to wait for every process to join")
    heartbeat_s: int = _f(30, "a process silent this long is lost: the others exit with a message naming it "
                          "(JAX's own service gives up after twice this)")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# Presets set model keys only; explicit model keys in YAML or overrides win. The published
# architectures carry their own vocabulary, tying, norm epsilon and RoPE base (checked against
# the published configs in tests/test_presets.py); train them with another tokenizer by
# adding model.vocab_size=0. The tiny and llama-125m presets are jaxlm's own shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(family="gpt2", d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
    "gpt2-124m": dict(family="gpt2", d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, vocab_size=50257,
                      tie_embeddings=True, norm_eps=1e-5),
    "gpt2-355m": dict(family="gpt2", d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024, vocab_size=50257,
                      tie_embeddings=True, norm_eps=1e-5),
    "gpt2-774m": dict(family="gpt2", d_model=1280, n_layers=36, n_heads=20, max_seq_len=1024, vocab_size=50257,
                      tie_embeddings=True, norm_eps=1e-5),
    "llama-tiny": dict(family="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "llama-125m": dict(family="llama", d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048),
    # Llama 3.2 1B; its llama3 RoPE frequency scaling (for contexts past 8192) is not implemented
    "llama-1b": dict(family="llama", d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                     max_seq_len=2048, vocab_size=128256, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5),
}


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. 'optim.lr'."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            keys += all_keys(_SECTIONS[f.name], name + ".")
        else:
            keys.append(name)
    return keys


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:  # a right leaf under a wrong section, or a bare leaf name
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def _merge(base, other, origin: str):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"unknown config key '{key}' in {origin}{_did_you_mean(key)}") from None
    except ValidationError as e:
        expected = _expected_type(e.full_key)
        raise ConfigError(
            f"wrong type for '{e.full_key}' in {origin}: got {e.value!r}, expected {expected}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config in {origin}: {e.msg if hasattr(e, 'msg') else e}") from None


def _expected_type(key: str | None) -> str:
    if not key or "." not in key:
        return "a section (mapping)"
    section, leaf = key.split(".", 1)
    for f in dataclasses.fields(_SECTIONS.get(section, Config)()):
        if f.name == leaf:
            return str(f.type).replace("typing.", "")
    return "another type"


def _parse_overrides(overrides: list[str]):
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. optim.lr=3e-3)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"could not parse overrides {overrides}: {e}") from None


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                text: str | None = None) -> Config:
    """Defaults <- model preset <- YAML file <- dotted overrides, then the static checks.

    `text`: YAML in place of the file (e.g. the config stored in a checkpoint).
    """
    layers = []
    if text is not None:
        try:
            layers.append((OmegaConf.create(text), "the stored config"))
        except Exception as e:
            raise ConfigError(f"could not parse the stored config: {e}") from None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in many types
            raise ConfigError(f"could not parse {path}: {e}") from None
        if not OmegaConf.is_dict(loaded):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, optim:, ...)")
        layers.append((loaded, path))
    if overrides:
        layers.append((_parse_overrides(list(overrides)), "command-line overrides"))

    merged = OmegaConf.structured(Config)
    for layer, origin in layers:
        merged = _merge(merged, layer, origin)
    preset = merged.model.preset
    if preset:
        if preset not in PRESETS:
            hint = difflib.get_close_matches(preset, PRESETS, n=1)
            raise ConfigError(f"unknown model.preset '{preset}'"
                              + (f"; did you mean '{hint[0]}'?" if hint else "")
                              + f" Known presets: {', '.join(PRESETS)}")
        merged = OmegaConf.merge(OmegaConf.structured(Config), {"model": PRESETS[preset]})
        for layer, origin in layers:
            merged = _merge(merged, layer, origin)
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def help_text() -> str:
    """Every option group and key with its default and help string."""
    lines = []
    for sec in dataclasses.fields(Config):
        cls = _SECTIONS[sec.name]
        lines.append(f"\n{sec.name}: {cls.__name__}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {sec.name}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    lines.append("\nmodel presets: " + ", ".join(PRESETS))
    return "\n".join(lines)
