"""Weights & Biases as an optional metrics sink, beside metrics.jsonl and TensorBoard.

Only process 0 logs (`make_sink` returns None elsewhere and when `run.wandb` is false). The run's
W&B id is kept in <run_dir>/wandb_id.txt, so a resumed training run continues the same W&B run.
wandb is imported lazily: it is an optional dependency (`pip install 'jaxlm[wandb]'`).

Steps: a record is logged at W&B step = record["step"] (our 0-based index of the step just done),
so W&B's x-axis matches metrics.jsonl and TensorBoard, and the training and evaluation records of
one step share one W&B row. W&B history is append-only with non-decreasing steps, and after a
rollback or a resume our steps go back (metrics.jsonl is truncated and the steps replayed). W&B
cannot rewrite those rows, so records whose step is below the highest step already logged (or, for
a resumed online run, below the step W&B says comes next) are not sent: W&B would drop them anyway,
with a warning per record. W&B then keeps the values first logged for the replayed steps, while
metrics.jsonl holds the replayed ones; `WandbSink.skipped` counts the records not sent. (The
alternative, letting W&B number rows itself and logging our step as a field, keeps every record
but gives one x value several rows, splits training and evaluation into separate rows and needs
a custom x-axis in every chart.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import string
from typing import Any

from jaxlm import files
from jaxlm.config import Config
from jaxlm.errors import ConfigError

ID_FILE = "wandb_id.txt"


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"run.wandb=true needs the wandb package ({e}); install it with "
                          f"pip install 'jaxlm[wandb]', or set run.wandb=false") from None
    return wandb


def _scalar(v: Any) -> Any:
    """numpy / jax scalars and 0-d arrays as Python scalars; anything else unchanged."""
    if hasattr(v, "dtype") and getattr(v, "shape", None) == ():
        return v.item()
    return v


def _number(v: Any) -> float | int | None:
    """A finite int or float (not a bool), else None."""
    v = _scalar(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def run_id(run_dir: str, resume: bool) -> str:
    """The W&B run id of `run_dir`: the stored one when resuming, else a new one (stored)."""
    path = os.path.join(run_dir, ID_FILE)
    if resume and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = f.read().strip()
        if stored:
            return stored
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    files.write_text(path, new + "\n")
    return new


class WandbSink:
    """One W&B run for one training run: the config at init, scalars per record, a run summary.

    `resume`: the training run resumes in `run_dir`; the W&B run stored there is continued
    (resume="allow"). Otherwise a new W&B run with a new id is started (and its id stored).
    """

    def __init__(self, run_dir: str, cfg: Config, resume: bool):
        wandb = _import_wandb()
        self.id = run_id(run_dir, resume)
        self.skipped = 0  # records not sent: their step was below one already logged
        self._run = wandb.init(
            project=cfg.run.wandb_project, entity=cfg.run.wandb_entity or None, name=cfg.run.name,
            dir=run_dir, config=dataclasses.asdict(cfg), mode=cfg.run.wandb_mode or None,
            id=self.id, resume="allow")
        # The lowest step W&B accepts: 0 for a new run, the one after its last row for a resumed
        # one, then the step last logged (more fields may join its row).
        self._min_step = int(getattr(self._run, "starting_step", 0) or 0)

    @property
    def run(self):
        """The wandb Run (None after close)."""
        return self._run

    def log(self, record: dict) -> None:
        """Log the finite int/float fields of a metrics record at W&B step record["step"].

        Other fields (strings, lists, NaN, inf, bools) are left out, and so is "step" itself.
        A record whose step is below the highest one logged is not sent (see the module docstring).
        """
        if self._run is None:
            return
        step = int(_scalar(record["step"]))
        if step < self._min_step:
            self.skipped += 1
            return
        data = {}
        for k, v in record.items():
            n = _number(v)
            if k != "step" and n is not None:
                data[k] = n
        if not data:
            return
        self._run.log(data, step=step)
        self._min_step = step

    def summary(self, summary: dict) -> None:
        """Write a run-summary dict into the W&B run summary: nested dicts flattened with '/'.

        Finite numbers, bools and strings are written; other values (None, NaN, lists) are left out.
        """
        if self._run is None:
            return
        flat = {}
        for k, v in _flatten(summary).items():
            v = _scalar(v)
            if isinstance(v, (bool, str)) or _number(v) is not None:
                flat[k] = v
        if flat:
            self._run.summary.update(flat)

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (uploads the rest when online); a second call does nothing."""
        run, self._run = self._run, None
        if run is not None:
            run.finish(exit_code=exit_code)


def make_sink(run_dir: str, cfg: Config, resume: bool) -> WandbSink | None:
    """A WandbSink on process 0 when run.wandb is true, else None."""
    if not cfg.run.wandb:
        return None
    import jax

    if jax.process_index() != 0:
        return None
    return WandbSink(run_dir, cfg, resume)
