"""The two kernel sets a model compiles with, and the one place that chooses between them.

`model.kernels` names the set:

- `cpu`: kernels tuned for XLA's CPU runtime (docs/cpu-kernels.md). Products whose
  weight gradient is formed in the CPU-fast layout behind an optimization barrier and
  accumulate in float32 (`dots`); norm, GELU and SwiGLU with written-out backward passes
  (`layers`); bfloat16 residuals stashed as uint16; causal attention in query blocks
  (`attention`); the loss fused with the output head (`loss`).
- `standard`: plain JAX (`standard`): einsum products in the compute dtype, Flax norms,
  jax.nn activations under autodiff, and the attention kernel of the backend.
- `auto`: `cpu` on the CPU backend, `standard` on GPUs and TPUs.

Dropout (`model.dropout`, training only) is shared by both sets: `dropout` draws the masks
from (seed, step, layer, site, global row, position); `attention` drops probabilities in
the blocked kernel, and sends xla / cudnn / pallas training to an explicit softmax.

`resolve` turns `auto` (and `model.attention=auto`) into concrete values once, where a run
or an inference session is set up, from the platform of its devices; the model only
ever receives resolved values (`ops` refuses `auto`). `describe` is the line the plan
prints.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxlm.config import ModelConfig
from jaxlm.config_checks import KERNELS
from jaxlm.errors import ConfigError
from jaxlm.kernels import dots, dropout, layers, loss, standard
from jaxlm.kernels.attention import causal_attention, dropped_causal_attention, n_blocks

@dataclasses.dataclass(frozen=True)
class Ops:
    """The operations that differ between kernel sets (everything else in the model is shared)."""

    contract: Callable  # (x, w, n_in) -> tensordot(x, w, n_in)
    attend: Callable  # (x, table_VD) -> x @ table^T
    gelu: Callable
    swiglu: Callable  # (gate, up) -> silu(gate) * up
    norm: Callable | None  # (x, scale, bias, rms, eps), or None: Flax's LayerNorm / RMSNorm modules
    loss: Callable  # (x_BTD, w, targets, weight, z_weight, tied, chunk, dtype, cap=0) -> (loss, nll sum, z sum)
    head_logits: Callable  # (x_BCD, w, tied, dtype, cap=0) -> float32 logits of a chunk, soft-capped


CPU = Ops(dots.contract, dots.attend, layers.gelu, layers.swiglu, layers.norm, loss.fused_loss, loss.head_logits)
STANDARD = Ops(standard.contract, standard.attend, standard.gelu, standard.swiglu, None, standard.chunked_loss,
               standard.head_logits)


def ops(kernels: str) -> Ops:
    if kernels == "cpu":
        return CPU
    if kernels == "standard":
        return STANDARD
    raise ValueError(f"model.kernels={kernels!r} reached the model unresolved; jaxlm.kernels.resolve() "
                     "chooses cpu or standard where the run is set up")


def attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, m: ModelConfig, drop_B=None):
    """Causal self-attention for training and scoring, by the resolved `model.attention`.

    drop_B: the rows' dropout key data [B, 2] for the probabilities (training with
    model.dropout > 0, see `dropout.row_keys`), or None. The blocked path drops probabilities
    inside its query blocks; xla, cudnn and pallas cannot, so training with dropout takes the
    explicit-softmax path (`standard.dropped_attention`) instead."""
    if drop_B is not None and m.dropout > 0:
        return _dropped_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, m, drop_B)
    if m.attention == "blocked":
        return causal_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, n_blocks(q_BTNH.shape[1], m.attention_block))
    if m.attention in ("xla", "cudnn", "pallas"):
        return standard.attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, m.attention)
    raise ValueError(f"model.attention={m.attention!r} reached the model unresolved (see jaxlm.kernels.resolve)")


def _dropped_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, m: ModelConfig, drop_B):
    if m.attention == "blocked":
        b, t, n, _ = q_BTNH.shape
        blocks, kv = n_blocks(t, m.attention_block), k_BTKH.shape[2]
        c = t // blocks
        keeps = tuple(dropout.probs_keep(drop_B, n, kv, t, i * c, (i + 1) * c, (i + 1) * c, m.dropout)
                      for i in range(blocks))
        return dropped_causal_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, keeps, blocks, dropout.keep_scale(m.dropout))
    return standard.dropped_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, drop_B, m.dropout)


def cudnn_unsupported(m: ModelConfig, capability: tuple[int, ...] = ()) -> str:
    """Why cuDNN's flash attention cannot take this model ('' when it can). `capability`: the
    GPU's compute capability, e.g. (9, 0); head dims up to 256 need Hopper (9.0) or later."""
    if m.dtype != "bfloat16":
        return f"cuDNN flash attention takes bfloat16 inputs; model.dtype is {m.dtype}"
    h_max = 256 if tuple(capability) >= (9, 0) else 128
    if m.head_dim % 8 or m.head_dim > h_max:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and at most {h_max}, got {m.head_dim}"
    return ""


