"""Orbax checkpoints of a run: the train state, where the run stands, and its tokenizer.

`Saver` writes asynchronously through an Orbax CheckpointManager into
`<run_dir>/checkpoints/<step>/`, keeping the newest `checkpoint.keep` plus every step that
is a multiple of `checkpoint.keep_every`. A checkpoint has three items:

- `state`: the train state (params, optimizer state, step);
- `meta`: step, seed, data position, counters of skipped steps and rollbacks, the
  resolved config, and a checksum and finiteness flag of every array of the state;
- `tokenizer`: the sentencepiece model the token ids come from,

so one checkpoint directory is enough to resume, evaluate or export. The data position is
the step plus an offset (non-zero only after a rollback skipped batches): batches are a
pure function of (seed, position), so nothing else about the loader needs saving.

Checksums are computed on the devices over the logical (global) arrays with integer
arithmetic, so they do not depend on the mesh: `restore` recomputes them in the target
shardings and refuses a checkpoint whose bytes changed after it was written (Orbax reads a
flipped byte in a compressed chunk back without complaint). `restore_latest` walks back
from the newest checkpoint to the newest one that restores and verifies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlm.config import Config, to_yaml
from jaxlm.errors import CheckpointError

FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str) -> str:
    return os.path.abspath(os.path.join(run_dir, "checkpoints"))


# -- checksums ------------------------------------------------------------------------

def _leaf_summary(x):
    """(all finite, position-weighted uint32 sum of the bit patterns) of one array.

    Integer sums wrap exactly whatever the reduction order, so the result is the same on
    any mesh. Weights are odd, so changing any single element always changes the sum.
    """
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        bits = x.astype(jnp.uint32)
    else:
        raise CheckpointError(f"no checksum for dtype {x.dtype}")
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis in range(x.ndim):
        index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    weights = (index * jnp.uint32(2654435761)) | jnp.uint32(1)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
    return finite, jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _summaries(tree):
    pairs = [_leaf_summary(x) for x in jax.tree.leaves(tree)]
    return [f for f, _ in pairs], [c for _, c in pairs]


def summarize(tree) -> dict[str, dict]:
    """{leaf path: {"finite": bool, "checksum": int}} of a pytree of (sharded) arrays."""
    finite, checksums = jax.device_get(_summaries(tree))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return {p: {"finite": bool(f), "checksum": int(c)} for p, f, c in zip(paths, finite, checksums)}


def non_finite(summary: dict[str, dict]) -> list[str]:
    return [path for path, s in summary.items() if not s["finite"]]


def _verify(tree, meta: dict, prefix: str = "") -> None:
    """Raise when a restored tree's checksums differ from those recorded at save time."""
    recorded = meta.get("checksums")
    if not recorded:
        return
    now = summarize(tree)
    bad = [p for p, s in now.items() if recorded.get(prefix + p, {}).get("checksum") != s["checksum"]]
    if bad:
        raise CheckpointError(f"checksum mismatch in {len(bad)} arrays (first: {prefix + bad[0]}): the files "
                              "changed after they were written")


# -- writing ----------------------------------------------------------------------------

def check_writable(directory: str) -> None:
    """Create `directory` and write a file in it, or raise CheckpointError (before any training)."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"checkpoint directory '{directory}' is not writable ({e.strerror or e}); fix it or "
                              f"set checkpoint.enabled=false") from None


class Saver:
    def __init__(self, run_dir: str, cfg: Config, tokenizer_proto: bytes):
        self.cfg = cfg
        self.directory = checkpoint_dir(run_dir)
        if jax.process_index() == 0:
            check_writable(self.directory)
        self.tokenizer = {"sha256": hashlib.sha256(tokenizer_proto).hexdigest(),
                          "sentencepiece_model_base64": base64.b64encode(tokenizer_proto).decode("ascii")}
        c = cfg.checkpoint
        keep = [ocp.checkpoint_managers.LatestN(c.keep)]
        if c.keep_every:
            keep.append(ocp.checkpoint_managers.EveryNSteps(c.keep_every))
        if c.at:
            keep.append(ocp.checkpoint_managers.CustomSteps(list(c.at)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.blocked_s = 0.0  # time the training loop spent inside save()

    def save(self, step: int, state, **position) -> None:
        """Start writing `state` (one logical copy: see `Stepper.logical_state`) as checkpoint `step`;
        returns once the arrays are copied off the devices.

        `position` holds data_position, skipped_steps and rollbacks. A state with a
        non-finite value is never written: CheckpointError names the arrays.
        """
        if self.manager.latest_step() == step:
            return
        t0 = time.perf_counter()
        summary = summarize(state)
        bad = non_finite(summary)
        if bad:
            raise CheckpointError(f"the train state at step {step} holds non-finite values ({len(bad)} arrays, "
                                  f"first {bad[0]}); not writing it as a checkpoint")
        meta = {"format": FORMAT_VERSION, "step": step, "seed": self.cfg.train.seed,
                "data_position": position.get("data_position", step),
                "skipped_steps": position.get("skipped_steps", 0), "rollbacks": position.get("rollbacks", 0),
                "tokenizer_sha256": self.tokenizer["sha256"], "config": to_yaml(self.cfg),
                "checksums": {"state" + p: s for p, s in summary.items()}}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta),
                                                        tokenizer=ocp.args.JsonSave(self.tokenizer)))
        self.blocked_s += time.perf_counter() - t0

    def wait(self) -> None:
        """Block until every started checkpoint is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# -- reading ----------------------------------------------------------------------------

