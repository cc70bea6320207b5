"""Hugging Face fast tokenizers (`tokenizer.json`): load any, or train a byte-level BPE.

A `tokenizer.json` (GPT-2's byte-level BPE, Llama 3's, Qwen's, Mistral's) is read with the
`tokenizers` library and used as it is: the ids of a text are `Tokenizer.encode(text,
add_special_tokens=False).ids`, what transformers' fast tokenizer gives for that file, and
decoding keeps special tokens. jaxlm adds its own end-of-text id in front of every document
(the token cache) and every prompt (`jaxlm.generate`), as with sentencepiece models.

The end-of-text token is `data.eos_token` when set, else the first special token of the file
among `EOS_NAMES` (GPT-2 and Qwen: <|endoftext|>; Llama 3: <|end_of_text|>; Mistral and
Llama 2: </s>). Resolving it from the file's bytes and the config alone means a run, a
checkpoint or an export find the same id again.

`train_bytelevel` trains a GPT-2-style byte-level BPE (`data.tokenizer_type=bytelevel`): GPT-2's
pre-tokenizer (its regex, bytes mapped to printable characters), the 256 byte symbols in the
alphabet, so no text is ever unknown, and <|endoftext|> as its one special token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from jaxlm.errors import DataError

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")
BYTELEVEL_EOS = "<|endoftext|>"


class JsonTokenizer:
    """A `tokenizer.json`; the same methods as the sentencepiece `jaxlm.data.tokenizer.Tokenizer`."""

    kind = "tokenizer.json"
    file_name = "tokenizer.json"
    splits_at_spaces = False  # documents are encoded whole (see jaxlm.data.cache)

    def __init__(self, data: bytes, eos_token: str = "", where: str = "tokenizer.json"):
        from tokenizers import Tokenizer as Fast

        self.data = data
        try:
            self.fast = Fast.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust loader raises a plain Exception with serde's message
            raise DataError(f"'{where}' is not a loadable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        specials = [t["content"] for t in json.loads(data).get("added_tokens", []) if t.get("special")]
        self.eos_token = eos_token or next((n for n in EOS_NAMES if n in specials), "")
        if not self.eos_token:
            raise DataError(f"'{where}' has none of the end-of-text tokens {', '.join(EOS_NAMES)} among its special "
                            f"tokens ({', '.join(specials) or 'none'}); set data.eos_token")
        eos = self.fast.token_to_id(self.eos_token)
        if eos is None:
            raise DataError(f"data.eos_token={self.eos_token!r} is not a token of '{where}'")
        self.eos_id = eos
        self.start = None  # the token in front of every document and prompt: None = EOS (`tokenizer.set_start`)

    @property
    def start_token(self) -> str:
        return self.eos_token if self.start is None else self.start

    @property
    def start_id(self) -> int:
        return self.eos_id if self.start is None else self.fast.token_to_id(self.start)

    @property
    def proto(self) -> bytes:  # the bytes stored in checkpoints, as for sentencepiece models
        return self.data

    @property
    def vocab_size(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, no special tokens added, on all cores. `encode_batch_fast` (tokenizers >= 0.21)
        gives `encode_batch`'s ids without computing character offsets: 3.1 against 1.4 MB/s on one core
        of the Intel Xeon (family 6, model 207), 10 MB of Gutenberg books, a byte-level BPE of 8,192."""
        batch = getattr(self.fast, "encode_batch_fast", self.fast.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        import numpy as np

        return self.fast.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=False)

    def save(self, path: str) -> None:
        from jaxlm.data.tokenizer import save_bytes

        save_bytes(self.data, path)

    def write_temporary(self, path: str) -> str:
        from jaxlm.data.tokenizer import write_temporary

        return write_temporary(self.data, path)


def train_bytelevel(paragraphs: Iterable[str], vocab_size: int) -> JsonTokenizer:
    """A GPT-2-style byte-level BPE trained on `paragraphs` (see the module docstring)."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    fast = Fast(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise DataError(f"data.tokenizer_vocab={vocab_size}: a byte-level BPE needs at least {len(alphabet) + 1} "
                        "(256 bytes and <|endoftext|>)")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BYTELEVEL_EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    fast.train_from_iterator(paragraphs, trainer=trainer)
    return JsonTokenizer(fast.to_str().encode("utf-8"))


def from_vocab_merges(vocab_path: str, merges_path: str) -> bytes:
    """The tokenizer.json of a GPT-2-style checkpoint that ships vocab.json + merges.txt only: their BPE
    with GPT-2's byte-level pre-tokenizer, decoder and post-processor (no prefix space, offsets kept), and
    <|endoftext|> as a special token when the vocabulary has it, as transformers builds GPT2TokenizerFast."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, processors

    try:
        fast = Fast(models.BPE.from_file(vocab_path, merges_path))
    except Exception as e:
        raise DataError(f"{vocab_path} and {merges_path} do not load as a BPE ({e})") from None
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.ByteLevel(trim_offsets=False)
    if fast.token_to_id(BYTELEVEL_EOS) is not None:
        fast.add_special_tokens([AddedToken(BYTELEVEL_EOS, special=True)])
    return fast.to_str().encode("utf-8")
