"""Imported models bring their own tokenizer.json, start token and chat template: GPT-2 (<|endoftext|> in
front), Llama 3 (<|begin_of_text|>), Mistral (<s>). Each tokenizer is trained here with the special tokens
and post-processor of its family; the random-weight model is made with transformers."""

import json

import jax
import numpy as np
import pytest

import torch
import transformers

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data import chat, examples
from jaxlm.generate import Sampling, encode_prompt, load

FAMILIES = {  # (bos, eos, the tokenizer puts bos in front)
    "gpt2": ("<|endoftext|>", "<|endoftext|>", False),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", True),
    "mistral": ("<s>", "</s>", True),
}
TEXTS = ["the king said", "naïve café — ünïcödé ✓ 日本語 🙂", "  love and\n\ndeath  "]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _tokenizer(family, directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from conftest import write_corpus

    bos, eos, front = FAMILIES[family]
    text = write_corpus(directory / "corpus", seed=5)[len("text:"):]
    fast = Tokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([bos, eos, "<pad>"]))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    import glob
    fast.train(sorted(glob.glob(text)), trainer)
    if front:
        fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, fast.token_to_id(bos))])
    else:
        fast.post_processor = processors.ByteLevel(trim_offsets=False)
    return fast


def _hf_folder(family, tmp_path):
    (tmp_path / "corpus").mkdir()
    fast = _tokenizer(family, tmp_path)
    V = fast.get_vocab_size()
    bos, eos, _ = FAMILIES[family]
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         initializer_range=0.3, bos_token_id=fast.token_to_id(bos),
                                         eos_token_id=fast.token_to_id(eos))
    else:
        cls = transformers.LlamaConfig if family == "llama3" else transformers.MistralConfig
        extra = ({"sliding_window": None} if family == "mistral" else  # Llama 3.1's RoPE scaling, 32 -> 256
                 {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32}})
        config = cls(vocab_size=V, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
                     tie_word_embeddings=False, bos_token_id=fast.token_to_id(bos), eos_token_id=fast.token_to_id(eos),
                     **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / f"hf-{family}"
    model.save_pretrained(str(folder))
    fast.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": TEMPLATE}))
    return model, folder, transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_model_starts_documents_and_prompts_with_its_own_start_token(family, tmp_path):
    model, folder, hf_tok = _hf_folder(family, tmp_path)
    bos, eos, front = FAMILIES[family]
    run = tmp_path / "run"
    assert main(["import", "hf", str(folder), "--out", str(run)]) == 0
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.data.bos_token == ("" if bos == eos else bos) and cfg.data.chat_template == TEMPLATE
    m = load(str(run), devices=jax.devices()[:1])
    tok = m.tokenizer
    assert (tok.start_token, tok.eos_token) == (bos, eos)
    # float32 logits of 200 positions of real text (the llama3 scaling matters past its original 32)
    text = (folder.parent / "corpus" / "doc0.txt").read_text(encoding="utf-8")
    ids = np.asarray([encode_prompt(tok, text)[:200 if family != "gpt2" else 64]], np.int32)
    ours = np.asarray(m.model.apply({"params": m.params}, ids))
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    err = float(np.max(np.abs(ours - want)) / np.max(np.abs(want)))
    print(f"{family} with its tokenizer.json: largest logit error relative to the largest logit {err:.2e}")
    assert err <= 1e-5, err
    for text in TEXTS:  # the same ids as transformers, the start token in front where the family puts it
        want = hf_tok(text)["input_ids"]
        assert encode_prompt(tok, text) == (want if front else [hf_tok.convert_tokens_to_ids(bos)] + want)
        assert tok.decode(tok.encode([text])[0]) == text
    for text in TEXTS[:2]:  # greedy generation from the same ids
        ids = encode_prompt(tok, text)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(ids):].tolist()
        out = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
        assert m.generator.generate(m.params, [ids], 8, Sampling(temperature=0), eos_id=tok.eos_id)[0] == out

    # fine-tuning prompts begin with it too, and chats render with the model's template
    ex = examples.encode([("x", {"prompt": "the king", "completion": " said"})], tok, TEMPLATE, "completion", 32)
    assert ex.ids[0] == tok.start_id and ex.ids[-1] == tok.eos_id
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert chat.render(TEMPLATE, conv, {"bos_token": tok.start_token, "eos_token": tok.eos_token}) == \
        hf_tok.apply_chat_template(conv, tokenize=False)

    # the export gives transformers the same start token, ids and template
    out_dir = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out_dir)]) == 0
    again = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    for text in TEXTS:
        assert again(text)["input_ids"] == encode_prompt(tok, text)
    assert again.bos_token == bos and again.apply_chat_template(conv, tokenize=False) == \
        hf_tok.apply_chat_template(conv, tokenize=False)
    hf_cfg = json.loads((out_dir / "config.json").read_text())
    assert hf_cfg["bos_token_id"] == tok.start_id and hf_cfg["eos_token_id"] == tok.eos_id


def test_a_start_token_other_than_eos_is_never_a_target(tmp_path):
    """Documents are joined as EOS, start token, text: the EOS ends the document before, the start token
    is given and never scored, in training or evaluation."""
    from jaxlm.data.loader import TrainBatches, unscored_id, window_batches

    _, folder, _ = _hf_folder("llama3", tmp_path)
    run = tmp_path / "run"
    assert main(["import", "hf", str(folder), "--out", str(run)]) == 0
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.data.build import encode_stream

    tok = load_tokenizer(str(run / "tokenizer.json"), bos_token="<|begin_of_text|>")
    docs = [(True, "the king said"), (True, "good night")]
    ids = np.concatenate([i for i, _, _ in encode_stream(tok, iter(docs))])
    a, b = tok.encode(["the king said", "good night"])
    assert ids.tolist() == [tok.eos_id, tok.start_id] + a + [tok.eos_id, tok.start_id] + b
    stream = np.tile(ids, 20)
    assert unscored_id(tok) == tok.start_id
    batch = TrainBatches([stream], 4, 16, 0, eos_id=tok.start_id, unscored=tok.start_id).batch_at(3)
    assert np.array_equal(batch["mask"] == 0, batch["targets"] == tok.start_id) and batch["mask"].min() == 0
    starts = batch["inputs"] == tok.start_id
    assert np.all(batch["positions"][starts] == 0)  # the start token is position 0 of its document
    for _, wb in window_batches(stream, 4, 16, unscored=tok.start_id, eos_id=tok.start_id):
        assert not np.any(wb["mask"][wb["targets"] == tok.start_id])
