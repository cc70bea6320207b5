"""Train state, sharded initialisation, and the pure train / eval steps.

`train_step(state, batch) -> (state, metrics)` is one pure function used by both
backends: sharded `jax.jit` over the (data, fsdp, tensor) mesh, and legacy `jax.pmap`
where `axis_name` makes it sum gradients and token counts across devices. Losses are
built from sums over tokens divided by the global token count, so a step gives the same
update whatever the mesh, the backend or the number of microbatches.

Shape suffixes: B batch, T sequence length, V vocabulary, A microbatches.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import kernels, sharding
from jaxlm.config import Config
from jaxlm.kernels.loss import chunk_length
from jaxlm.model import Decoder, compute_dtype
from jaxlm.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def build(cfg: Config, vocab_size: int, mesh):
    """(model, tx, schedule) for a config, a resolved vocabulary size and the mesh the model runs
    on. The model's kernels and attention are resolved here, once, for the mesh's devices
    (`jaxlm.kernels.resolve`): the model itself never asks which backend it runs on."""
    model = Decoder(kernels.resolve_for(cfg.model, mesh.devices.flat[0], cfg.train.seq_len), vocab_size)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, cfg.model)
    return model, tx, schedule


def _boxed_init(model: Decoder, tx, rows: int, seq_len: int):
    def init(rng) -> TrainState:
        tokens_BT = jnp.zeros((rows, seq_len), jnp.int32)
        params = model.init(rng, tokens_BT)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def _mesh_init(model: Decoder, tx, mesh, seq_len: int):
    """The boxed init, with one dummy row per data-parallel shard so batch constraints divide."""
    return _boxed_init(model, tx, mesh.shape["data"] * mesh.shape["fsdp"], seq_len)


def abstract_key(seed: int):
    """A PRNG key's shape and dtype, made without running anything: the mesh's devices may be
    compile-only (`jaxlm compile --topology`)."""
    return jax.eval_shape(jax.random.key, seed)


def _unmask(boxed):
    """The boxed state with optax's masked-out entries (a partitioned optimizer's state for the leaves
    another branch owns, as in Muon's) unboxed, so its specs have the unboxed state's structure."""
    import optax

    def unmask(x):
        return x.value if isinstance(x, nn.LogicallyPartitioned) and isinstance(x.value, optax.MaskedNode) else x

    return jax.tree.map(unmask, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def state_shardings(model: Decoder, tx, mesh, seq_len: int):
    """Shardings of the train state, from the logical axis names of an abstract init."""
    with sharding.activate(mesh):
        boxed = jax.eval_shape(_mesh_init(model, tx, mesh, seq_len), abstract_key(0))
    return sharding.logical_to_sharding(nn.get_partition_spec(_unmask(boxed)), mesh)


def state_init(model: Decoder, tx, mesh, seq_len: int, shardings):
    """seed key -> the train state, jitted straight into its shardings (never on one device first)."""
    init = _mesh_init(model, tx, mesh, seq_len)
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)


def batch_mask(batch: dict):
    """[B, T] float32: 1 where a target is scored (the batch's mask, else every target)."""
    if "mask" in batch:
        return batch["mask"].astype(jnp.float32)
    return jnp.ones(batch["targets"].shape, jnp.float32)


def token_losses(params, batch: dict, model: Decoder, dropout=None):
    """(NLL, log-partition, mask) of every target of a batch, each [B, T] float32; `dropout`:
    (key, rows_B) while training (see `Decoder`), else None."""
    logits_BTV = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                             batch.get("segment_ids"), **_dropout_arg(dropout)).astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    return logz_BT - target_logit_BT, logz_BT, batch_mask(batch)


def _dropout_arg(dropout) -> dict:
    """The Decoder's keyword for dropout: none at all without it, so that program is unchanged."""
    return {} if dropout is None else {"dropout": dropout}


