"""Supervised fine-tuning examples: jsonl records read, checked, rendered and encoded with the
tokens the loss counts.

Each non-blank line is one example, in one of two forms:

- `{"prompt": TEXT, "completion": TEXT}`: the ids are the start token, the prompt, the
  completion and EOS. The completion and the EOS after it are trained.
- `{"messages": [{"role": ROLE, "content": TEXT}, ...]}` (the OpenAI chat format): the chat
  template (`jaxlm.data.chat`) renders the text, start and end tokens included; the assistant
  replies are trained.

With `data.loss_on=all` every target of an example is trained instead. A text piece is encoded on
its own, after the special tokens the template wrote (the start and end tokens) are cut out of
it and given their ids; all pieces of all examples go through the tokenizer in one batch.

An example longer than train.seq_len + 1 tokens is cut to that length (and counted), unless it
would keep no trained target: a prompt that fills the sequence is an error, with its file and line.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

from jaxlm.data import chat
from jaxlm.data.sources import _files, decode, parse_source
from jaxlm.errors import DataError

LOSS_ON = ("completion", "all")


@dataclasses.dataclass
class Examples:
    ids: np.ndarray  # int32, all examples' ids end to end
    trained: np.ndarray  # uint8 per id: 1 where the id is a trained target
    starts: np.ndarray  # int64 [n + 1]: example i is ids[starts[i]:starts[i+1]]
    where: list[str]  # file:line of each example
    truncated: int = 0  # examples cut to train.seq_len + 1 tokens

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def take(self, index) -> "Examples":
        """The examples at `index`, in that order."""
        index = np.asarray(index, np.int64)
        lengths = self.lengths[index]
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        pick = np.concatenate([np.arange(self.starts[i], self.starts[i + 1]) for i in index]) if len(index) \
            else np.zeros(0, np.int64)
        return Examples(self.ids[pick], self.trained[pick], starts, [self.where[i] for i in index], self.truncated)


def read_records(source: str, invalid_utf8: str = "error") -> list[tuple[str, dict]]:
    """(file:line, record) of every example of a jsonl source (`jsonl:GLOB`), each checked (`check`)."""
    spec = parse_source(source)
    if spec.kind != "jsonl":
        raise DataError(f"data.format=sft reads jsonl files of examples; '{source}' is a {spec.kind}: source")
    out = [(where, check(record, where)) for path in _files(spec.target)
           for where, record in jsonl_records(path, invalid_utf8)]
    if not out:
        raise DataError(f"'{source}' holds no examples")
    return out


def jsonl_records(path: str, invalid_utf8: str = "error"):
    """Yield (file:line, parsed JSON) of each non-blank line of a jsonl file; DataError at a line that is
    not UTF-8 (see data.invalid_utf8) or not JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = decode(raw, where, invalid_utf8)
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg})") from None


def check(record, where: str) -> dict:
    """The record as {"prompt", "completion"} or {"messages"}; DataError naming what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: an example is a JSON object, not {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m.get("role"):
                raise DataError(f"{where}: message {i} has no 'role' (each message is {{\"role\": "
                                f"\"system\"|\"user\"|\"assistant\", \"content\": TEXT}})")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} ({m['role']}) has no text 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message to train on")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string (an example is {{\"prompt\", \"completion\"}} "
                                "or {\"messages\"})")
        if not record["completion"]:
            raise DataError(f"{where}: the completion is empty")
        return {"prompt": record["prompt"], "completion": record["completion"]}
    raise DataError(f"{where}: an example has 'prompt' and 'completion', or 'messages' (found "
                    f"{', '.join(sorted(record)) or 'no fields'})")


def pieces(record: dict, tok, template: str) -> list[tuple[str | int, bool]]:
    """(text or token id, trained) in order."""
    if "messages" in record:
        specials = {"bos_token": tok.start_token, "eos_token": tok.eos_token}
        return chat.segments(template, record["messages"], specials)
    return [(tok.start_id, False), (record["prompt"], False), (record["completion"], True), (tok.eos_id, True)]


def _special_split(text: str, specials: dict[str, int]) -> list[str | int]:
    if not specials:
        return [text]
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [specials.get(p, p) for p in re.split(pattern, text) if p]


def encode(records: list[tuple[str, dict]], tok, template: str, loss_on: str, seq_len: int) -> Examples:
    """Ids and trained flags of every example (module docstring)."""
    if loss_on not in LOSS_ON:
        raise DataError(f"data.loss_on={loss_on!r} is not one of {', '.join(LOSS_ON)}")
    specials = {s: i for s, i in ((tok.eos_token, tok.eos_id), (tok.start_token, tok.start_id)) if s}
    layout, texts = [], []  # per example: [(int id | index into texts, trained)]
    for _, record in records:
        items = []
        for piece, trained in pieces(record, tok, template):
            for part in (_special_split(piece, specials) if isinstance(piece, str) else [piece]):
                if isinstance(part, str):
                    texts.append(part)
                    part = ("text", len(texts) - 1)
                items.append((part, trained or loss_on == "all"))
        layout.append(items)
    encoded = tok.encode(texts) if texts else []
    ids, flags, starts, truncated = [], [], [0], 0
    for (where, _), items in zip(records, layout):
        ex_ids, ex_flags = [], []
        for part, trained in items:
            got = encoded[part[1]] if isinstance(part, tuple) else [part]
            ex_ids += got
            ex_flags += [trained] * len(got)
        if len(ex_ids) > seq_len + 1:
            if not any(ex_flags[1:seq_len + 1]):
                raise DataError(f"{where}: the prompt is {ex_flags.index(True) if True in ex_flags else len(ex_ids)} "
                                f"tokens, and no trained token fits in train.seq_len={seq_len}; shorten it or raise "
                                "train.seq_len")
            ex_ids, ex_flags, truncated = ex_ids[:seq_len + 1], ex_flags[:seq_len + 1], truncated + 1
        ids += ex_ids
        flags += ex_flags
        starts.append(len(ids))
    return Examples(np.asarray(ids, np.int32), np.asarray(flags, np.uint8), np.asarray(starts, np.int64),
                    [w for w, _ in records], truncated)


def held_out(n: int, fraction: float) -> np.ndarray:
    """Indices of the examples held out for validation: a fixed seeded choice of round(n * fraction),
    at least 1 and leaving at least 1 to train on."""
    k = min(max(1, round(n * fraction)), n - 1)
    if k < 1:
        raise DataError("one example cannot be split into training and validation; give more, or "
                        "data.valid_source")
    return np.sort(np.random.default_rng(0).permutation(n)[:k])


def load(data_cfg, tok, seq_len: int) -> tuple[Examples, Examples]:
    """(training, validation) examples of data.source (and data.valid_source, else a held-out share)."""
    if ";" in data_cfg.source:
        raise DataError("data.format=sft takes one jsonl source (a glob may match many files), not a mixture")
    template = chat.resolve(data_cfg.chat_template, data_cfg.tokenizer)
    records = read_records(data_cfg.source, data_cfg.invalid_utf8)
    if data_cfg.valid_source:
        valid = read_records(data_cfg.valid_source, data_cfg.invalid_utf8)
    else:
        held = held_out(len(records), data_cfg.valid_fraction)
        keep = np.ones(len(records), bool)
        keep[held] = False
        valid = [records[i] for i in held]
        records = [r for r, k in zip(records, keep) if k]
    return (encode(records, tok, template, data_cfg.loss_on, seq_len),
            encode(valid, tok, template, data_cfg.loss_on, seq_len))
