"""Each published-architecture preset is the model it is named after.

The expected values are the published configs' own, written out here with their source:
the `config.json` of each model on the Hugging Face hub (openai-community/gpt2,
gpt2-medium, gpt2-large; meta-llama/Llama-3.2-1B), and the parameter counts that
transformers' `num_parameters()` gives for those models (tied heads counted once).
"""

import pytest

from jaxlm.config import load_config
from jaxlm.metrics import model_param_counts

PUBLISHED = {
    # openai-community/gpt2: n_embd 768, n_layer 12, n_head 12, n_positions 1024, vocab_size 50257,
    # layer_norm_epsilon 1e-05, lm_head tied to wte; 124,439,808 parameters
    "gpt2-124m": dict(d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, vocab=50257, tied=True,
                      norm_eps=1e-5, params=124_439_808),
    # openai-community/gpt2-medium: n_embd 1024, n_layer 24, n_head 16; 354,823,168 parameters
    "gpt2-355m": dict(d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024, vocab=50257, tied=True,
                      norm_eps=1e-5, params=354_823_168),
    # openai-community/gpt2-large: n_embd 1280, n_layer 36, n_head 20; 774,030,080 parameters
    "gpt2-774m": dict(d_model=1280, n_layers=36, n_heads=20, max_seq_len=1024, vocab=50257, tied=True,
                      norm_eps=1e-5, params=774_030_080),
    # meta-llama/Llama-3.2-1B: hidden_size 2048, num_hidden_layers 16, num_attention_heads 32,
    # num_key_value_heads 8, intermediate_size 8192, vocab_size 128256, rms_norm_eps 1e-05,
    # rope_theta 500000.0, tie_word_embeddings true; 1,235,814,400 parameters
    "llama-1b": dict(d_model=2048, n_layers=16, n_heads=32, kv_heads=8, ff=8192, vocab=128256, tied=True,
                     norm_eps=1e-5, rope_theta=500000.0, params=1_235_814_400),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_matches_the_published_config(name):
    want = PUBLISHED[name]
    m = load_config(None, [f"model.preset={name}"]).model
    assert (m.d_model, m.n_layers, m.n_heads) == (want["d_model"], want["n_layers"], want["n_heads"])
    assert m.vocab_size == want["vocab"] and m.tied == want["tied"] and m.norm_eps == want["norm_eps"]
    if m.family == "llama":
        assert (m.kv_heads, m.ff_dim, m.rope_theta) == (want["kv_heads"], want["ff"], want["rope_theta"])
        assert not m.use_bias
    else:
        assert m.max_seq_len == want["max_seq_len"] and m.use_bias
    counts = model_param_counts(m, m.vocab_size)
    assert counts["total"] == want["params"], (name, counts)


def test_untying_the_llama_1b_head_adds_one_vocabulary_matrix():
    m = load_config(None, ["model.preset=llama-1b", "model.tie_embeddings=false"]).model
    assert model_param_counts(m, m.vocab_size)["total"] == 1_235_814_400 + 128256 * 2048


def test_a_preset_vocabulary_that_misses_the_tokenizer_says_how_to_fix_it():
    from jaxlm.config_checks import check_vocab
    from jaxlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.vocab_size=50257 \(from model.preset=gpt2-124m\).*vocab_size=0"):
        check_vocab(load_config(None, ["model.preset=gpt2-124m"]), 8192)
    assert check_vocab(load_config(None, ["model.preset=gpt2-124m", "model.vocab_size=0"]), 8192) == 8192
