"""Fault injection for tests: training steps whose gradients come out NaN at chosen data positions.

Nothing here is used by a normal run. `run(cfg, inject_nan={...})` marks the batches at
those data positions (a `poison` row of ones in the batch) and wraps the pure train step
with `nan_step`, so the numerics guard, the skip counter and rollback can be tested on a
real run while `step.train_step` itself carries no test hook.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def nan_step(train_step):
    """`train_step` that, for a batch with any `poison` mark, runs on NaN parameters (so its loss and
    gradients are NaN and the step's guard skips the update) and hands back the state's own parameters.

    Unmarked batches run on the parameters multiplied by 1.0, which leaves every value as it was.
    """

    @functools.wraps(train_step)
    def step(state, batch):
        batch = dict(batch)
        bad = jnp.any(batch.pop("poison") > 0)
        scale = jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(1.0))
        noisy = jax.tree.map(lambda p: p * scale.astype(p.dtype), state.params)
        new, metrics = train_step(state.replace(params=noisy), batch)
        params = jax.tree.map(lambda n, old: jnp.where(bad, old, n), new.params, state.params)
        return new.replace(params=params), metrics

    return step


def mark(batch: dict[str, np.ndarray], position: int, positions: frozenset[int]) -> dict[str, np.ndarray]:
    """`batch` with its `poison` row: ones when `position` is one of `positions`."""
    batch["poison"] = np.full(batch["inputs"].shape, int(position in positions), np.int32)
    return batch