def token_sums(params, batch: dict, model: Decoder, dropout=None):
    """(sum of NLL, sum of log-partition squared, number of scored tokens) over a batch."""
    nll_BT, logz_BT, mask_BT = token_losses(params, batch, model, dropout)
    return jnp.sum(nll_BT * mask_BT), jnp.sum(jnp.square(logz_BT) * mask_BT), jnp.sum(mask_BT)


def train_loss(params, batch: dict, model: Decoder, count, z_loss: float, chunk: int, dropout=None):
    """(sum of mask*(NLL + z_loss*logZ^2) / count, sum of mask*NLL / count) over a batch.

    chunk > 0: the kernel set's chunked loss (cpu: `kernels.loss.fused_loss`, standard:
    `kernels.standard.chunked_loss`) walks the sequence in chunks of `chunk` positions and
    never builds [B, T, V]; chunk == 0: the plain logits of `token_sums`. `dropout`:
    (key, rows_B) or None, see `Decoder`.
    """
    if not chunk:
        sum_nll, sum_z, _ = token_sums(params, batch, model, dropout)
        return (sum_nll + z_loss * sum_z) / count, sum_nll / count
    x_BTD, head = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                              batch.get("segment_ids"), hidden=True, **_dropout_arg(dropout))
    weight_BT = batch_mask(batch) / count
    loss = kernels.ops(model.cfg.kernels).loss
    total, sum_nll, _ = loss(x_BTD, head, batch["targets"], weight_BT, z_loss * weight_BT, model.cfg.tied, chunk,
                             compute_dtype(model.cfg), model.cfg.logit_softcap)
    return total, sum_nll


CPU_LOGITS_BUDGET = 2**25


def logits_budget(cfg: Config, device) -> int:
    """Logits one device may hold at once in the loss or the scorer; 0 = no limit.

    `train.loss_chunk` when set (> 0, or 0 for no limit); auto (-1): 2^25 on a CPU, measured
    (the plain path is faster while the logits fit, since each chunk adds a pass over the
    head's gradient, and at 2x over it two large chunks beat the plain path); on a GPU or
    TPU, a sixteenth of the device's memory in float32 logits (bytes_limit / 64), so the
    plain logits and their gradient stay a small share of memory; 2^25 again when the device
    does not report its memory.
    """
    if cfg.train.loss_chunk >= 0:
        return cfg.train.loss_chunk
    if device.platform == "cpu":
        return CPU_LOGITS_BUDGET
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit", 0)
    except Exception:  # not every backend reports memory
        limit = 0
    if not limit and device.platform == "tpu":  # a compile-only TPU (jaxlm compile): its chip's HBM
        from jaxlm.aot import hbm_bytes
        limit = hbm_bytes(device.device_kind)
    return limit // 64 if limit else CPU_LOGITS_BUDGET


def loss_chunk(seq_len: int, rows: int, vocab_size: int, budget: int) -> int:
    """Sequence positions per chunk for `rows` sequences per device; 0 = the plain logits,
    when [rows, seq_len, vocab] fits in `budget` (or the budget is 0: no limit)."""
    if not budget or rows * seq_len * vocab_size <= budget:
        return 0
    return chunk_length(seq_len, rows, vocab_size, budget)


def global_rows(batch: dict, axis_name: str | None):
    """[B] int32: each row's index in the global batch (under pmap the step sees one device's
    rows, which are the device's index times its rows onwards)."""
    rows = batch["targets"].shape[0]
    first = jax.lax.axis_index(axis_name) * rows if axis_name else 0
    return first + jnp.arange(rows, dtype=jnp.int32)


