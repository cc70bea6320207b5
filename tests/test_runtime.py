"""Process settings applied by `import jaxlm` (jaxlm/runtime.py)."""

import os
import subprocess
import sys

import pytest

from jaxlm import runtime


def test_xla_flags_added_for_known_jaxlib_and_user_value_kept():
    assert runtime.xla_flags("", "0.10.2") == "--xla_cpu_experimental_ynn_fusion_type=+eltwise"
    assert runtime.xla_flags("--a=1", "0.9.0") == "--a=1"  # unknown to that jaxlib: XLA would abort
    user = "--xla_cpu_experimental_ynn_fusion_type=-eltwise --b"
    assert runtime.xla_flags(user, "0.10.2") == user


def test_malloc_left_alone_when_user_configured_it_or_not_on_cpu():
    cpu = {"JAX_PLATFORMS": "cpu"}
    on_glibc = runtime.malloc_tuned(cpu)
    assert on_glibc == (sys.platform.startswith("linux") and runtime.platform.libc_ver()[0] == "glibc")
    for env in ({"JAXLM_MALLOC": "0"}, {"MALLOC_ARENA_MAX": "4"}, {"LD_PRELOAD": "libjemalloc.so"},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {"JAX_PLATFORMS": "cuda,cpu"},
                {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, {"JAX_NUM_CPU_DEVICES": "2"}):
        assert not runtime.malloc_tuned({**cpu, **env}), env


def test_an_installed_tpu_or_gpu_plugin_without_its_device_leaves_malloc_tuned(tmp_path, monkeypatch):
    """libtpu is installed on CPU machines for `jaxlm compile`: only a TPU's device node means JAX will not
    run on the CPU (likewise a GPU plugin and an NVIDIA device node)."""
    import importlib.metadata
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else real(name))
    assert not runtime._accelerator_present(str(tmp_path))
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "0").touch()  # a v5e chip
    assert runtime._accelerator_present(str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "libtpu" else real(name))
    assert not runtime._accelerator_present(str(tmp_path))  # the device without libtpu: JAX cannot use it
    (tmp_path / "nvidia0").touch()
    assert not runtime._accelerator_present(str(tmp_path)) or importlib.metadata.entry_points(group="jax_plugins")
    real_points = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: ["cuda"] if kw.get("group") == "jax_plugins" else real_points(**kw))
    assert runtime._accelerator_present(str(tmp_path))  # a CUDA plugin and a GPU
    (tmp_path / "nvidia0").unlink()
    assert not runtime._accelerator_present(str(tmp_path))  # the plugin alone


# A jitted gradient whose scratch buffer (75 MB) is far above the sizes glibc serves from
# its heap by default; prints the median page faults of one call.
_FAULTS = """
import resource
import jaxlm
import jax, jax.numpy as jnp
f = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T))))
x, w = jnp.ones((8192, 256)) / 256, jnp.ones((256, 2048)) / 256
assert f.lower(w, x).compile().memory_analysis().temp_size_in_bytes > 64 * 2**20
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(w, x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[1:])[7])
"""


def _median_faults(**env) -> int:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "JAXLM_MALLOC"))}
    base["XLA_FLAGS"] = ""  # one CPU device (the tests' eight would turn the tuning off)
    out = subprocess.run([sys.executable, "-c", _FAULTS], env={**base, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not runtime.malloc_tuned({"JAX_PLATFORMS": "cpu"}), reason="malloc tuning is glibc-only")
def test_malloc_tuning_reuses_scratch_between_calls():
    """Untuned, every call maps its scratch buffer afresh and page-faults it in; tuned, the
    freed buffer of the previous call is reused (the heap still grows now and then, until it
    holds the most that is alive at once, hence the median)."""
    untuned = _median_faults(JAXLM_MALLOC="0")
    tuned = _median_faults()
    assert untuned >= 64 * 2**20 // 4096, untuned  # at least 64 MB in 4 KiB pages
    assert tuned < untuned / 10, (tuned, untuned)


def test_import_after_backend_start_warns():
    code = "import warnings, jax.numpy as jnp; jnp.ones(2).block_until_ready()\n" \
           "with warnings.catch_warnings(record=True) as w:\n" \
           "    warnings.simplefilter('always'); import jaxlm\n" \
           "print(sum('after JAX started its backend' in str(x.message) for x in w))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "1", out.stdout + out.stderr