def steps(run_dir: str) -> list[int]:
    """Steps of the committed checkpoints of a run, oldest first (unfinished writes are not listed).

    A plain directory listing, safe to call from one process of several (no Orbax manager,
    whose construction is collective).
    """
    directory = checkpoint_dir(run_dir)
    try:
        return sorted(ocp.path.step.checkpoint_steps(directory))
    except OSError as e:
        raise CheckpointError(f"checkpoint directory '{directory}' cannot be read ({e.strerror or e}); fix it, "
                              f"or choose another run.dir") from None


def _restore(directory: str, step: int, **items):
    with ocp.CheckpointManager(directory) as manager:
        return manager.restore(step, args=ocp.args.Composite(**items))


def restore(run_dir: str, step: int, target) -> tuple[object, dict]:
    """(train state, meta) of `step`, restored into the shardings of the abstract `target` and verified."""
    try:
        out = _restore(checkpoint_dir(run_dir), step, state=ocp.args.StandardRestore(target),
                       meta=ocp.args.JsonRestore())
        _verify(out.state, out.meta, "state")
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {step} of {run_dir}: {e}") from None
    except Exception as e:  # a structure or shape that does not fit, a damaged or missing file
        raise CheckpointError(f"checkpoint {step} of {run_dir}: {type(e).__name__}: {str(e)[:300]}") from None
    return out.state, out.meta


def restore_latest(run_dir: str, target, log=print, candidates: list[int] | None = None,
                   group=None) -> tuple[int, object, dict, list[int]]:
    """(step, state, meta, damaged steps) of the newest checkpoint that restores and verifies.

    `candidates`: the committed steps to try (default: `steps(run_dir)`); with several
    processes, process 0's list, so every process tries the same steps. `group` (a
    `distributed.Group`) makes the outcome of each attempt a joint one: a step that fails on
    any process is damaged for all. Each damaged newer checkpoint is reported through `log`;
    CheckpointError when none is usable.
    """
    damaged, reasons = [], []
    for step in reversed(steps(run_dir) if candidates is None else candidates):
        try:
            state, meta = restore(run_dir, step, target)
            error = ""
        except CheckpointError as e:
            state, meta, error = None, None, str(e)
        if group is not None:
            failed = [(i, e) for i, e in enumerate(group.gather(f"restore-{step}", error)) if e]
            error = "; ".join(f"process {i}: {e}" if group.count > 1 else e for i, e in failed)
        if not error:
            return step, state, meta, damaged
        log(f"warning: skipping damaged checkpoint {os.path.join(checkpoint_dir(run_dir), str(step))}: {error}")
        damaged.append(step)
        reasons.append(error)
    if damaged:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: all {len(damaged)} are damaged; "
                              "pass --restart to start over")
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}")


def quarantine(run_dir: str, step: int) -> str:
    """Move a damaged checkpoint out of the way (kept, never deleted) so the run can write that step again."""
    dest_dir = os.path.join(os.path.abspath(run_dir), "damaged_checkpoints")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(os.path.join(checkpoint_dir(run_dir), str(step)), dest)
    return dest


def read_meta(run_dir: str, step: int) -> dict:
    """The `meta` item of checkpoint `step` (its config, step, data position, checksums)."""
    try:
        return _restore(checkpoint_dir(run_dir), step, meta=ocp.args.JsonRestore()).meta
    except Exception as e:
        raise CheckpointError(f"checkpoint {step} of {run_dir} has no readable meta: "
                              f"{type(e).__name__}: {str(e)[:200]}") from None


def read_tokenizer(run_dir: str, step: int) -> bytes:
    """The tokenizer file (sentencepiece model or tokenizer.json) stored in checkpoint `step`, checked against
    its sha256 (the JSON key keeps its first name, sentencepiece_model_base64, for every kind)."""
    try:
        tok = _restore(checkpoint_dir(run_dir), step, tokenizer=ocp.args.JsonRestore()).tokenizer
        proto = base64.b64decode(tok["sentencepiece_model_base64"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {step} of {run_dir} holds no readable tokenizer: "
                              f"{type(e).__name__}: {str(e)[:200]}") from None
    if hashlib.sha256(proto).hexdigest() != tok["sha256"]:
        raise CheckpointError(f"the tokenizer in checkpoint {step} of {run_dir} fails its sha256 check")
    return proto


def resolve(path: str) -> tuple[str, int | None]:
    """(run directory, step or None for the newest usable) of `path`: a run dir or <run>/checkpoints/<step>."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(name)
    if os.path.isdir(checkpoint_dir(path)):
        return path, None
    raise CheckpointError(f"'{path}' is neither a run directory with checkpoints nor <run>/checkpoints/<step>")


def restore_params(run_dir: str, step: int | None, target_params, log=print) -> tuple[object, dict, int]:
    """(params, meta, step) of another run's checkpoint `step` (None: its newest usable one), read
    straight into `target_params`' shardings (see `resolve` for turning a path into these).

    Only the parameters are read (Orbax partial restore), never the optimizer state.
    """
    candidates = [step] if step is not None else list(reversed(steps(run_dir)))
    if not candidates:
        raise CheckpointError(f"run directory '{run_dir}' has no checkpoint to initialise from")
    item = {"params": target_params}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
    for s in candidates:
        try:
            out = _restore(checkpoint_dir(run_dir), s, meta=ocp.args.JsonRestore(),
                           state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
            _verify(out.state["params"], out.meta, "state.params")
            return out.state["params"], out.meta, s
        except Exception as e:
            msg = str(e)[:300]
            if len(candidates) == 1:
                raise CheckpointError(f"cannot initialise from checkpoint {s} of {run_dir}: {msg}") from None
            log(f"warning: skipping checkpoint {s} of {run_dir} for init_from: {msg}")
    raise CheckpointError(f"no usable checkpoint in {run_dir} to initialise from")
