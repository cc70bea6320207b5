"""jaxlm's memory plan (jaxlm/memory.py) moves with the settings that change a step's memory; its
agreement with the TPU compiler is tests/test_aot.py's."""

import dataclasses

from jaxlm import kernels
from jaxlm.config import load_config
from jaxlm.memory import plan
from jaxlm.metrics import model_param_counts

BASE = ["model.preset=gpt2-124m", "train.batch_size=16", "train.seq_len=1024", "model.kernels=standard"]
MESH = {"data": 4, "fsdp": 1, "tensor": 1}


def _plan(*overrides, mesh=MESH, chunk=0, attention="pallas"):
    cfg = load_config(None, BASE + list(overrides))
    m = dataclasses.replace(kernels.resolve(cfg.model, "cpu", cfg.train.seq_len), attention=attention)
    params = model_param_counts(cfg.model, cfg.model.vocab_size)["total"]
    return plan(cfg, m, params, cfg.model.vocab_size, mesh, chunk), params


def test_state_and_gradients_are_float32_params_adam_and_grads_sharded_over_fsdp_and_tensor():
    p, params = _plan()
    assert p.state == 12 * params and p.gradients == 4 * params
    q, _ = _plan(mesh={"data": 1, "fsdp": 4, "tensor": 1})
    assert q.state == 12 * params // 4 and q.gradients == 4 * params // 4
    r, _ = _plan(mesh={"data": 2, "fsdp": 1, "tensor": 2})  # twice the rows per device, half the vocabulary
    assert r.state == 12 * params // 2
    assert p.logits == 2 * 4 * (4 * 1024) * 50257 and r.logits == 2 * 4 * (8 * 1024) * -(-50257 // 2)


def test_activations_shrink_with_remat_and_bfloat16_and_grow_with_materialised_scores():
    none, _ = _plan()
    full, _ = _plan("model.remat=full")
    dots, _ = _plan("model.remat=dots")
    half, _ = _plan("model.dtype=bfloat16")
    xla, _ = _plan(attention="xla")
    assert full.activations < dots.activations < none.activations
    assert half.activations * 2 == none.activations
    rows, T, heads = 4, 1024, 12
    assert xla.activations - none.activations == 12 * rows * heads * T * T * 4  # float32 scores, each layer


def test_chunked_logits_hold_one_chunk():
    plain, _ = _plan()
    chunked, _ = _plan(chunk=128)
    assert chunked.logits * 8 == plain.logits  # 1024 positions in chunks of 128
    assert plain.total - chunked.total == plain.logits - chunked.logits
