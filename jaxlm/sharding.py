"""Device mesh, the logical -> mesh axis rules, and the shardings of state and batches.

This is the only module that knows mesh axis names. Model code speaks logical names
("embed", "mlp", "batch", ...) and the table below decides where each one lives.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import Config
from jaxlm.config_checks import resolve_mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (None = replicated). Parameters are sharded over `fsdp` along
# their model-width dimension and over `tensor` along heads / MLP / vocabulary;
# activations are sharded over the batch on (data, fsdp) and follow `tensor` inside blocks.
AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("length", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(cfg: Config, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):  # CPU or odd topologies
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh and logical rules in scope, so `nn.with_logical_constraint` resolves while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(AXIS_RULES):
        yield


def logical_to_sharding(logical_specs, mesh: Mesh):
    return nn.logical_to_mesh_sharding(logical_specs, mesh, AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a global batch of `global_rows` that this process's devices hold, in the mesh's
    real device order (`make_array_from_process_local_data` takes exactly these)."""
    index = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    spans = sorted({(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop) for i in index.values()})
    lo, hi = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo:
        raise ValueError(f"this process's devices hold rows {spans} of the batch, not one contiguous block; "
                         "order the mesh's devices by process")
    return slice(lo, hi)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """Place this process's rows of a batch as global arrays with the batch sharding."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local_batch.items():
        global_shape = (global_rows,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out
