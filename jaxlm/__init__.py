"""jaxlm: decoder-only language model pretraining in JAX/Flax."""

from jaxlm import runtime as _runtime

_runtime.apply()  # before any XLA backend starts (see runtime.py)
