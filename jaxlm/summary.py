"""`run_summary.json`: what a run is and where it stands, in one small file that sweeps read.

It is written when training starts, rewritten after every validation pass and at the end
(temporary file + rename, so a reader never sees half a file), and holds:

- `params`: total, non_embedding, embedding, head and matmul counts (`metrics.count_params`);
- `flops_per_token`: training FLOPs per token under each named convention, and
  `training_flops`: those times the tokens seen (`metrics.flops_per_token_conventions`);
- `epochs` (with `data.sampling=epochs`): epochs of each training source trained through;
- `tokens`, `steps`, `target_steps`, `wall_s` (from the start of `run`, summed over resumed
  sessions), `compile_s`;
- `last_eval` and `best_eval` (lowest loss): step, loss and bits per byte with their 95%
  intervals; `last_train_loss`;
- `status`: running, done, diverged or stopped (by a signal); `config_sha256` of the
  resolved config.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from jaxlm import files
from jaxlm.config import Config, to_yaml

STATUSES = ("running", "done", "diverged", "stopped")
FILENAME = "run_summary.json"
_EVAL_KEYS = ("loss", "loss_ci95", "bpb", "bpb_ci95", "ppl", "tokens")


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(to_yaml(cfg).encode("utf-8")).hexdigest()


def read(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, FILENAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def eval_entry(record: dict) -> dict:
    """The summary's view of a metrics.jsonl evaluation record (keys without the `eval_` prefix)."""
    out = {"step": record["step"]}
    out.update({k: record[f"eval_{k}"] for k in _EVAL_KEYS if f"eval_{k}" in record})
    return out


class RunSummary:
    """The summary of one run; `write()` puts it in the run directory (process 0 only)."""

    def __init__(self, run_dir: str, cfg: Config, counts: dict[str, int], flops: dict[str, float],
                 compile_s: float, history: list[dict] = (), started: float | None = None):
        """`history`: the metrics records kept from earlier sessions of a resumed run; `started`: the
        `time.perf_counter()` at which this session started (default: now)."""
        self.path = os.path.join(run_dir, FILENAME)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        previous = read(run_dir) if history else None
        self._wall_before = float(previous.get("wall_s", 0.0)) if previous else 0.0
        self._t0 = time.perf_counter() if started is None else started
        self.data = {"name": cfg.run.name, "status": "running", "config_sha256": config_hash(cfg),
                     "params": dict(counts), "flops_per_token": dict(flops), "training_flops": {},
                     "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size, "tokens": 0, "steps": 0,
                     "target_steps": cfg.train.steps, "wall_s": self._wall_before, "compile_s": compile_s,
                     "last_train_loss": None, "last_eval": None, "best_eval": None}
        self.rewind(history)

    def rewind(self, history: list[dict]) -> None:
        """Forget every record, then take in `history` (after a rollback truncated the metrics)."""
        self.data.update(last_train_loss=None, last_eval=None, best_eval=None)
        self.progress(0)
        for r in history:
            self.record(r)

    def record(self, rec: dict) -> None:
        """Take in one metrics record (train or evaluation)."""
        if "loss" in rec:
            self.data["last_train_loss"] = rec["loss"]
            self.progress(rec["step"] + 1)
            if "epochs" in rec:
                self.data["epochs"] = rec["epochs"]
        if "eval_loss" in rec:
            entry = eval_entry(rec)
            self.data["last_eval"] = entry
            best = self.data["best_eval"]
            if best is None or entry["loss"] < best["loss"]:
                self.data["best_eval"] = entry
            self.progress(rec["step"] + 1)

    def progress(self, steps: int) -> None:
        tokens = steps * self.tokens_per_step
        self.data.update(steps=steps, tokens=tokens,
                         training_flops={k: v * tokens for k, v in self.data["flops_per_token"].items()})

    def write(self, status: str | None = None) -> dict:
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"run status {status!r} is not one of {STATUSES}")
            self.data["status"] = status
        self.data["wall_s"] = self._wall_before + time.perf_counter() - self._t0
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        files.write_json(self.path, self.data)
        return self.data
