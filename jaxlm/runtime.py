"""Process settings jaxlm applies to itself when it is imported.

Both must happen before the first XLA backend starts (XLA reads XLA_FLAGS once, and its
worker threads pick their malloc arena when they first allocate), so `import jaxlm`
applies them. Each is measured in docs/cpu-kernels.md.

XLA flags (JAXLM_XLA_FLAGS=0 turns them off; a flag the user already set in XLA_FLAGS is
left as it is). XLA aborts on a flag it does not know, so each flag is tied to the jaxlib
versions it was measured on.
- CPU: --xla_cpu_experimental_ynn_fusion_type=+eltwise. Elementwise fusions run on the
  YNNPACK library, as matrix products already do; about 10% off the bench model's train
  step on a 2-core AVX-512 CPU.

malloc (glibc, CPU backend with one CPU device only: JAX_PLATFORMS starts with cpu, or no
GPU or TPU is present (`_accelerator_present`), and no forced host device count above 1, where several
executions and their threads would contend for the one arena; JAXLM_MALLOC=0 turns it off, and any MALLOC_* or glibc.malloc setting of the
user's own, or an LD_PRELOAD allocator, leaves it off). The CPU runtime allocates each
execution's scratch buffer (hundreds of MB for a train step) with posix_memalign and
frees it at the end. From a worker thread's arena glibc serves a block that large with a
fresh mmap, so every step page-faults its whole scratch buffer in again (65k faults and
about 0.1 s of a 0.5 s step at the quickstart size). jaxlm makes all threads share the main arena, serves large
blocks from the heap rather than mmap, and never trims the heap, so the buffer of the
previous step is reused. The cost: memory freed by the process stays mapped, at its peak.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import warnings

# flag -> (value, jaxlib version prefixes it is known to exist in)
FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": ("+eltwise", ("0.10.",)),
}

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOPT = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim
_USER_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TOP_PAD_", "LD_PRELOAD")


def xla_flags(current: str, jaxlib_version: str) -> str:
    """`current` XLA_FLAGS with jaxlm's flags added where this jaxlib knows them and the
    user has not set them."""
    out = current.split()
    for flag, (value, versions) in FLAGS.items():
        if jaxlib_version.startswith(versions) and not any(f.split("=")[0] == flag for f in out):
            out.append(f"{flag}={value}")
    return " ".join(out)


def _accelerator_present(dev: str = "/dev") -> bool:
    """JAX would pick an accelerator over the CPU: a jaxlib GPU plugin with an NVIDIA device node, or libtpu
    with a TPU's (/dev/accel* on v2-v4, /dev/vfio/<n> on v5 and later). A plugin alone does not count:
    libtpu is installed on CPU machines too, for `jaxlm compile` (the `tpu` extra), and JAX then runs on the
    CPU. Counting it turned the malloc settings off there: the quickstart spent 190 of its 640 s in the
    kernel, page-faulting each step's scratch buffer in again (2-core Intel Xeon, one core)."""
    import glob
    import importlib.metadata
    import importlib.util

    gpu = bool(importlib.metadata.entry_points(group="jax_plugins")) and bool(glob.glob(f"{dev}/nvidia[0-9]*"))
    tpu = importlib.util.find_spec("libtpu") is not None and bool(glob.glob(f"{dev}/accel[0-9]*")
                                                                  or glob.glob(f"{dev}/vfio/[0-9]*"))
    return gpu or tpu


def _host_devices(environ) -> int:
    """CPU devices this process will have (XLA_FLAGS' forced count or JAX_NUM_CPU_DEVICES)."""
    n = 1
    for f in environ.get("XLA_FLAGS", "").split():
        if f.startswith("--xla_force_host_platform_device_count="):
            n = int(f.split("=", 1)[1] or 1)
    return max(n, int(environ.get("JAX_NUM_CPU_DEVICES", "") or 1))


def malloc_tuned(environ) -> bool:
    """Whether jaxlm should set glibc's malloc parameters in a process with this environment:
    glibc, the CPU backend, and no malloc setting of the user's own."""
    if environ.get("JAXLM_MALLOC", "1") == "0" or any(environ.get(k) for k in _USER_MALLOC_ENV):
        return False
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", "") or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    if _host_devices(environ) > 1:  # several executions at once would contend for the one arena
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_present()


def tune_malloc() -> bool:
    """Apply MALLOPT to this process; True when glibc accepted all of it."""
    if not malloc_tuned(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in MALLOPT)


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False


def apply() -> None:
    if _backend_started():
        warnings.warn("jaxlm was imported after JAX started its backend, so its XLA flags and malloc "
                      "settings do not apply to this process (see docs/cpu-kernels.md): "
                      "import jaxlm before running any JAX computation", RuntimeWarning, stacklevel=3)
        return
    tune_malloc()
    if os.environ.get("JAXLM_XLA_FLAGS", "1") == "0":
        return
    try:
        from jaxlib.version import __version__ as jaxlib_version
    except ImportError:  # no jaxlib: nothing to configure
        return
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), jaxlib_version)
