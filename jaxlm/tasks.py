"""Multiple-choice tasks: each choice's log-likelihood given its context, and accuracy.

`score_examples` scores packed `Examples` on a stepper's mesh: the requests here, and the validation
examples of a fine-tuning run (`jaxlm.evaluate.validate_examples`).

A task file is jsonl, one example per line: `{"context": TEXT, "choices": [TEXT, ...], "label": INDEX}`.
Every (context, choice) pair is one request, encoded as lm-evaluation-harness encodes it
(`encode_pair`): trailing spaces of the context move to the front of the choice, the context and
the context+choice texts are encoded, and the choice's ids are those of the whole past the
context's; the context ids begin with the model's start token. The requests are packed into rows
with segment ids, as fine-tuning examples are (`jaxlm.data.packing`), the choice's ids being the
scored targets, and scored on the run's mesh in batches of eval.batch_size rows. A request longer
than the context length keeps its last seq_len + 1 ids (lm-eval cuts from the left too).

Metrics, as lm-eval's multiple_choice output type defines them:
- `acc`: the choice of highest log-likelihood is the label;
- `acc_norm`: the same after dividing each log-likelihood by the length of the choice's text
  (lm-eval 0.4 divides by `len(choice)`: characters of the string);
- `acc_bytes`: dividing by the choice's UTF-8 bytes instead (lm-eval's `acc_bytes`; the same as
  acc_norm for ASCII choices);
each with a 95% Wilson score interval over examples and lm-eval's standard error (sample standard
deviation / sqrt(n)). `--fewshot K` takes the first K examples of the file as a fixed prefix (each
context followed by its correct choice, joined by blank lines, as lm-eval joins few-shot examples)
put in front of every other context; they are not scored.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from jaxlm.data import packing
from jaxlm.data.examples import Examples, jsonl_records
from jaxlm.errors import DataError

Z95 = 1.959964


@dataclasses.dataclass
class Task:
    name: str
    contexts: list[str]
    choices: list[list[str]]
    labels: list[int]
    where: list[str]
    prefix: str = ""

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) of every request: example by example, choice by choice."""
        return [(self.prefix + c, ch) for c, chs in zip(self.contexts, self.choices) for ch in chs]


def _check(record, where: str) -> tuple[str, list[str], int]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a task example is a JSON object {{\"context\", \"choices\", \"label\"}}")
    context, choices, label = record.get("context"), record.get("choices"), record.get("label")
    if not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: 'label' is {label!r}, not an index of its {len(choices)} choices "
                        f"(0..{len(choices) - 1})")
    return context, choices, label


def read_task(path: str, fewshot: int = 0) -> Task:
    """The task file at `path`; its first `fewshot` examples become the fixed prefix."""
    if not os.path.isfile(path):
        raise DataError(f"task file '{path}' does not exist")
    rows = [(where, *_check(record, where)) for where, record in jsonl_records(path)]
    if fewshot < 0 or len(rows) <= fewshot:
        raise DataError(f"'{path}' has {len(rows)} examples: none would be left to score after --fewshot {fewshot}")
    shots = "".join(f"{c}{chs[y]}\n\n" for _, c, chs, y in rows[:fewshot])
    rows = rows[fewshot:]
    name = os.path.splitext(os.path.basename(path))[0]
    return Task(name, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[0] for r in rows], shots)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode([context + continuation, context])
    return [tok.start_id] + ctx, whole[len(ctx):]


def pair_examples(pairs: list[tuple[list[int], list[int]]], seq_len: int) -> Examples:
    """(context ids, continuation ids) pairs as `Examples` whose trained ids are the continuations', each
    cut from the left to seq_len + 1 ids (as lm-eval cuts)."""
    ids, flags, starts = [], [], [0]
    for ctx, cont in pairs:
        ids += (ctx + cont)[-(seq_len + 1):]
        flags += ([0] * len(ctx) + [1] * len(cont))[-(seq_len + 1):]
        starts.append(len(ids))
    return Examples(np.asarray(ids, np.int32), np.asarray(flags, np.uint8), np.asarray(starts, np.int64),
                    [f"request {i}" for i in range(len(pairs))])