def train_step(state: TrainState, batch: dict, *, model: Decoder, tx, schedule: Callable,
               z_loss: float = 0.0, accum: int = 1, axis_name: str | None = None, chunk: int = 0, seed: int = 0):
    """One optimizer step over a global batch, accumulating `accum` microbatches with lax.scan.

    With model.dropout > 0 the masks come from (seed, state.step) and each row's global index
    (`kernels.dropout`), so they are the same on any mesh or backend and for any `accum`;
    at rate 0 none of that is in the program."""
    count = jnp.sum(batch_mask(batch))
    if axis_name:
        count = jax.lax.psum(count, axis_name)
    key = None
    if model.cfg.dropout > 0:
        key = kernels.dropout.step_key(seed, state.step)
        batch = {**batch, "rows": global_rows(batch, axis_name)}  # split into microbatches with the rows

    def micro_loss(params, mb):
        return train_loss(params, mb, model, count, z_loss, chunk, None if key is None else (key, mb["rows"]))

    grad_fn = jax.grad(micro_loss, has_aux=True)
    if accum == 1:
        grads, loss = grad_fn(state.params, batch)
    else:
        # Microbatch a takes rows a, a+A, a+2A, ...: every device keeps its share of each
        # microbatch, so splitting the batch moves no data between devices.
        def split(x_B):
            return x_B.reshape((x_B.shape[0] // accum, accum) + x_B.shape[1:]).swapaxes(0, 1)

        def body(carry, mb):
            g_sum, loss_sum = carry
            g, part = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, g_sum, g), loss_sum + part), None

        zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
        (grads, loss), _ = jax.lax.scan(body, zeros, jax.tree.map(split, batch))
    if axis_name:
        grads = jax.lax.psum(grads, axis_name)
        loss = jax.lax.psum(loss, axis_name)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient leaves params and optimizer state as they were; the step
    # counter still advances (it is the data position), and the host counts the skip. A cond
    # rather than a select over the state: the update stays one pass over the parameters.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(operands):
        grads, opt_state, params = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda operands: (operands[2], operands[1]),
                                     (grads, state.opt_state, state.params))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "tokens": count,
               "finite": finite}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model: Decoder, budget: int = 0, shards: int = 1):
    """NLL of every target of a batch, 0 where the mask is 0 ([B, T] float32): the evaluation
    harness adds them on the host in float64, so any split of the data gives the same sums.

    When the float32 logits of the batch's rows per device (B / `shards`) exceed `budget`,
    the head is applied in sequence chunks and no [B, T, V] array exists, so any model that
    trains on a mesh can be scored on it."""
    B, T = batch["targets"].shape
    chunk = loss_chunk(T, max(B // shards, 1), model.vocab_size, budget)
    mask_BT = batch_mask(batch)
    if not chunk:
        nll_BT, _, _ = token_losses(params, batch, model)
        return nll_BT * mask_BT
    x_BTD, head = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                              batch.get("segment_ids"), hidden=True)
    nll_BT = kernels.standard.chunked_nll(x_BTD, head, batch["targets"], model.cfg.tied, chunk,
                                          compute_dtype(model.cfg), kernels.ops(model.cfg.kernels).head_logits,
                                          model.cfg.logit_softcap)
    return nll_BT * mask_BT


class Stepper:
    """The compiled train and eval steps of one run: one protocol, one class per backend.

    `Stepper(cfg, model, tx, schedule, mesh)` returns a `JitStepper` (sharded jit over the
    data/fsdp/tensor mesh) or a `PmapStepper` (legacy data parallel), by `mesh.backend`.
    Outside this module a train state is only ever handled through these methods, so no
    other module needs to know how a backend lays the state out:

    - `init_state(seed)`, `restore_target()` (the abstract state a checkpoint restores into),
      `adopt(restored)` and `with_params(state, params)` build states;
    - `local_rows(global_rows)` is the slice of a global batch this process materialises, and
      `place(local_batch, global_rows)` puts those rows on the devices;
    - `train(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> NLL [B, T]`;
    - `params(state)` and `logical_state(state)` give one logical copy (metrics, checkpoints).

    `wrap_step`, when given, wraps the pure train step before it is compiled (tests inject
    faults this way; see `jaxlm.faults`).
    """

    def __new__(cls, cfg: Config, *args, **kwargs):
        if cls is Stepper:
            cls = PmapStepper if cfg.mesh.backend == "pmap" else JitStepper
        return super().__new__(cls)

    def __init__(self, cfg: Config, model: Decoder, tx, schedule, mesh, wrap_step: Callable | None = None):
        self.cfg, self.model, self.tx, self.mesh = cfg, model, tx, mesh
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        rows = max(cfg.train.batch_size // cfg.train.grad_accum // shards, 1)
        self.logits_budget = logits_budget(cfg, mesh.devices.flat[0])
        self.loss_chunk = loss_chunk(cfg.train.seq_len, rows, model.vocab_size, self.logits_budget)
        step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=cfg.optim.z_loss,
                                 accum=cfg.train.grad_accum, chunk=self.loss_chunk, axis_name=self.axis_name,
                                 seed=cfg.train.seed)
        self.train_fn = wrap_step(step) if wrap_step else step
        # under pmap the step sees one device's rows; under jit the global batch
        self.eval_fn = functools.partial(eval_step, model=model, budget=self.logits_budget,
                                         shards=1 if self.axis_name else shards)
        self.compiled_memory = None  # the compiled train step's memory analysis, where the backend gives one

    axis_name: str | None = None

    def compile(self, state, batch_shapes: dict[str, tuple], eval_shapes: dict[str, tuple] | None = None) -> float:
        """Compile the train step (and, given `eval_shapes`, the eval step) ahead of time for these
        global batch shapes; seconds taken (0: compiled lazily)."""
        return 0.0

    def with_params(self, state, params):
        """`state` with `params` (restored into `restore_target().params`) in place of its own."""
        return state.replace(params=self.adopt(params))

    def params(self, state):
        return self.logical_state(state.params)


class JitStepper(Stepper):
    """One compiled executable per step kind, explicit in/out shardings, the state donated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._train = self._eval = self._init = None
        self._shardings = None

    @property
    def state_shardings(self):
        if self._shardings is None:
            self._shardings = state_shardings(self.model, self.tx, self.mesh, self.cfg.train.seq_len)
        return self._shardings

    def init_state(self, seed: int):
        if self._init is None:  # compiled once: every seed (a sweep's, a test's) reuses the program
            self._init = state_init(self.model, self.tx, self.mesh, self.cfg.train.seq_len, self.state_shardings)
        with sharding.activate(self.mesh):
            return self._init(jax.random.key(seed))

    def abstract_state(self, seed: int = 0):
        """The train state as sharded ShapeDtypeStructs: compile without allocating it."""
        init = _mesh_init(self.model, self.tx, self.mesh, self.cfg.train.seq_len)
        with sharding.activate(self.mesh):
            shapes = jax.eval_shape(lambda r: nn.unbox(init(r)), abstract_key(seed))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.state_shardings)

    def restore_target(self):
        return self.abstract_state()

    def adopt(self, tree):
        return tree  # restored straight into this run's shardings

    def logical_state(self, tree):
        return tree

    def compile(self, state, batch_shapes: dict[str, tuple], eval_shapes: dict[str, tuple] | None = None) -> float:
        """`state` may be the real state or `abstract_state()`."""
        t0 = time.perf_counter()
        bsh = sharding.batch_sharding(self.mesh)

        def abstract(shapes):
            return {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=bsh) for k, s in shapes.items()}

        with sharding.activate(self.mesh):
            jitted = jax.jit(self.train_fn, in_shardings=(self.state_shardings, bsh),
                             out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                             donate_argnums=0)
            self._train = jitted.lower(state, abstract(batch_shapes)).compile()
            if eval_shapes:
                self._eval = self._eval_jit().lower(state.params, abstract(eval_shapes)).compile()
        try:
            self.compiled_memory = self._train.memory_analysis()
        except Exception:  # not every backend reports it
            self.compiled_memory = None
        return time.perf_counter() - t0

    @property
    def compiled_train(self):
        """The train step compiled by `compile` (None before): its memory and cost analyses."""
        return self._train

    @property
    def compiled_eval(self):
        return self._eval

    def local_rows(self, global_rows: int) -> slice:
        return sharding.process_rows(self.mesh, global_rows)

    def place(self, local_batch: dict[str, np.ndarray], global_rows: int):
        return sharding.shard_batch(local_batch, self.mesh, global_rows)

    def train(self, state, batch):
        if self._train is None:  # compile on first use for the shapes given
            self.compile(state, {k: v.shape for k, v in batch.items()})
        return self._train(state, batch)

    def _eval_jit(self):
        # replicated output: every process gets every row, so the host can place each target
        return jax.jit(self.eval_fn, in_shardings=(self.state_shardings.params, sharding.batch_sharding(self.mesh)),
                       out_shardings=sharding.replicated(self.mesh))

    def eval_step(self, params, batch):
        if self._eval is None:
            self._eval = self._eval_jit()
        with sharding.activate(self.mesh):
            return self._eval(params, batch)


class PmapStepper(Stepper):
    """The same pure functions replicated over the devices with jax.pmap, gradients summed with psum.

    Every device holds a whole copy of the state: the state is a numpy/device array tree
    whose leading axis is this process's devices (pmap's inputs are per process).
    """

    axis_name = "batch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.devices = list(self.mesh.devices.flat)
        self.local = [d for d in self.devices if d.process_index == jax.process_index()]
        self._train = jax.pmap(self.train_fn, axis_name=self.axis_name, donate_argnums=0, devices=self.devices)
        self._eval = jax.pmap(self.eval_fn, devices=self.devices)
        self._init = None

    def _one_copy_init(self):
        """The unboxed init of one logical copy of the state (built under jit, then replicated)."""
        init = _boxed_init(self.model, self.tx, 1, self.cfg.train.seq_len)
        return lambda r: nn.unbox(init(r))

    def init_state(self, seed: int):
        if self._init is None:  # compiled once, as on the jit path
            self._init = jax.jit(self._one_copy_init(), out_shardings=sharding.replicated(self.mesh))
        return self.adopt(self._init(jax.random.key(seed)))

    def restore_target(self):
        """One copy on the first device: restored there, then spread by adopt()."""
        one = jax.sharding.SingleDeviceSharding(self.local[0])
        shapes = jax.eval_shape(self._one_copy_init(), jax.random.key(0))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes)

    def adopt(self, tree):
        n = len(self.local)  # pmap shards the leading axis of its inputs over this process's devices
        return jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), jax.device_get(tree))

    def logical_state(self, tree):
        """Device 0's copy, on the host."""
        return jax.device_get(jax.tree.map(first_copy, tree))

    def local_rows(self, global_rows: int) -> slice:
        """Rows by device, in the order of the mesh's devices (each process's devices are contiguous there)."""
        per = global_rows // len(self.devices)
        first = self.devices.index(self.local[0])
        return slice(first * per, (first + len(self.local)) * per)

    def place(self, local_batch: dict[str, np.ndarray], global_rows: int):
        n = len(self.local)
        return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in local_batch.items()}

    def train(self, state, batch):
        state, metrics = self._train(state, batch)
        # every device holds the same metrics: keep device 0's shard
        return state, jax.tree.map(first_copy, metrics)

    def eval_step(self, params, batch):
        """[devices, rows per device, T]: the host reshapes it to the batch's [B, T] (every process
        gets every device's rows)."""
        out = self._eval(params, batch)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        return out


def first_copy(x):
    """Device 0's copy of a pmap input or output (stacked over devices), as a one-device array.

    Never `x[0]`: on a pmap output that is a program over every device, and two such
    programs in flight at once (say, a slice of step N's metrics and step N+1) can start in
    a different order on different devices, so their collectives wait on each other. On a
    CPU that stalls until XLA's rendezvous gives up and aborts the process.
    """
    if isinstance(x, np.ndarray):  # the host copy adopt() makes
        return x[0]
    return x.addressable_shards[0].data.reshape(x.shape[1:])
