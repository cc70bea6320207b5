"""nn.scan keeps compile time flat in depth: gpt2-124m compiles within 1.5x of its 2-layer version."""

import time

import jax
import pytest

from jaxlm.config import load_config
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build


def compile_seconds(n_layers: int) -> float:
    cfg = load_config(None, ["model.preset=gpt2-124m", f"model.n_layers={n_layers}", "train.batch_size=8",
                             "train.seq_len=128", "mesh.data=1"])
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, 50304)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state = stepper.abstract_state()
    t0 = time.perf_counter()
    stepper.compile(state, {"inputs": (8, 128), "targets": (8, 128)})
    return time.perf_counter() - t0


@pytest.mark.slow
def test_gpt2_124m_compiles_within_1_5x_of_two_layers():
    compile_seconds(2)  # warm up tracing caches shared by both
    two = min(compile_seconds(2) for _ in range(2))
    twelve = min(compile_seconds(12) for _ in range(2))
    print(f"compile: 2 layers {two:.2f}s, 12 layers {twelve:.2f}s, ratio {twelve / two:.2f}")
    assert twelve <= 1.5 * two, (two, twelve)
