"""Pre-tokenized `tokens:` sources: llm.c / modded-nanogpt .bin shards, nanoGPT's headerless train.bin
and .npy arrays train exactly as the text they were made from; bad files are refused before anything
is built."""

import json

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.data.token_files import LLMC_MAGIC
from jaxlm.metrics import read_metrics

WORDS = "the king queen lord lady good night day love death sword crown heart mind fair".split()
RUN = ["data.valid_fraction=0.2", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64",
       "train.batch_size=8", "train.seq_len=32", "train.steps=12", "train.log_every=1", "eval.every=12",
       "eval.max_batches=2", "checkpoint.every=0", "run.progress=false", "run.tensorboard=false"]


def _docs(n=30, seed=5):
    rng = np.random.default_rng(seed)
    return ["\n".join(" ".join(rng.choice(WORDS, rng.integers(4, 12))) + "." for _ in range(rng.integers(5, 20)))
            + " é 🙂" for _ in range(n)]


def write_llmc(path, tokens, version=1, magic=LLMC_MAGIC, count=None):
    """A shard in llm.c's format: 256 int32 (magic, version, token count), then the tokens."""
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, np.uint16 if version == 1 else np.uint32).tobytes())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents as text files, a byte-level BPE tokenizer.json trained on them, and their ids with the
    end-of-text id in front of each document (what llm.c's data scripts write)."""
    root = tmp_path_factory.mktemp("tokens")
    docs = _docs()
    (root / "text").mkdir()
    for i, d in enumerate(docs):
        (root / "text" / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    tok = train_tokenizer(docs, 300, "bytelevel")
    tok.save(str(root / "tokenizer.json"))
    ids = [i for d in docs for i in [tok.eos_id] + tok.encode([d])[0]]
    return root, tok, ids


def _train(root, name, source, *extra):
    cache, run_dir = root / f"cache-{name}", root / f"run-{name}"
    assert main(["train", f"data.source={source}", f"data.cache_dir={cache}", f"run.dir={run_dir}", *RUN, *extra]) == 0
    entries = {}
    for m in (cache / "tokens").glob("*/manifest.json"):
        manifest = json.loads(m.read_text())
        entries[manifest["split"]] = ((m.parent / "tokens.bin").read_bytes(), manifest["documents"], manifest["bytes"])
    metrics = read_metrics(str(run_dir))
    return entries, [r["loss"] for r in metrics if "loss" in r], [r["eval_loss"] for r in metrics if "eval_loss" in r]


def test_llmc_raw_and_npy_shards_train_as_the_text_they_were_made_from(corpus):
    root, tok, ids = corpus
    half = len(ids) // 2
    write_llmc(root / "fineweb_train_000001.bin", ids[:half])
    write_llmc(root / "fineweb_train_000002.bin", ids[half:])
    np.asarray(ids, np.uint16).tofile(root / "train.bin")  # nanoGPT's headerless file
    np.save(root / "ids.npy", np.asarray(ids, np.int32))
    json_tok = f"data.tokenizer={root / 'tokenizer.json'}"
    text = _train(root, "text", f"text:{root}/text/doc*.txt", json_tok)
    llmc = _train(root, "llmc", f"tokens:{root}/fineweb_train_*.bin", f"data.tokens_tokenizer={root / 'tokenizer.json'}")
    raw = _train(root, "raw", f"tokens:{root}/train.bin", json_tok, "data.tokens_format=raw")
    npy = _train(root, "npy", f"tokens:{root}/ids.npy", json_tok)
    entries, losses, evals = text
    assert sorted(entries) == ["train", "valid"] and len(losses) == 12 and len(evals) == 1
    assert entries["valid"][1] == 6 and entries["valid"][2] > 0  # the last 20% of 30 documents, their UTF-8 bytes
    for name, got in (("llmc", llmc), ("raw", raw), ("npy", npy)):
        assert got[0]["train"][:2] == entries["train"][:2], name  # the same ids and documents
        assert got[0]["valid"] == entries["valid"], name  # bytes too: decoding gives the text back
        assert got[1] == losses and got[2] == evals, name


@pytest.mark.parametrize("case", ["magic", "version", "size", "vocabulary", "object npy", "other tokenizer",
                                  "no tokenizer"])
def test_bad_token_files_exit_2_and_build_nothing(corpus, tmp_path, capsys, case):
    root, tok, ids = corpus
    extra = [f"data.tokens_tokenizer={root / 'tokenizer.json'}"]
    source = f"tokens:{tmp_path}/shard.bin"
    if case == "magic":
        write_llmc(tmp_path / "shard.bin", ids, magic=12345)
        message = "magic 12345 is not llm.c's 20240520 (a headerless file needs data.tokens_format=raw)"
    elif case == "version":
        write_llmc(tmp_path / "shard.bin", ids, version=7)
        message = "llm.c version 7 is not one of [1, 2]"
    elif case == "size":
        write_llmc(tmp_path / "shard.bin", ids, count=len(ids) + 10)
        message = f"the header counts {len(ids) + 10:,} tokens"
    elif case == "vocabulary":
        write_llmc(tmp_path / "shard.bin", ids[:50] + [tok.vocab_size + 3] + ids[50:])
        message = f"token id {tok.vocab_size + 3} at position 50 is not below the vocabulary size {tok.vocab_size}"
    elif case == "object npy":
        np.save(tmp_path / "shard.npy", np.asarray([object(), 1], dtype=object), allow_pickle=True)
        source, message = f"tokens:{tmp_path}/shard.npy", "object arrays are refused"
    elif case == "other tokenizer":
        write_llmc(tmp_path / "shard.bin", ids)
        other = train_tokenizer(_docs(seed=9), 280, "bytelevel")
        other.save(str(tmp_path / "other.json"))
        extra.append(f"data.tokenizer={tmp_path / 'other.json'}")
        message = "which is not the run's tokenizer"
    else:
        write_llmc(tmp_path / "shard.bin", ids)
        extra, message = [], "pre-tokenized sources need the tokenizer their ids come from"
    cache = tmp_path / "cache"
    assert main(["data", f"data.source={source}", f"data.cache_dir={cache}", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (cache / "tokens").exists() or not any((cache / "tokens").iterdir())
