"""jaxlm's own estimate of a train step's memory per device, from the config and the mesh alone.

The compiler's number (`memory_analysis()` of the compiled step) is the truth; this plan is
what a user can reason about before compiling, and what `jaxlm train` and `jaxlm compile`
print beside the compiler's. It counts, per device:

- state: float32 parameters and AdamW's two moments, sharded over fsdp x tensor (the
  few replicated vectors, norms and biases, are counted as sharded too);
- gradients: one float32 copy of the parameters, sharded the same way;
- activations: what the backward pass keeps per layer, for the rows of one microbatch on
  one device (batch / (data x fsdp) / grad_accum), in the compute dtype, by
  `model.remat` (`ACTIVATION_WIDTHS`); attention that materialises its scores (xla,
  blocked) keeps [rows, heads / tensor, T, T] float32 per layer, flash kernels (cudnn,
  pallas) keep a row statistic only;
- logits: float32 [rows, T, vocab / tensor] and their gradient, or one chunk of them when
  the loss walks the sequence in chunks (`train.loss_chunk`);
- the batch: int32 inputs and targets (and segment ids and positions when packed).

`tests/test_aot.py` checks the plan against the TPU compiler within `PLAN_FACTOR`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxlm.config import Config, ModelConfig

PLAN_FACTOR = 2.0  # the plan is within this factor of the compiler's total, either way (tests/test_aot.py)

# Values of width d_model / ff_dim / kv width kept per token and layer for the backward pass,
# by remat policy: (per d_model, per ff_dim). none: norm inputs and outputs, q, k, v, the
# attention output and the residual sums (about 8 d) and the MLP's hidden values (gate, up and
# their product for llama, 3; pre- and post-activation for gpt2, 2). dots: the outputs of
# the matmuls only. full: the block input only (one block is recomputed at a time).
ACTIVATION_WIDTHS = {"none": (8, 3), "dots": (5, 2), "dots_no_batch": (5, 2), "full": (1, 0)}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device, by part."""
    state: int
    gradients: int
    activations: int
    logits: int
    batch: int

    @property
    def total(self) -> int:
        return self.state + self.gradients + self.activations + self.logits + self.batch

    def describe(self) -> str:
        mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
        return (f"{mib(self.total)} MiB (params+optimizer {mib(self.state)}, grads {mib(self.gradients)}, "
                f"activations {mib(self.activations)}, logits {mib(self.logits)}, batch {mib(self.batch)})")


def block_matrices(m: ModelConfig) -> int:
    """Parameters in the blocks' kernels (what Muon updates, with one moment each)."""
    D, F, H = m.d_model, m.ff_dim, m.head_dim
    attn = D * (m.n_heads + 2 * m.kv_heads) * H + m.n_heads * H * D
    return m.n_layers * (attn + (3 if m.family == "llama" else 2) * D * F)


def plan(cfg: Config, m: ModelConfig, params: int, vocab: int, mesh_shape: dict[str, int],
         loss_chunk: int) -> MemoryPlan:
    """The plan of `cfg`'s train step, for the resolved model config `m` (its attention kernel
    decided), `params` parameters in all, the model's vocabulary, a mesh {data, fsdp, tensor}
    and the step's loss chunk length (0 = plain logits)."""
    shards = max(mesh_shape["fsdp"] * mesh_shape["tensor"], 1)
    tensor = mesh_shape["tensor"]
    rows = max(cfg.train.batch_size // (mesh_shape["data"] * mesh_shape["fsdp"]) // cfg.train.grad_accum, 1)
    T = cfg.train.seq_len
    tokens = rows * T
    a = _DTYPE_BYTES.get(m.dtype, 4)
    per_d, per_ff = ACTIVATION_WIDTHS.get(m.remat, ACTIVATION_WIDTHS["none"])
    layer = tokens * (per_d * m.d_model + per_ff * m.ff_dim // tensor) * a
    if m.attention in ("xla", "blocked") and m.remat in ("none", "dots", "dots_no_batch"):
        layer += rows * -(-m.n_heads // tensor) * T * T * 4  # the softmax's probabilities, float32
    recompute = 0
    if m.remat == "full":  # one block's activations exist again while its backward runs
        recompute = tokens * (8 * m.d_model + 3 * m.ff_dim // tensor) * a
    vocab = -(-vocab // tensor)
    logit_tokens = rows * (loss_chunk or T)
    keys = 4 if cfg.data.segment_ids else 2
    moments = 2 * params - (block_matrices(m) if cfg.optim.name == "muon" else 0)  # Muon keeps one per matrix
    return MemoryPlan(state=4 * (params + moments) // shards, gradients=4 * params // shards,
                      activations=m.n_layers * layer + recompute, logits=2 * 4 * logit_tokens * vocab,
                      batch=keys * 4 * tokens * cfg.train.grad_accum)


def plan_step(cfg: Config, stepper, params: int, vocab: int) -> MemoryPlan:
    """`plan` of a built step (`jaxlm.step.Stepper`): its model's resolved config, mesh and loss chunk."""
    return plan(cfg, stepper.model.cfg, params, vocab, dict(stepper.mesh.shape), stepper.loss_chunk)
