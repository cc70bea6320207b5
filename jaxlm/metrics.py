"""Parameter and FLOP counts, MFU, and the metrics writers (metrics.jsonl + TensorBoard).

Parameter counts (`count_params`): `embedding` is the token and position tables (and value embeddings),
`non_embedding` everything else (an untied output head included), `head` the output
projection's V x D (when the head is tied it is the embedding table, not a second
array), and `matmul` = non_embedding + head when tied: every parameter that a token
passes through in a matrix product.

Training FLOPs per token (forward + backward), under three named conventions
(`flops_per_token_conventions`):

- `6N`: 6 x matmul parameters (Kaplan et al. 2020, with the head counted);
- `6N+attn` (jaxlm's, used for MFU and plots): 6N + 6 x L x T x D, attention's QK^T and
  AV (4 x T x D per token per layer forward, halved by the causal mask, x3 for backward);
- `palm`: 6N + 12 x L x H x Q x T (Chowdhery et al. 2022, appendix B: H heads of width Q,
  attention not halved for the causal mask).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from jaxlm import files
from jaxlm.config import ModelConfig, default_cache_root


def count_params(params, tied: bool | None = None) -> dict[str, int]:
    """total, embedding, non_embedding, head and matmul parameter counts of a params tree
    (arrays or ShapeDtypeStructs). `tied`: whether the head is the embedding table (default:
    when the tree has no separate head)."""
    total = embedding = head = 0
    vocab_by_width = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size, name = int(np.prod(leaf.shape)), jax.tree_util.keystr(path)
        total += size
        if "embed" in name:
            embedding += size
            if "'embed'" in name:  # the token table (not positions, not value embeddings)
                vocab_by_width = size
        elif name.startswith("['head']"):
            head += size
    tied = head == 0 if tied is None else tied
    head = vocab_by_width if tied else head
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "head": head,
            "matmul": total - embedding + (head if tied else 0)}


def model_param_counts(m: ModelConfig, vocab: int) -> dict[str, int]:
    """`count_params` of a model config's abstract parameter tree (nothing is allocated)."""
    import jax.numpy as jnp

    from jaxlm import kernels
    from jaxlm.model import Decoder

    model = Decoder(kernels.resolve(m, "cpu", 8), vocab)  # the kernels do not change the parameters
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return count_params(shapes, m.tied)


FLOP_CONVENTIONS = ("6N", "6N+attn", "palm")  # the keys of `flops_per_token_conventions`


def flops_per_token_conventions(m: ModelConfig, counts: dict[str, int], seq_len: int) -> dict[str, float]:
    """Training FLOPs per token under each named convention (see the module docstring)."""
    six_n = 6.0 * counts["matmul"]
    return dict(zip(FLOP_CONVENTIONS, (six_n, six_n + 6.0 * m.n_layers * seq_len * m.d_model,
                                       six_n + 12.0 * m.n_layers * m.n_heads * m.head_dim * seq_len)))


def flops_per_token(m: ModelConfig, counts: dict[str, int], seq_len: int) -> float:
    """jaxlm's convention, `6N+attn`: the FLOPs that MFU and plots count."""
    return flops_per_token_conventions(m, counts, seq_len)["6N+attn"]


# Dense peak TFLOP/s per device from vendor data sheets: the bfloat16 number, used whatever
# model.dtype is (the usual MFU convention for accelerators). CPUs are measured instead.
_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0, "tpu v4": 275.0,
                "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0}

_CPU_PEAK_FILE = "cpu_peak.json"  # under $JAXLM_CACHE_DIR or ~/.cache/jaxlm
_CPU_PEAK_VERSION = 1
_cpu_peak_memo: dict[tuple[str, str], tuple[float, str]] = {}  # (path, key) -> (per-device FLOP/s, source)


