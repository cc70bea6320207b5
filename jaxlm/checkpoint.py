"""Orbax checkpoints of a run: the train state plus a JSON record of where the run stands.

`Saver` writes asynchronously through an Orbax CheckpointManager into
`<run_dir>/checkpoints/<step>/`; the tokenizer and resolved config already sit in the run
directory, so the directory alone is enough to evaluate or export.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jaxlm.config import Config


class Saver:
    def __init__(self, run_dir: str, cfg: Config):
        self.cfg = cfg
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, enable_async_checkpointing=True,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, stepper) -> None:
        if self.manager.latest_step() == step:
            return
        if stepper.backend == "pmap":  # one copy of the replicated state
            state = jax.tree.map(lambda x: x[0], state)
        meta = {"step": step, "seed": self.cfg.train.seed, "data_position": step}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
