"""Hugging Face export and import, checked against transformers (torch, CPU, float32)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the `test` extra installs torch==2.13.0 (CPU) and transformers
import transformers

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.export import ExportError, from_hf, read_safetensors, to_hf
from jaxlm.generate import Sampling, encode_prompt, load

from test_cli import TINY_CLI

PROMPTS = ["the king", "good night, sweet lady", "  love and  death\nthe crown", "fair 1234 naïve 🙂"]


def _tiny_run(tmp_path_factory, name: str, seed: int, *extra: str):
    """A 16-step tiny run on a corpus of its own, with `extra` overrides."""
    from conftest import write_corpus

    root = tmp_path_factory.mktemp(name)
    source = write_corpus(root, seed=seed)
    run_dir = root / "run"
    assert main(["train", f"data.source={source}", f"run.dir={run_dir}", "train.steps=16", "eval.every=0",
                 "optim.lr=3e-3", "optim.warmup_steps=0", "optim.schedule=constant", "run.tensorboard=false",
                 *extra] + TINY_CLI) == 0
    return run_dir


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny llama run with grouped-query attention (4 heads, 2 kv heads), untied head."""
    return _tiny_run(tmp_path_factory, "llama", 2, "model.family=llama", "model.n_kv_heads=2")


@pytest.fixture(scope="module")
def bytelevel_run(tmp_path_factory):
    """A tiny gpt2 run with a byte-level BPE tokenizer.json (data.tokenizer_type=bytelevel)."""
    run_dir = _tiny_run(tmp_path_factory, "bytelevel", 4, "data.tokenizer_type=bytelevel")
    assert (run_dir / "tokenizer.json").exists()
    return run_dir


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _hf_greedy(model, ids, n, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=torch.ones(
            1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_export_transformers_round_trip(family, trained_run, llama_run, tmp_path, capsys):
    run_dir = trained_run[1] if family == "gpt2" else llama_run
    out = tmp_path / "hf"
    shard = ["--max-shard-gb", "0.00005"] if family == "llama" else []  # 50 kB shards: exercise the index
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)] + shard) == 0
    assert (out / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model"):
        assert (out / name).is_file(), name

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                                    dtype=torch.float32)
    assert type(model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()

    m = load(str(run_dir), devices=jax.devices()[:1])
    if family == "llama":
        assert m.model.cfg.kv_heads < m.model.cfg.n_heads
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in PROMPTS + ["<s> literal </s>", "\t\ttabs\n\n", "▁"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == m.tokenizer.encode([text])[0], text

    prompts = [encode_prompt(m.tokenizer, t) for t in PROMPTS]
    n = min(map(len, prompts))
    batch = np.array([p[:n] for p in prompts], np.int32)
    ours = np.asarray(m.model.apply({"params": m.params}, jnp.asarray(batch)))
    theirs = _hf_logits(model, batch)
    err = float(np.max(np.abs(ours - theirs)))
    print(f"{family}: max abs logit error {err:.2e} over {batch.shape}")
    assert err <= 1e-4

    eos = m.tokenizer.eos_id
    ours_greedy = m.generator.generate(m.params, prompts, 32, Sampling(temperature=0), eos_id=eos)
    for p, g in zip(prompts, ours_greedy):
        assert _hf_greedy(model, p, 32, eos) == g
    assert any(len(g) == 32 for g in ours_greedy)  # at least one went the full 32 tokens


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mup_export_folds_the_multipliers_so_transformers_logits_match(family, tmp_path, capsys):
    """A µP run (m = 32/8 = 4, alpha_out 2, attention scale off the standard one; gpt2 tied, llama untied
    with grouped-query attention) exported as hf: transformers' logits equal ours within 1e-4, and the same
    weights read as a standard model would not."""
    import dataclasses

    from conftest import write_corpus
    from jaxlm.model import Decoder

    source = write_corpus(tmp_path, seed=3)
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    attn = ["model.mup_base_head_dim=2"] if family == "gpt2" else ["model.mup_attn_mult=1.5", "model.n_kv_heads=2"]
    assert main(["train", f"data.source={source}", f"run.dir={run_dir}", "train.steps=12", "eval.every=0",
                 f"model.family={family}", "model.parametrization=mup", "model.mup_base_width=8",
                 "model.mup_output_mult=2.0", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
                 "run.tensorboard=false"] + attn + TINY_CLI) == 0
    assert "parametrization: mup, m = d_model/base = 32/8 = 4;" in capsys.readouterr().err  # the plan
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    m = load(str(run_dir), devices=jax.devices()[:1])
    assert m.model.cfg.parametrization == "mup" and m.model.cfg.tied == (family == "gpt2")
    assert np.any(np.asarray(m.params["blocks"]["attn"]["q"]["kernel"]))  # trained away from its zero init
    prompts = [encode_prompt(m.tokenizer, t) for t in PROMPTS]
    batch = np.array([p[:min(map(len, prompts))] for p in prompts], np.int32)
    ours = np.asarray(m.model.apply({"params": m.params}, jnp.asarray(batch)))
    err = float(np.max(np.abs(ours - _hf_logits(model, batch))))
    print(f"mup {family}: max abs logit error {err:.2e}")
    assert err <= 1e-4
    sp = Decoder(dataclasses.replace(m.model.cfg, parametrization="sp"), m.model.vocab_size)
    assert float(np.max(np.abs(ours - np.asarray(sp.apply({"params": m.params}, jnp.asarray(batch)))))) > 1e-2


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """family -> (jaxlm Loaded, export directory): each run exported once, llama trained only when asked for."""
    done = {}

    def get(family):
        if family not in done:
            run_dir = request.getfixturevalue("trained_run")[1] if family == "gpt2" else \
                request.getfixturevalue(f"{family}_run")
            out = tmp_path_factory.mktemp(f"hf-{family}")
            assert main(["export", str(run_dir), "--out", str(out)]) == 0
            done[family] = load(str(run_dir), devices=jax.devices()[:1]), out
        return done[family]

    return get


def test_exported_tokenizer_prepends_eos_as_jaxlm_does(exported):
    import tokenizers

    m, out = exported("gpt2")
    eos = m.tokenizer.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    backend = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))  # the file alone, without transformers
    backend.encode_special_tokens = True  # what split_special_tokens sets (tokenizer.json cannot hold it)
    for text in PROMPTS + ["", " ", "</s> literal <s>", "é 🙂 日本"]:
        raw = m.tokenizer.encode([text])[0]
        assert hf_tok(text)["input_ids"] == [eos] + raw == encode_prompt(m.tokenizer, text), text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == raw, text
        assert backend.encode(text).ids == [eos] + raw, text
        assert backend.encode(text, add_special_tokens=False).ids == raw, text
        assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text, text
    assert hf_tok(PROMPTS)["input_ids"] == [encode_prompt(m.tokenizer, t) for t in PROMPTS]
    a, b = PROMPTS[:2]
    assert hf_tok(a, b)["input_ids"] == encode_prompt(m.tokenizer, a) + encode_prompt(m.tokenizer, b)
    # bos is the token sequences start with: EOS, here and in config.json / generation_config.json
    assert hf_tok.bos_token_id == hf_tok.eos_token_id == eos and hf_tok.pad_token_id == m.tokenizer.sp.pad_id()
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((out / name).read_text())
        assert ids["bos_token_id"] == ids["eos_token_id"] == eos, name