def peak_flops_info(device, override_tflops: float = 0.0, dtype: str = "float32") -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where that number comes from).

    In order: `override_tflops` (run.peak_tflops); the data-sheet table by device kind (dense
    bfloat16 whatever `dtype` is); on a CPU the matmul peak for `dtype` measured once per
    machine and cached (`cpu_peak_flops`); else None.
    """
    if override_tflops:
        return override_tflops * 1e12, f"run.peak_tflops={override_tflops:g}"
    kind = getattr(device, "device_kind", "").lower()
    for name, tflops in _PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12, f"data sheet: {name} dense bfloat16"
    if getattr(device, "platform", "") == "cpu":
        return cpu_peak_flops(device, dtype)
    return None, f"no data-sheet peak for device kind {kind!r}"


def mfu_note(mfu: float, peak: float, source: str) -> str | None:
    """A warning to log when `mfu` is above 100% (the `peak` it divides by, from `source` as
    `peak_flops_info` gives it, is lower than the run's FLOP rate); None otherwise."""
    if not mfu > 1.0:  # also None for NaN
        return None
    text = (f"mfu {mfu:.0%} is above 100%: the peak it is relative to, {peak / 1e12:.4g} TFLOP/s per device "
            f"({source}), is below what this run reaches")
    if "measured on this CPU" in source:
        text += ", likely because the CPU was busy with other work while it was measured"
        if ", cached at " in source:
            text += "; delete that file to measure it again,"
    return text + " or set run.peak_tflops (TFLOP/s per device) to override it"


def cpu_peak_cache_path() -> str:
    """<$JAXLM_CACHE_DIR or ~/.cache/jaxlm>/cpu_peak.json (the token cache's default root)."""
    return os.path.join(default_cache_root(), _CPU_PEAK_FILE)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_peak_key(dtype: str, n_devices: int) -> str:
    """What a cached CPU peak depends on: CPU model, usable CPUs, CPU devices, jax version,
    XLA_FLAGS and the dtype."""
    key = f"{_cpu_model()} | {usable_cpus()} cpus | {n_devices} devices | jax {jax.__version__} | {dtype}"
    flags = " ".join(os.environ.get("XLA_FLAGS", "").split())
    return key + (f" | XLA_FLAGS={flags}" if flags else "")


def _read_cpu_peaks(path: str) -> dict:
    """The cache file's entries; {} when it is missing, unreadable or not a version-1 cache."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == _CPU_PEAK_VERSION else None
    return entries if isinstance(entries, dict) else {}


def cpu_peak_flops(device, dtype: str = "float32") -> tuple[float, str]:
    """(per-device peak FLOP/s of this machine's CPU for `dtype` matmuls, its source).

    Measured once per machine with `measured_matmul_flops` (a few seconds) and cached in
    `cpu_peak_cache_path()` under `cpu_peak_key`; later runs, and later calls in this
    process, reuse the number. XLA's CPU devices of one process share one thread pool, so
    the whole-machine rate is divided by their number. A missing, corrupt or unwritable
    cache file only means measuring again. Delete the file to re-measure.
    """
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype).name
    n_devices = max(1, len(jax.local_devices(backend="cpu")))
    path, key = cpu_peak_cache_path(), cpu_peak_key(dtype, n_devices)
    if (path, key) in _cpu_peak_memo:
        return _cpu_peak_memo[(path, key)]
    entry = _read_cpu_peaks(path).get(key)
    flops = entry.get("machine_flops") if isinstance(entry, dict) else None
    if isinstance(flops, (int, float)) and not isinstance(flops, bool) and math.isfinite(flops) and flops > 0:
        source = f"{dtype} matmul peak measured on this CPU, cached at {path}"
    else:
        t0 = time.perf_counter()
        flops = float(measured_matmul_flops(device, dtype))
        entry = {"machine_flops": flops, "per_device_flops": flops / n_devices, "dtype": dtype,
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "measure_s": round(time.perf_counter() - t0, 2)}
        try:
            entries = _read_cpu_peaks(path)  # re-read: keep what other processes wrote meanwhile
            entries[key] = entry
            files.write_json(path, {"version": _CPU_PEAK_VERSION, "entries": entries}, sort_keys=True)
            source = f"{dtype} matmul peak measured on this CPU at start-up, cached at {path}"
        except OSError as e:
            source = f"{dtype} matmul peak measured on this CPU at start-up (not cached: {path}: {e.strerror or e})"
    result = (flops / n_devices, source)
    _cpu_peak_memo[(path, key)] = result
    return result


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            with open(path, encoding="ascii") as f:
                fields = f.read().split()
            if path.endswith("cpu.max"):  # cgroup v2: "<quota> <period>" or "max <period>"
                quota, period = fields[0], fields[1]
            else:  # cgroup v1: quota in one file (-1: none), period in another
                quota = fields[0]
                with open(path.replace("quota", "period"), encoding="ascii") as f:
                    period = f.read().split()[0]
            if quota not in ("max", "-1"):
                n = min(n, max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, IndexError):
            pass
    return max(1, n)


def measured_matmul_flops(device, dtype: str = "float32", sizes: tuple[int, ...] = (512, 1024, 2048),
                          seconds: float = 2.0) -> float:
    """Whole-machine matmul FLOP/s on a CPU `device` for `dtype`: its practical peak.

    CPUs have no data-sheet number that XLA can reach, so MFU on a CPU is relative to this.
    For each n in `sizes`, for seconds / len(sizes) (at least 3 rounds), rounds of
    back-to-back n x n products (at least 1 GFLOP a round; `dtype` operands accumulated in
    float32 as jaxlm.dots does) are timed on the wall clock and in this process's CPU time.
    A size's rate is the larger of the best round's wall-clock rate (throughput actually
    reached) and the median round's FLOPs x `usable_cpus()` / CPU seconds (the rate had
    XLA's threads had every usable CPU to themselves: other programs on the machine stretch
    a round's wall time, much less its CPU time); the peak is the best size's. The earlier
    form, the best single 1024^3 float32 product in 0.3 s of wall time, varied 2x between
    runs on a shared machine. The CPU-time rate assumes XLA spreads these products over
    every usable CPU (else it overstates the peak and MFU reads low); other busy threads of
    this process make it understate the peak.
    """
    import jax.numpy as jnp

    cpus = usable_cpus()
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    best = 0.0
    for n in sizes:
        a = jax.device_put(jnp.ones((n, n), dtype), device)
        reps = max(1, math.ceil(1e9 / (2.0 * n**3)))
        flops = reps * 2.0 * n**3
        jax.block_until_ready([matmul(a, a) for _ in range(2)])  # compile and warm up
        wall, cpu, t_end = [], [], time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < t_end or len(wall) < 3:
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready([matmul(a, a) for _ in range(reps)])
            wall.append(flops / max(time.perf_counter() - t0, 1e-9))
            cpu.append(flops * cpus / max(time.process_time() - c0, 1e-6))
        best = max(best, max(wall), float(np.median(cpu)))
    return best


class MetricsWriter:
    """Appends records to metrics.jsonl (losses as full-precision reprs) and TensorBoard.

    Only the process that owns the run directory writes (`owner`); elsewhere every method
    does nothing.
    """

    def __init__(self, run_dir: str, tensorboard: bool = True, owner: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.owner = owner
        self._file = open(self.path, "a", encoding="utf-8") if owner else None
        self._tb = None
        if tensorboard and owner:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, record: dict) -> None:
        if not self.owner:
            return
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
        if not self.owner:
            return
        self._file.close()
        truncate_metrics(os.path.dirname(self.path), start)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if isinstance(v, (np.floating, np.ndarray)) or hasattr(v, "dtype"):
        v = np.asarray(v).item()
    return v


def read_metrics(run_dir: str) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short (the process was killed mid-write) is dropped."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 or line.endswith("\n"):
                raise
    return out


def truncate_metrics(run_dir: str, start: int) -> None:
    """Rewrite metrics.jsonl without the records of steps at or after `start`."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", -1) < start]
    with files.atomic_open(path) as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")


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
