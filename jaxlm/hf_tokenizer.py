"""A Hugging Face fast tokenizer (tokenizer.json) that encodes exactly like a jaxlm sentencepiece model.

jaxlm's tokenizers are sentencepiece BPE models with an identity normalizer, no dummy
prefix and byte fallback. transformers' own Llama conversion assumes Llama's settings
(a prepended "▁", its own pre-tokenizer in recent versions), so the export builds the
fast tokenizer directly with the `tokenizers` library:

- model: BPE over the sentencepiece vocabulary (same ids), byte fallback for characters
  outside it. Merges are every split of a vocabulary piece into two vocabulary pieces,
  ranked by the merged piece's score: sentencepiece's BPE encoder repeatedly merges the
  adjacent pair whose merged piece scores highest, leftmost first, which is what a BPE
  with that merge ranking does.
- normalizer: spaces become "▁" (sentencepiece's whitespace escaping); nothing else.
- no pre-tokenizer (sentencepiece encodes the whole normalized string).
- decoder: "▁" back to spaces, byte pieces back to bytes.
- control pieces (<pad>, <s>, </s>) and <unk> are special tokens that literal text never
  produces (`split_special_tokens`), as in sentencepiece.
- post-processor: EOS in front of the text ("</s> $A"; a pair is "</s> $A </s> $B"), because
  jaxlm starts every training document and every prompt with EOS (`generate.encode_prompt`).
  `tok(text)` is therefore the ids jaxlm conditions on; `add_special_tokens=False` gives the
  plain sentencepiece ids.

`tokenizer_config.json` names `PreTrainedTokenizerFast`, which loads tokenizer.json as is,
whatever the model type, post-processor included (transformers 5 ignores add_bos_token and
add_eos_token when there is a tokenizer.json). It names EOS as both bos_token and eos_token
(the token that starts a sequence is EOS; sentencepiece's <s> is never used) and sets
add_bos_token for tools that read it there; code that builds the template from bos_token and
add_bos_token ("bos $A" / "bos $A bos $B") gets tokenizer.json's template, so EOS is added once.
"""

from __future__ import annotations

import json
import os

from jaxlm.data.tokenizer import Tokenizer

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _proto(tok: Tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(tok.proto)
    return m


def build(tok: Tokenizer):
    """The `tokenizers.Tokenizer` equivalent of `tok`."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    m = _proto(tok)
    if m.trainer_spec.model_type != 2:  # BPE
        raise ValueError("only sentencepiece BPE tokenizers can be exported as a Hugging Face fast tokenizer")
    if m.normalizer_spec.add_dummy_prefix or m.normalizer_spec.name not in ("identity", ""):
        raise ValueError("only tokenizers with the identity normalizer and no dummy prefix are supported")
    pieces = list(m.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece for p in pieces if p.type in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != _NORMAL or len(p.piece) < 2:
            continue
        splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
        splits = [(a, b) for a, b in splits if a in mergeable and b in mergeable]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        ranked.extend((-p.score, i, a, b) for a, b in splits)
    ranked.sort(key=lambda r: (r[0], r[1]))
    merges = [(a, b) for _, _, a, b in ranked]
    unk = next(p.piece for p in pieces if p.type == _UNKNOWN)
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                                    ignore_merges=False))
    fast.normalizer = normalizers.Replace(" ", "▁")
    fast.pre_tokenizer = None
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    start = tok.start_token
    fast.post_processor = processors.TemplateProcessing(single=f"{start}:0 $A:0",
                                                        pair=f"{start}:0 $A:0 {start}:1 $B:1",
                                                        special_tokens=[(start, tok.start_id)])
    fast.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                             for p in pieces if p.type in (_CONTROL, _UNKNOWN)])
    return fast


def _json_with_start_first(tok):
    """A run's own tokenizer.json as it is, its post-processor followed by "START $A": EOS for the models jaxlm
    pretrains; a model with a start token of its own (data.bos_token) gets "START $A" in place of its
    post-processor, which is how such tokenizers (Llama 3's) put it in front."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import processors

    fast = FastTokenizer.from_str(tok.data.decode("utf-8"))
    start = tok.start_token
    template = processors.TemplateProcessing(single=f"{start} $A", pair=f"{start} $A {start} $B",
                                             special_tokens=[(start, tok.start_id)])
    own = fast.post_processor if tok.start_id == tok.eos_id else None
    fast.post_processor = processors.Sequence([own, template]) if own else template
    return fast


def write_hf_tokenizer(tok: Tokenizer, out_dir: str, max_len: int, chat_template: str = "") -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and a sentencepiece run's
    tokenizer.model) into `out_dir`. A run trained with a tokenizer.json exports that file, with
    EOS put in front of the text as above. `chat_template` (a fine-tuning run's) goes into
    tokenizer_config.json; a sentencepiece tokenizer then reads special tokens in text as their ids,
    as fine-tuning read the rendered conversations (`jaxlm.data.examples`)."""
    if tok.kind != "sentencepiece":
        _json_with_start_first(tok).save(os.path.join(out_dir, "tokenizer.json"))
        special = {"bos_token": tok.start_token, "eos_token": tok.eos_token}
        _write_configs(out_dir, special, max_len, False, chat_template)  # as the tokenizers library reads text
        return
    build(tok).save(os.path.join(out_dir, "tokenizer.json"))
    sp = tok.sp
    eos = sp.id_to_piece(tok.eos_id)
    special = {"bos_token": tok.start_token, "eos_token": eos,  # sequences start with it (see `build`)
               "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(sp.pad_id())}
    _write_configs(out_dir, special, max_len, not chat_template, chat_template)
    tok.save(os.path.join(out_dir, "tokenizer.model"))


def _write_configs(out_dir: str, special: dict, max_len: int, split_special: bool, chat_template: str = "") -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
              "add_eos_token": False, "split_special_tokens": split_special, "clean_up_tokenization_spaces": False,
              "model_max_length": max_len, **({"chat_template": chat_template} if chat_template else {})}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
