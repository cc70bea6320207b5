import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import OptimConfig
from jaxlm.optim import decay_mask, make_schedule


@pytest.mark.parametrize("name", ["constant", "cosine", "linear", "wsd", "inverse_sqrt"])
def test_schedules_warm_up_linearly_then_follow_their_shape(name):
    o = OptimConfig(lr=1.0, schedule=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    s = make_schedule(o, 100)
    np.testing.assert_allclose([float(s(i)) for i in range(10)], [(i + 1) / 10 for i in range(10)], rtol=1e-6)
    end = float(s(100))
    expected_end = {"constant": 1.0, "cosine": 0.1, "linear": 0.1, "wsd": 0.1, "inverse_sqrt": (10 / 101) ** 0.5}
    np.testing.assert_allclose(end, expected_end[name], rtol=1e-5)
    if name == "wsd":
        assert float(s(79)) == 1.0 and float(s(90)) == pytest.approx(0.55)
    if name == "cosine":
        assert float(s(55)) == pytest.approx(0.55)


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {"embed": {"embedding": jnp.ones((4, 2))}, "pos_embed": jnp.ones((3, 2)),
              "blocks": {"attn": {"q": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
                         "attn_norm": {"LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}},
              "head": {"kernel": jnp.ones((2, 4))}}
    m = decay_mask(params)
    assert m["blocks"]["attn"]["q"] == {"kernel": True, "bias": False}
    assert m["blocks"]["attn_norm"]["LayerNorm_0"] == {"scale": False, "bias": False}
    assert not m["embed"]["embedding"] and not m["pos_embed"] and not m["head"]["kernel"]
    m = decay_mask(params, decay_embeddings=True)
    assert m["embed"]["embedding"] and m["head"]["kernel"]