def test_an_exported_tokenizer_json_is_the_runs_own_with_eos_in_front(exported):
    """A run trained with a tokenizer.json exports that file: transformers gives its ids, with EOS in front."""
    m, out = exported("bytelevel")
    eos = m.tokenizer.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in PROMPTS + ["", "é 🙂 日本 e\u0301", "<|endoftext|> literal"]:
        raw = m.tokenizer.encode([text])[0]
        assert hf_tok(text)["input_ids"] == [eos] + raw == encode_prompt(m.tokenizer, text), text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == raw, text
        assert hf_tok.decode(raw) == m.tokenizer.decode(raw) == text, text
    assert hf_tok.bos_token_id == hf_tok.eos_token_id == eos and hf_tok.eos_token == "<|endoftext|>"
    assert "pad_token_id" not in json.loads((out / "config.json").read_text())
    # imported back from the folder, which holds a tokenizer.json and no tokenizer.model
    run_dir = out.parent / f"{out.name}-imported"
    assert main(["import", "hf", str(out), "--out", str(run_dir)]) == 0
    back = load(str(run_dir), devices=jax.devices()[:1])
    assert back.tokenizer.kind == "tokenizer.json" and back.tokenizer.eos_id == eos
    assert back.tokenizer.encode(PROMPTS) == m.tokenizer.encode(PROMPTS)
    ids = jnp.asarray([encode_prompt(m.tokenizer, PROMPTS[0])])
    # the same parameters; the imported run unrolls its layers (model.scan_layers=false): last-bit differences
    np.testing.assert_allclose(back.model.apply({"params": back.params}, ids), m.model.apply({"params": m.params}, ids),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bytelevel"])
def test_transformers_greedy_from_plain_tokenizer_call_matches_jaxlm_generate(family, exported):
    m, out = exported(family)
    eos, n = m.tokenizer.eos_id, 24
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    texts = PROMPTS + [""]
    prompts = [encode_prompt(m.tokenizer, t) for t in texts]
    ours = m.generator.generate(m.params, prompts, n, Sampling(temperature=0), eos_id=eos)

    def hf_greedy(**enc):
        """(new token ids, the logits the first one was chosen from) of transformers' greedy generate."""
        with torch.no_grad():
            res = model.generate(**enc, do_sample=False, max_new_tokens=n, return_dict_in_generate=True,
                                 output_logits=True)
        start = enc["input_ids"].shape[1] if enc else 1  # no input: the sequence starts with bos alone
        return res.sequences[0, start:].tolist(), res.logits[0][0].numpy()

    batch = np.zeros((len(prompts), max(map(len, prompts))), np.int32)  # right-padded: causal, so no effect
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = p
    all_logits = np.asarray(m.model.apply({"params": m.params}, jnp.asarray(batch)))
    nexts = [all_logits[i, len(p) - 1] for i, p in enumerate(prompts)]  # jaxlm's logits for the next token

    def stop(g):  # jaxlm's continuation as transformers returns it: with the EOS it stopped at
        return g + [eos] if len(g) < n else g

    for text, g, ref in zip(texts, ours, nexts):
        ids, logits = hf_greedy(**hf_tok(text, return_tensors="pt"))
        assert ids == stop(g), text
        assert np.max(np.abs(logits - ref)) <= 1e-4, text
    ids, logits = hf_greedy()  # no input: generation_config's bos_token_id, EOS, as for the empty prompt
    assert texts[-1] == "" and ids == stop(ours[-1]) and np.max(np.abs(logits - nexts[-1])) <= 1e-4
    assert any(len(g) == n for g in ours)
    # without the EOS in front (the tokenizer.json of before) transformers conditions on something else: the
    # logits above would be off by 3e-3 to 1e-1 (a greedy continuation of these tiny models need not change)
    off = [np.max(np.abs(hf_greedy(**hf_tok(t, return_tensors="pt", add_special_tokens=False))[1] - ref))
           for t, ref in zip(PROMPTS, nexts)]
    assert max(off) > 1e-3, off


def _random_hf(family, tmp_path):
    torch.manual_seed(0)
    llama = dict(vocab_size=384, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 initializer_range=0.2)
    if family == "llama":
        config = transformers.LlamaConfig(**llama)
    elif family == "llama3":  # Llama 3.1's frequency scaling, from a context of 32 to 256
        config = transformers.LlamaConfig(**{**llama, "max_position_embeddings": 256}, rope_theta=500000.0,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 32})
    elif family == "mistral":
        config = transformers.MistralConfig(**llama, sliding_window=None)
    elif family == "qwen2":  # biases on q, k and v only
        config = transformers.Qwen2Config(**llama, use_sliding_window=False)
    elif family == "qwen3-relu2":  # q_norm and k_norm (model.qk_norm), and a relu2-gated MLP (model.activation)
        config = transformers.Qwen3Config(**llama, head_dim=8, use_sliding_window=False, hidden_act="relu2")
    else:  # gpt2, and gpt2-relu2: relu(x)^2 in place of the GELU
        config = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         initializer_range=0.2,
                                         activation_function="relu2" if family == "gpt2-relu2" else "gelu_new")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero: random ones, so their mapping is tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # and the per-head norms' scales
                p.normal_(1.0, 0.5)
    directory = tmp_path / f"hf-{family}"
    model.save_pretrained(str(directory))
    return model, directory


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3-relu2", "gpt2-relu2"])
def test_import_random_transformers_model_and_export_it_back_bit_for_bit(family, trained_run, tmp_path):
    model, hf_dir = _random_hf(family, tmp_path)
    tok = trained_run[1] / "tokenizer.model"
    run_dir = tmp_path / "imported"
    assert main(["import", "hf", str(hf_dir), "--out", str(run_dir), "--tokenizer", str(tok)]) == 0

    m = load(str(run_dir), devices=jax.devices()[:1])
    ids = np.random.default_rng(0).integers(0, 320, (3, 200 if family == "llama3" else 20)).astype(np.int32)
    ours = np.asarray(m.model.apply({"params": m.params}, jnp.asarray(ids)))
    want = _hf_logits(model, ids)
    err = float(np.max(np.abs(ours - want)) / np.max(np.abs(want)))
    print(f"imported {family}: largest logit error relative to the largest logit {err:.2e}")
    assert err <= 1e-5
    if family == "llama3":  # the scaling matters at these positions: without it the logits are far off
        plain = m.model.clone(cfg=dataclasses.replace(m.model.cfg, rope_scaling="none"))
        off = np.max(np.abs(np.asarray(plain.apply({"params": m.params}, jnp.asarray(ids))) - want))
        assert off / np.max(np.abs(want)) > 1e-2, off

    out = tmp_path / "re-exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    original, _ = read_safetensors(str(hf_dir))
    again, _ = read_safetensors(str(out))
    assert sorted(again) == sorted(original)
    for name, x in original.items():
        assert again[name].dtype == x.dtype and np.array_equal(again[name], x), name

    # eval and generate work on the imported run
    assert main(["generate", str(run_dir), "--prompt", "the king", "--max-new-tokens", "4"]) == 0


