"""Parameter and FLOP counts, MFU, and the metrics writers (metrics.jsonl + TensorBoard).

FLOPs per token (training, forward + backward) = 6 * N_matmul + 6 * L * T * D, where
N_matmul counts every parameter used in a matrix multiply (all non-embedding parameters
plus the output head, i.e. the tied embedding counted once as the head), and the second
term is attention's QK^T and AV (4*T*D per token per layer forward, halved for the causal
mask, times 3 for forward + backward).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import numpy as np

from jaxlm.config import ModelConfig


def count_params(params) -> dict[str, int]:
    """total, embedding (token + position tables) and non_embedding parameter counts."""
    total = embedding = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = int(np.prod(leaf.shape))
        total += size
        if "embed" in jax.tree_util.keystr(path):
            embedding += size
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(m: ModelConfig, counts: dict[str, int], vocab: int, seq_len: int) -> float:
    head = vocab * m.d_model  # the output projection, tied or not
    matmul = counts["non_embedding"] + (head if m.tied else 0)
    return 6.0 * matmul + 6.0 * m.n_layers * seq_len * m.d_model


# Dense peak TFLOP/s per device (bfloat16 for accelerators) from vendor data sheets.
_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0, "tpu v4": 275.0,
                "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0}


def peak_flops(device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override, the data-sheet table, or on a CPU a measurement."""
    if override_tflops:
        return override_tflops * 1e12
    kind = getattr(device, "device_kind", "").lower()
    for name, tflops in _PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    if device.platform == "cpu":
        return measured_matmul_flops(device)
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device, n: int = 1024, seconds: float = 0.3) -> float:
    """Best float32 matmul FLOP/s seen on `device` in ~`seconds`: a CPU's practical peak.

    CPUs have no data-sheet number that XLA can reach, so MFU on a CPU is relative to this.
    """
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


class MetricsWriter:
    """Appends records to metrics.jsonl (losses as full-precision reprs) and TensorBoard."""

    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, record: dict) -> None:
        clean = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(clean["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def truncate(self, start: int) -> None:
        """Drop the records of steps at or after `start` (a resume or rollback replays them)."""
        self._file.close()
        truncate_metrics(os.path.dirname(self.path), start)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if isinstance(v, (np.floating, np.ndarray)) or hasattr(v, "dtype"):
        v = np.asarray(v).item()
    return v


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, start: int) -> None:
    """Rewrite metrics.jsonl without the records of steps at or after `start`."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", -1) < start]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class Throughput:
    """Tokens/s between two host-side fetches of step metrics."""

    def __init__(self):
        self.t, self.step = time.perf_counter(), None

    def update(self, step: int, tokens_per_step: int) -> float:
        now = time.perf_counter()
        rate = 0.0
        if self.step is not None and step > self.step:
            rate = (step - self.step) * tokens_per_step / (now - self.t)
        self.t, self.step = now, step
        return rate
