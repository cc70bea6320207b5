"""Orbax checkpoints of a run: the train state plus a JSON record of where the run stands.

`Saver` writes asynchronously through an Orbax CheckpointManager into
`<run_dir>/checkpoints/<step>/`: the train state (params, optimizer state, step) and a
`meta` record (step, seed, data position, tokenizer sha256, the resolved config). The
tokenizer and config also sit in the run directory, so the directory alone is enough to
resume, evaluate or export. The data position is the step: batches are a pure function
of (seed, step), so nothing else about the loader needs saving.

`restore` reads a step straight into the shardings of the abstract state it is given, so
a run saved on one mesh resumes on any other without passing through one device.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jaxlm.config import Config, to_yaml
from jaxlm.errors import CheckpointError


def checkpoint_dir(run_dir: str) -> str:
    return os.path.abspath(os.path.join(run_dir, "checkpoints"))


class Saver:
    def __init__(self, run_dir: str, cfg: Config, tokenizer_sha256: str = ""):
        self.cfg, self.tokenizer_sha256 = cfg, tokenizer_sha256
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, enable_async_checkpointing=True,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, stepper) -> None:
        if self.manager.latest_step() == step:
            return
        if stepper.backend == "pmap":  # one copy of the replicated state
            state = jax.tree.map(lambda x: x[0], state)
        meta = {"step": step, "seed": self.cfg.train.seed, "data_position": step,
                "tokenizer_sha256": self.tokenizer_sha256, "config": to_yaml(self.cfg)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def steps(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first (unfinished writes are not listed)."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return []
    with ocp.CheckpointManager(directory) as manager:
        return sorted(manager.all_steps())


def restore(run_dir: str, step: int, target) -> tuple[object, dict]:
    """(train state, meta) of `step`, restored into the shardings of the abstract `target`."""
    with ocp.CheckpointManager(checkpoint_dir(run_dir)) as manager:
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                meta=ocp.args.JsonRestore()))
        except Exception as e:  # a structure or shape that does not fit, a damaged file
            raise CheckpointError(f"cannot restore checkpoint {step} of {run_dir}: {type(e).__name__}: "
                                  f"{str(e)[:500]}") from None
    return out.state, out.meta