def pallas_unsupported(seq_len: int) -> str:
    if seq_len % 128:
        return f"the Pallas TPU flash kernel needs a sequence length that is a multiple of 128, got {seq_len}"
    return ""


def _auto_attention(kernels: str, platform: str, m: ModelConfig, seq_len: int, capability) -> str:
    if kernels == "cpu":
        return "blocked"
    if platform == "gpu" and not cudnn_unsupported(m, capability):
        return "cudnn"
    if platform == "tpu" and not pallas_unsupported(seq_len):
        return "pallas"
    return "xla"


def resolve(m: ModelConfig, platform: str, seq_len: int, capability: tuple[int, ...] = ()) -> ModelConfig:
    """`m` with `kernels` and `attention` resolved for devices of `platform` ('cpu', 'gpu',
    'tpu'; GPUs of any vendor report 'gpu') and training sequences of `seq_len`."""
    if m.kernels not in KERNELS:
        raise ConfigError(f"model.kernels must be one of {', '.join(KERNELS)}, got {m.kernels!r}")
    kernels = m.kernels if m.kernels != "auto" else ("cpu" if platform == "cpu" else "standard")
    attn = m.attention
    if attn == "auto":
        attn = _auto_attention(kernels, platform, m, seq_len, capability)
    elif attn == "cudnn":
        why = "this run's devices are " + platform if platform != "gpu" else cudnn_unsupported(m, capability)
        if why:
            raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU and a shape cuDNN supports: {why}")
    elif attn == "pallas":
        why = "this run's devices are " + platform if platform != "tpu" else pallas_unsupported(seq_len)
        if why:
            raise ConfigError(f"model.attention=pallas needs a TPU: {why}")
    return dataclasses.replace(m, kernels=kernels, attention=attn)


def capability(device) -> tuple[int, ...]:
    """A GPU's compute capability, e.g. (9, 0); () for other devices."""
    value = getattr(device, "compute_capability", None) or ""
    return tuple(int(x) for x in str(value).split(".") if x.isdigit())


def resolve_for(m: ModelConfig, device, seq_len: int) -> ModelConfig:
    """`resolve` for a jax device (its platform and, on GPUs, compute capability)."""
    return resolve(m, device.platform, seq_len, capability(device))


def describe(m: ModelConfig, platform: str, seq_len: int, capability: tuple[int, ...] = ()) -> str:
    """The plan line for a resolved model config: which kernels and attention run, and why."""
    if m.kernels == "cpu":
        line = "kernels: cpu (custom VJPs and layouts tuned for XLA's CPU runtime)"
    else:
        line = "kernels: standard (plain JAX: einsum products, Flax norms, autodiff)"
    attn = {"blocked": "blocked causal query blocks", "cudnn": "cuDNN flash attention (jax.nn.dot_product_attention)",
            "pallas": "Pallas TPU flash attention",
            "xla": "XLA path of jax.nn.dot_product_attention, float32 [B, N, T, T] scores"}[m.attention]
    if m.attention == "xla" and platform in ("gpu", "tpu"):
        why = cudnn_unsupported(m, capability) if platform == "gpu" else pallas_unsupported(seq_len)
        attn += "; no flash kernel: " + (why or "model.attention=xla was asked for")
    if m.attention == "cudnn":
        attn += "; packed documents: a [B, 1, T, T] bias"
    if m.dropout > 0:
        attn += f"; dropout {m.dropout:g} on the residual branches and the attention probabilities"
        if m.attention != "blocked":
            attn += (", so training attention takes the explicit-softmax path (float32 [B, N, T, T] "
                     "probabilities); scoring and generation keep " + m.attention)
    return f"{line}; attention: {attn}"