def request_examples(tok, pairs: list[tuple[str, str]], seq_len: int) -> Examples:
    """The requests as `Examples` whose trained ids are the continuations' (left-truncated)."""
    encoded = []
    for i, (context, continuation) in enumerate(pairs):
        ctx, cont = encode_pair(tok, context, continuation)
        if not cont:
            raise DataError(f"request {i}: the choice {continuation!r} encodes to no tokens after its context")
        if len(cont) > seq_len:
            raise DataError(f"request {i}: the choice is {len(cont)} tokens, more than the context length {seq_len}")
        encoded.append((ctx, cont))
    return pair_examples(encoded, seq_len)


def wilson(k: float, n: int) -> list[float]:
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return [centre - half, centre + half]


def metrics(task: Task, lls: np.ndarray) -> dict:
    """acc and acc_norm with intervals, and every example's prediction, from the requests' log-likelihoods."""
    out, at, preds = {}, 0, []
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for i, (chs, y) in enumerate(zip(task.choices, task.labels)):
        ll = lls[at:at + len(chs)]
        at += len(chs)
        pred = int(np.argmax(ll))
        pred_norm = int(np.argmax(ll / np.array([len(c) for c in chs], np.float64)))
        pred_bytes = int(np.argmax(ll / np.array([len(c.encode("utf-8")) for c in chs], np.float64)))
        hits["acc"].append(pred == y)
        hits["acc_norm"].append(pred_norm == y)
        hits["acc_bytes"].append(pred_bytes == y)
        preds.append({"where": task.where[i], "label": y, "pred": pred, "pred_norm": pred_norm,
                      "pred_bytes": pred_bytes, "loglikelihoods": [float(v) for v in ll]})
    n = len(task.labels)
    for key, h in hits.items():
        h = np.asarray(h, np.float64)
        out[key] = float(h.mean())
        out[f"{key}_stderr"] = float(h.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        out[f"{key}_ci95"] = wilson(float(h.sum()), n)
    out["examples"] = n
    out["predictions"] = preds
    return out


def score_examples(stepper, params, ex, seq_len: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(NLL summed over each example's trained targets, their count), float64, examples packed as
    training packs them (`packing.eval_batches`)."""
    sums, counts = np.zeros(len(ex), np.float64), np.zeros(len(ex), np.float64)
    pending = []

    def drain(keep: int):
        while len(pending) > keep:
            owner, mask, out = pending.pop(0)
            got = np.asarray(jax.device_get(out), np.float64).reshape(owner.shape)
            scored = (owner >= 0) & (mask > 0)
            sums[:] += np.bincount(owner[scored], weights=got[scored], minlength=len(ex))
            counts[:] += np.bincount(owner[scored], minlength=len(ex))

    for owner, mask, local in packing.eval_batches(ex, batch_size, seq_len, stepper.local_rows(batch_size)):
        pending.append((owner, mask, stepper.eval_step(params, stepper.place(local, batch_size))))
        drain(2)
    drain(0)
    return sums, counts


def score_task(stepper, params, tok, task: Task, seq_len: int, batch_size: int) -> dict:
    """The task's metrics for `params` (every request scored once on the stepper's mesh)."""
    ex = request_examples(tok, task.pairs(), seq_len)
    sums, counts = score_examples(stepper, params, ex, seq_len, batch_size)
    want = np.add.reduceat(ex.trained.astype(np.int64), ex.starts[:-1])
    if not np.array_equal(counts.astype(np.int64), want):
        raise AssertionError("a request's continuation was not scored exactly once")
    return {**metrics(task, -sums), "requests": len(ex), "scored_tokens": int(counts.sum())}
