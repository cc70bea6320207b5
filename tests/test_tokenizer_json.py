"""Hugging Face tokenizer.json files: a byte-level BPE trained by jaxlm encodes and decodes as
transformers does; any tokenizer.json loads, or fails with a clear error before anything is built."""

import json

import pytest
import transformers

from jaxlm.cli import main
from jaxlm.data.tokenizer import load_tokenizer, train_tokenizer
from jaxlm.errors import DataError

TEXTS = ["the king and the queen", "日本語のテキストと中文", "emoji 🙂🎉👍🏽 and flags 🇫🇷", "combining e\u0301 a\u0308 o\u0323\u0302",
         "Ünïcödé naïve café façade", "  two  spaces\n\nnew lines\ttabs", "<|endoftext|> in the text", ""]
CORPUS = [t * 3 for t in TEXTS[:6]] * 20 + ["the quick brown fox jumps over the lazy dog " * 20]


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory):
    tok = train_tokenizer(CORPUS, 400, "bytelevel")
    folder = tmp_path_factory.mktemp("bytelevel")
    tok.save(str(folder / "tokenizer.json"))
    return tok, folder


def test_a_trained_bytelevel_bpe_encodes_and_decodes_as_transformers(bytelevel, tmp_path):
    tok, folder = bytelevel
    assert tok.kind == "tokenizer.json" and tok.eos_token == "<|endoftext|>" and tok.vocab_size > 257
    gpt2 = transformers.GPT2TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    gpt2.save_pretrained(str(tmp_path / "saved"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    for text in TEXTS:
        ids = tok.encode([text])[0]
        assert gpt2(text, add_special_tokens=False)["input_ids"] == ids, text
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == gpt2.decode(ids) == text, text
    assert tok.encode(["<|endoftext|>"])[0] == [tok.eos_id]  # the special token in text is the token, as in HF
    assert load_tokenizer(str(folder)).sha256 == tok.sha256  # a folder holding tokenizer.json


def test_bad_tokenizer_json_files_are_refused(bytelevel, tmp_path, capsys):
    tok, folder = bytelevel
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(DataError, match="is not a loadable tokenizer.json"):
        load_tokenizer(str(bad))
    no_eos = json.loads((folder / "tokenizer.json").read_text())
    no_eos["added_tokens"] = []
    (tmp_path / "no_eos.json").write_text(json.dumps(no_eos))
    with pytest.raises(DataError, match="set data.eos_token"):
        load_tokenizer(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match="data.eos_token='<nope>' is not a token"):
        load_tokenizer(str(folder / "tokenizer.json"), "<nope>")
    assert load_tokenizer(str(folder / "tokenizer.json"), "the").eos_id == tok.encode(["the"])[0][0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))
    # from the command line: exit 2, nothing built
    (tmp_path / "corpus.txt").write_text("some text\n" * 50)
    cache = tmp_path / "cache"
    assert main(["data", f"data.source=text:{tmp_path}/corpus.txt", f"data.tokenizer={bad}",
                 f"data.cache_dir={cache}"]) == 2
    assert "is not a loadable tokenizer.json" in capsys.readouterr().err
    assert not (cache / "tokens").exists()


def test_a_run_trains_and_resumes_with_a_tokenizer_json(bytelevel, tmp_path):
    """data.tokenizer=tokenizer.json: the run directory keeps that file, the cache holds its ids with its
    end-of-text token in front of each document, and the run resumes with it."""
    import numpy as np

    from jaxlm.metrics import read_metrics

    tok, folder = bytelevel
    docs = CORPUS[:12]
    for i, d in enumerate(docs):
        (tmp_path / f"d{i:02d}.txt").write_text(d, encoding="utf-8")
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = ["train", f"data.source=text:{tmp_path}/d*.txt", f"data.tokenizer={folder}", f"data.cache_dir={cache}",
            f"run.dir={run_dir}", "data.valid_fraction=0.25", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "model.max_seq_len=32", "train.batch_size=8", "train.seq_len=16", "train.log_every=1",
            "eval.every=0", "checkpoint.every=4", "run.progress=false", "run.tensorboard=false"]
    assert main(args + ["train.steps=4"]) == 0
    assert (run_dir / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert not (run_dir / "tokenizer.model").exists()
    manifests = [json.loads(p.read_text()) for p in (cache / "tokens").glob("*/manifest.json")]
    train = next(m for m in manifests if m["split"] == "train")
    ids = np.fromfile(next(p.parent / "tokens.bin" for p in (cache / "tokens").glob("*/manifest.json")
                           if json.loads(p.read_text())["split"] == "train"), dtype=train["dtype"])
    assert ids.tolist() == [i for d in docs[:9] for i in [tok.eos_id] + tok.encode([d])[0]]
    assert main(args + ["train.steps=8"]) == 0  # resumes from step 4 with the run's tokenizer.json
    assert [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r] == list(range(8))
