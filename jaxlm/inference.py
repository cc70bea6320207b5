"""Opening a run's checkpoints for inference: evaluation, generation and export.

`open_checkpoints(path)` resolves a run directory or one checkpoint, reads the config
and tokenizer stored in the checkpoint itself (so a checkpoint copied elsewhere still
opens), puts the model on a mesh of this machine's devices, and returns the abstract
parameters to restore into. `restore` then reads one checkpoint's parameters.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxlm import checkpoint as ckpt
from jaxlm import sharding
from jaxlm.config import Config, load_config
from jaxlm.config_checks import check_vocab
from jaxlm.data.tokenizer import Tokenizer, tokenizer_from_bytes
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.step import Stepper, build


def eval_config(stored_yaml: str, overrides: list[str]) -> Config:
    """The checkpoint's config on this machine's devices: mesh reset, then the user's overrides."""
    user = dict(o.split("=", 1) for o in overrides if "=" in o)
    stored = load_config(text=stored_yaml)
    batch = user.get("eval.batch_size") or stored.eval.batch_size or stored.train.batch_size
    base = ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.backend=jit", "train.grad_accum=1",
            f"train.batch_size={batch}", f"eval.batch_size={batch}"]
    return load_config(text=stored_yaml, overrides=base + list(overrides))


@dataclasses.dataclass
class Opened:
    """A run's checkpoints, ready to restore onto this machine's mesh."""

    run_dir: str
    steps: list[int]  # the checkpoints asked for
    cfg: Config
    tokenizer: Tokenizer
    mesh: object
    model: object
    target: object  # abstract params in the mesh's shardings
    stepper: Stepper  # its eval_step scores batches on the mesh


def open_checkpoints(path: str, overrides: list[str] | tuple[str, ...] = (), devices=None,
                     all_checkpoints: bool = False) -> Opened:
    """Resolve `path` (a run directory: its newest checkpoint, or all of them; or
    <run>/checkpoints/<step>), read the config and tokenizer stored in the checkpoint, and
    build the model and the restore target on a mesh of `devices` (see `eval_config`)."""
    run_dir, step = ckpt.resolve(path)
    available = ckpt.steps(run_dir)
    if not available:
        raise CheckpointError(f"{ckpt.checkpoint_dir(run_dir)} holds no committed checkpoint")
    if step is not None and step not in available:
        raise CheckpointError(f"{path}: no committed checkpoint {step}; the run has {available}")
    if all_checkpoints and step is not None:
        raise ConfigError("--all-checkpoints takes a run directory, not one checkpoint")
    todo = available if all_checkpoints else [step if step is not None else available[-1]]
    cfg = eval_config(ckpt.read_meta(run_dir, todo[-1])["config"], list(overrides))
    tok = tokenizer_from_bytes(ckpt.read_tokenizer(run_dir, todo[-1]), cfg.data.eos_token, f"checkpoint {todo[-1]}",
                               cfg.data.bos_token)
    mesh = sharding.make_mesh(cfg, list(jax.devices() if devices is None else devices))
    model, tx, schedule = build(cfg, check_vocab(cfg, tok.vocab_size, mesh.shape["tensor"]), mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    return Opened(run_dir, todo, cfg, tok, mesh, model, stepper.abstract_state().params, stepper)
