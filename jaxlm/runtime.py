"""XLA settings jaxlm applies to itself when it is imported.

XLA reads XLA_FLAGS once, when the first backend starts, so `import jaxlm` adds its flags
to the environment before that; a flag the user already set in XLA_FLAGS is left as it
is, and JAXLM_XLA_FLAGS=0 turns the whole mechanism off. XLA aborts on a flag it does not
know, so each flag is tied to the jaxlib versions it was measured on.

Applied (see the README's Performance section for the measurements):
- CPU: --xla_cpu_experimental_ynn_fusion_type=+eltwise. Elementwise fusions run on the
  YNNPACK library, as matrix products already do; about 10% off the bench model's train
  step on a 2-core AVX-512 CPU.
"""

from __future__ import annotations

import os

# flag -> (value, jaxlib version prefixes it is known to exist in)
FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": ("+eltwise", ("0.10.",)),
}


def xla_flags(current: str, jaxlib_version: str) -> str:
    """`current` XLA_FLAGS with jaxlm's flags added where this jaxlib knows them and the
    user has not set them."""
    out = current.split()
    for flag, (value, versions) in FLAGS.items():
        if jaxlib_version.startswith(versions) and not any(f.split("=")[0] == flag for f in out):
            out.append(f"{flag}={value}")
    return " ".join(out)


def apply() -> None:
    if os.environ.get("JAXLM_XLA_FLAGS", "1") == "0":
        return
    try:
        from jaxlib.version import __version__ as jaxlib_version
    except ImportError:  # no jaxlib: nothing to configure
        return
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), jaxlib_version)