def test_safetensors_export_has_flat_names_and_metadata(trained_run, tmp_path):
    run_dir = trained_run[1]
    out = tmp_path / "st"
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    tensors, meta = read_safetensors(str(out))
    info = json.loads(meta["jaxlm"])
    assert info["step"] == 24 and info["tokenizer_sha256"] == load_tokenizer(str(run_dir / "tokenizer.model")).sha256
    assert load_config(text=info["config"]).model.d_model == 32
    m = load(str(run_dir), devices=jax.devices()[:1])
    flat = {".".join(str(k.key) for k in path): np.asarray(x) for path, x in
            jax.tree_util.tree_leaves_with_path(m.params)}
    assert sorted(tensors) == sorted(flat) and "embed.embedding" in tensors
    for k in flat:
        assert np.array_equal(tensors[k], flat[k]), k


def test_what_cannot_be_exported_or_imported_is_refused_by_name(trained_run, tmp_path, capsys):
    gqa = load_config(None, ["model.family=gpt2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_model=32"]).model
    with pytest.raises(ExportError, match="no grouped-query attention"):
        to_hf({}, gqa)
    m = load(str(trained_run[1]), devices=jax.devices()[:1])
    tensors = to_hf(m.params, m.model.cfg)
    target = m.params
    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ExportError, match="'transformer.h.1.mlp.c_fc.bias' is missing"):
        from_hf(missing, m.model.cfg, target)
    wrong = {**tensors, "transformer.h.0.attn.c_proj.weight": np.zeros((32, 31), np.float32)}
    with pytest.raises(ExportError, match=r"'transformer.h.0.attn.c_proj.weight' has shape \(32, 31\)"):
        from_hf(wrong, m.model.cfg, target)
    extra = {**tensors, "transformer.h.9.ln_1.weight": np.zeros(32, np.float32)}
    with pytest.raises(ExportError, match="unexpected tensor 'transformer.h.9.ln_1.weight'"):
        from_hf(extra, m.model.cfg, target)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    assert main(["import", "hf", str(odd), "--out", str(tmp_path / "x"), "--tokenizer",
                 str(trained_run[1] / "tokenizer.model")]) == 2
    assert "model_type='falcon' (FalconForCausalLM) is not supported" in capsys.readouterr().err
    # a rope scaling jaxlm does not have, and weights that are only a pickle, are refused by name
    _, hf_dir = _random_hf("llama", tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert main(["import", "hf", str(hf_dir), "--out", str(tmp_path / "y"), "--tokenizer",
                 str(trained_run[1] / "tokenizer.model")]) == 2
    assert "rope scaling of type 'yarn' is not supported" in capsys.readouterr().err
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")  # not a pickle: it must not be opened
    assert main(["import", "hf", str(hf_dir), "--out", str(tmp_path / "z"), "--tokenizer",
                 str(trained_run[1] / "tokenizer.model")]) == 2
    assert "holds only pytorch_model.bin" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["export", str(trained_run[1]), "--out", str(tmp_path / "x2"), "--format", "onnx"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_from_hf_inverts_to_hf_exactly_for_random_params(family):
    """One table per family serves both directions: random params (no two leaves alike) come back bit for bit,
    tied and untied, with and without biases, scanned or unrolled layers (a gpt2 model without biases exports
    zero biases, which a model without them cannot import)."""
    import flax.linen as nn
    from conftest import decoder, tiny_config

    cases = [(tied, bias, scan) for tied in (True, False) for bias in (True, False) for scan in (True, False)]
    rng = np.random.default_rng(0)
    for tied, bias, scan in cases:
        extra = ["model.n_kv_heads=4", "model.d_ff=96"] if family == "llama" else []  # 8 heads over 4 kv heads
        cfg = tiny_config(f"model.family={family}", f"model.tie_embeddings={str(tied).lower()}",
                          f"model.bias={str(bias).lower()}", f"model.scan_layers={str(scan).lower()}", *extra)
        shapes = nn.unbox(jax.eval_shape(decoder(cfg, 96).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
        params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes["params"])
        case = f"{family} tied={tied} bias={bias} scan={scan}"
        tensors = to_hf(params, cfg.model)
        assert ("lm_head.weight" in tensors) == (not tied), case
        if family == "gpt2" and not bias:  # GPT2LMHeadModel always has biases: zeros, the same function
            biases = [k for k in tensors if k.endswith(".bias")]
            assert len(biases) == 2 * 6 + 1 and not any(np.any(tensors[k]) for k in biases), case
            continue
        back = from_hf(tensors, cfg.model, params)
        assert jax.tree.structure(back) == jax.tree.structure(params), case
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(back)):
            assert y.dtype == np.float32 and y.shape == x.shape and np.array_equal(x, y), (case, path)


def test_a_gpt2_with_vocab_json_and_merges_txt_imports_with_the_ids_of_transformers(bytelevel_run, tmp_path):
    """A GPT-2 folder whose tokenizer is vocab.json + merges.txt (no tokenizer.json): the imported run's ids
    are those of transformers' GPT2Tokenizer (the slow, pure-Python one) on non-ASCII text, and its logits
    are transformers'."""
    from tokenizers import Tokenizer as Fast

    fast = Fast.from_file(str(bytelevel_run / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=fast.get_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     initializer_range=0.2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf_dir = tmp_path / "hf-gpt2-files"
    model.save_pretrained(str(hf_dir))
    fast.model.save(str(hf_dir))  # vocab.json, merges.txt
    assert sorted(p.name for p in hf_dir.iterdir() if "token" in p.name or p.suffix in (".txt", ".json")) == [
        "config.json", "generation_config.json", "merges.txt", "vocab.json"]
    run_dir = tmp_path / "imported"
    assert main(["import", "hf", str(hf_dir), "--out", str(run_dir)]) == 0
    slow = transformers.GPT2Tokenizer(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt"))
    ours = load_tokenizer(str(run_dir / "tokenizer.json"))
    texts = PROMPTS + ["日本語のテキスト、中文字符", "e\u0301 combining, 👩‍👩‍👧 family", "<|endoftext|> tail"]
    for text in texts:
        assert ours.encode([text])[0] == slow.encode(text), text
    assert ours.eos_id == slow.convert_tokens_to_ids("<|endoftext|>")
    m = load(str(run_dir), devices=jax.devices()[:1])
    ids = np.asarray([ours.encode([t])[0][:8] + [0] * (8 - len(ours.encode([t])[0][:8])) for t in texts[:3]], np.int32)
    want = _hf_logits(model, ids)
    got = np.asarray(m.model.apply({"params": m.params}, jnp.asarray(ids)))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5
