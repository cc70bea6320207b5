"""Generation: the KV-cache decode equals full-forward decoding, sampling, EOS, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.generate import Generator, Sampling, encode_prompt, load, recompute_greedy, sample
from jaxlm.sharding import make_mesh

from conftest import decoder


@pytest.fixture(scope="module")
def loaded(trained_run):
    """The tiny trained run's newest checkpoint, restored once for every test here."""
    return load(str(trained_run[1]), devices=jax.devices()[:1])


def _prompts(eos):
    rng = np.random.default_rng(0)
    return [[eos], [eos] + rng.integers(3, 300, 4).tolist(), [eos] + rng.integers(3, 300, 11).tolist()]


def test_cached_greedy_decode_of_a_checkpoint_equals_full_forward_decoding(loaded):
    m = loaded
    prompts = _prompts(m.tokenizer.eos_id)
    got = m.generator.generate(m.params, prompts, 24, Sampling(temperature=0))
    for p, g in zip(prompts, got):
        assert g == recompute_greedy(m.model, m.params, p, 24)


@pytest.mark.parametrize("family,scan,kernel_set", [("gpt2", True, "cpu"), ("llama", False, "cpu"),
                                                  ("llama", False, "standard")],
                         ids=["gpt2-scanned", "llama-gqa", "llama-gqa-standard"])
def test_cached_greedy_decode_equals_full_forward_decoding(family, scan, kernel_set):
    """Prompts of 1, 5 and 12 tokens in one batch; random weights large enough to give varied text."""
    heads = ["model.n_kv_heads=2"] if family == "llama" else []
    cfg = load_config(None, [f"model.family={family}", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                             "model.max_seq_len=64", "train.seq_len=32", "model.init_std=0.3",
                             f"model.scan_layers={str(scan).lower()}"] + heads)
    model = decoder(cfg, 300, kernel_set)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    gen = Generator(model, cfg.model, make_mesh(cfg, jax.devices()[:1]))
    prompts = _prompts(1)
    got = gen.generate(params, prompts, 30, Sampling(temperature=0))
    assert len({tuple(g) for g in got}) == 3 and all(len(set(g)) >= 3 for g in got)
    for p, g in zip(prompts, got):
        assert g == recompute_greedy(model, params, p, 30)


def test_generation_stops_each_row_at_eos(loaded):
    m = loaded
    prompts = _prompts(m.tokenizer.eos_id)
    free = m.generator.generate(m.params, prompts, 24, Sampling(temperature=0))
    stop = free[2][5]  # a token row 2 produces: used as the end-of-text id
    got = m.generator.generate(m.params, prompts, 24, Sampling(temperature=0), eos_id=stop)
    for f, g in zip(free, got):
        assert g == (f[:f.index(stop)] if stop in f else f)
    assert len(got[2]) <= 5


def test_sampling_filters_and_seeds():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]] * 20000))
    key = jax.random.key(0)
    for s in (Sampling(1.0, top_p=0.7), Sampling(1.0, top_k=2)):
        freq = np.bincount(np.asarray(sample(logits, key, s)), minlength=3) / 20000
        assert freq[2] == 0 and freq[0] == pytest.approx(0.625, abs=0.02)
    freq = np.bincount(np.asarray(sample(logits, key, Sampling(1.0))), minlength=3) / 20000
    assert np.allclose(freq, [0.5, 0.3, 0.2], atol=0.02)
    cold = np.bincount(np.asarray(sample(logits, key, Sampling(0.25))), minlength=3) / 20000
    assert cold[0] > 0.8  # p^(1/T) renormalised: 0.5^4 / (0.5^4 + 0.3^4 + 0.2^4) = 0.87
    assert (np.asarray(sample(logits, key, Sampling(1.0, top_k=1))) == 0).all()
    assert (np.asarray(sample(logits, key, Sampling(1.0, top_p=1e-6))) == 0).all()


def test_same_seed_same_samples(loaded):
    m = loaded
    prompts = _prompts(m.tokenizer.eos_id)
    a = m.generator.generate(m.params, prompts, 24, Sampling(1.0), seed=3)
    b = m.generator.generate(m.params, prompts, 24, Sampling(1.0), seed=3)
    c = m.generator.generate(m.params, prompts, 24, Sampling(1.0), seed=4)
    assert a == b and a != c


def test_cli_generate_streams_and_refuses_bad_input(trained_run, loaded, capsys):
    root, run_dir = trained_run
    assert main(["generate", str(run_dir), "--prompt", "the king", "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    m = loaded
    expected = m.generator.generate(m.params, [encode_prompt(m.tokenizer, "the king")], 10, Sampling(0),
                                    eos_id=m.tokenizer.eos_id)[0]
    assert out == "the king" + m.tokenizer.decode(expected) + "\n"
    assert main(["generate", str(run_dir), "--prompt", "the king", "--prompt", "a lady", "--num-samples", "2",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("=== prompt") == 4
    long_prompt = "the king " * 40
    assert main(["generate", str(run_dir), "--prompt", long_prompt, "--max-new-tokens", "4"]) == 2
    assert "more than the model's context (model.max_seq_len=64)" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    assert main(["generate", str(run_dir)]) == 2
    assert "give a prompt" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="at least one token"):
        m.generator.generate(m.params, [[]], 4)
