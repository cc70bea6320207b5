"""Evaluation harness: loss, perplexity and bits per byte of a checkpoint, with error bars.

`evaluate(path, ...)` restores a checkpoint's params onto a mesh, tokenizes a split with
the checkpoint's own tokenizer (through the token cache), scores every target token of
the split exactly once (`loader.Windows`: tiled windows, or sliding ones with a stride)
and returns one result dict per checkpoint:

- loss in nats per scored token, perplexity exp(loss);
- bits per byte: the summed NLL in bits over the UTF-8 bytes of the evaluated documents,
  so runs with different tokenizers compare on the same footing;
- a 95% confidence interval of the loss over units (documents, or fixed-size blocks of
  consecutive targets when there are too few documents): a ratio estimator's standard
  error, 1.96 sigma. The bits-per-byte interval is the loss interval scaled by
  tokens / bytes / ln 2.

The split is the documents joined into one stream with EOS before each one, as in
training, so the scored targets are every token plus the EOS that ends each document but
the last. Per-token NLLs come back to the host and are added in float64; the same
checkpoint gives the same numbers on any mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm import files
from jaxlm.config import Config
from jaxlm.data import cache
from jaxlm.data.loader import Windows, unscored_id, window_batches
from jaxlm.data.sources import parse_source
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import CheckpointError, ConfigError, DataError
from jaxlm.inference import open_checkpoints

Z95 = 1.959964  # two-sided 95% normal quantile
MIN_DOCUMENTS = 30  # fewer documents than this: the interval is over blocks of targets


@dataclasses.dataclass
class Split:
    label: str  # what was evaluated, for tables and file names
    tokens: np.ndarray  # EOS-joined token stream
    bytes: int  # UTF-8 bytes of its documents
    documents: int

    @classmethod
    def joined(cls, label: str, parts: list[tuple[np.ndarray, dict]]) -> "Split":
        """One split from the (token stream, manifest) of each of its parts (`cache.tokens`)."""
        stream = parts[0][0] if len(parts) == 1 else np.concatenate([t for t, _ in parts])
        return cls(label, stream, sum(m["bytes"] for _, m in parts), sum(m["documents"] for _, m in parts))


def load_split(cfg: Config, tok: Tokenizer, data: str | None = None, split: str | None = None,
               log=print) -> Split:
    """The token stream to evaluate: the run's own validation (or train) split, or `data`.

    `data` is a source spec (tfds:NAME, text:GLOB, jsonl:GLOB, parquet:GLOB, hf:PATH); `split` names a
    split of a TFDS or hf: source, or `train` / `validation` of the run's own data.
    """
    if data is None:
        split = split or "validation"
        if split not in ("validation", "train"):
            raise DataError(f"--split {split}: the run's own data has the splits validation and train; pass "
                            "--data SOURCE for another one")
        train_parts, _, valid_parts = cache.parts(cfg.data)
        role = "valid" if split == "validation" else "train"
        parts = valid_parts if role == "valid" else train_parts
        label = f"{split} of {cfg.data.source}" if role == "train" or not cfg.data.valid_source \
            else f"validation {cfg.data.valid_source}"
    else:
        spec = parse_source(data)
        if split and spec.kind not in ("tfds", "hf"):
            raise DataError(f"--split applies to TFDS and hf: sources and the run's own data, not to {data}")
        if split and spec.split:
            raise DataError(f"--data {data} already names a split; drop --split {split}")
        source = f"{spec.kind}:{spec.target}:{split}" if split else data
        parts, role, label = [cache.Part(cfg.data, source, "valid")], "valid", source
    return Split.joined(label, [cache.tokens(cfg.data, tok, p, role, log) for p in parts])


def ratio_interval(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float] | None:
    """95% interval of sum(sums) / sum(counts) over units (delta method); None with fewer than 2 units."""
    n = len(sums)
    if n < 2:
        return None
    r = sums.sum() / counts.sum()
    se = math.sqrt(n / (n - 1) * float(np.sum(np.square(sums - r * counts)))) / counts.sum()
    return float(r - Z95 * se), float(r + Z95 * se)


def units(tokens: np.ndarray, eos_id: int, unit: str, block: int) -> tuple[np.ndarray, str]:
    """(unit id of every target 1..n-1, description). A target belongs to the document it ends or is in."""
    n_docs = int(np.sum(tokens == eos_id))
    if unit == "auto":
        unit = "documents" if n_docs >= MIN_DOCUMENTS else "blocks"
    if unit == "documents":
        return np.cumsum(tokens == eos_id)[:-1], f"{n_docs} documents"
    if unit != "blocks":
        raise ConfigError(f"--ci-unit {unit}: choose auto, documents or blocks")
    ids = np.arange(len(tokens) - 1) // block
    return ids, f"{int(ids[-1]) + 1} blocks of {block} tokens"


def summarize(nll: np.ndarray, split: Split, eos_id: int, unit: str = "auto", block: int = 1024,
              unscored: int | None = None) -> dict:
    """Totals and intervals from the NLL of every target (nll[p] for target p; nll[0] unused); `eos_id`:
    the id that starts a document; targets equal to `unscored` (`loader.unscored_id`) are not counted."""
    per_target = nll[1:]
    kept = np.ones(len(per_target), bool) if unscored is None else split.tokens[1:] != unscored
    n = int(kept.sum())
    total = float(per_target.sum())
    loss = total / n
    ids, described = units(split.tokens, eos_id, unit, block)
    counts = np.bincount(ids, weights=kept).astype(np.float64)
    sums = np.bincount(ids, weights=per_target)[counts > 0]
    counts = counts[counts > 0]
    ci = ratio_interval(sums, counts)
    per_byte = n / split.bytes / math.log(2) if split.bytes else float("nan")
    out = {"tokens": n, "bytes": split.bytes, "documents": split.documents, "loss": loss,
           "ppl": math.exp(min(loss, 700.0)), "bpb": loss * per_byte, "ci_unit": described}
    if ci is not None:
        out.update(loss_ci95=list(ci), ppl_ci95=[math.exp(min(v, 700.0)) for v in ci],
                   bpb_ci95=[v * per_byte for v in ci])
    return out


def score(stepper, params, tokens: np.ndarray, seq_len: int, stride: int | None, batch_size: int,
          eos_id: int | None = None, log=None, unscored: int | None = None) -> np.ndarray:
    """float64 NLL of every target p of `tokens` at index p (index 0 is 0), each scored exactly once.

    `stepper.eval_step(params, batch)` scores each batch on the devices (params in the
    stepper's layout); two batches stay in flight while the host adds up earlier ones.
    The training loop's validation and `jaxlm eval` both come through here.
    """
    win = Windows(len(tokens), seq_len, stride)
    nll = np.zeros(len(tokens), np.float64)
    seen = np.zeros(len(tokens), np.int32)
    n_batches = -(-win.count // batch_size)
    pending = []
    t0 = last = time.perf_counter()

    def drain(keep: int):
        while len(pending) > keep:
            ids, out = pending.pop(0)
            pos, scored = win.positions(ids)
            got = np.asarray(jax.device_get(out), np.float64).reshape(pos.shape)  # pmap: [devices, rows, T]
            np.add.at(nll, pos[scored], got[scored])
            np.add.at(seen, pos[scored], 1)

    batches = window_batches(tokens, batch_size, seq_len, stride, 0, stepper.local_rows(batch_size), eos_id,
                             unscored)
    for b, (ids, local) in enumerate(batches):
        pending.append((ids, stepper.eval_step(params, stepper.place(local, batch_size))))
        drain(2)
        if log and time.perf_counter() - last > 10:
            last = time.perf_counter()
            log(f"  batch {b + 1}/{n_batches} ({(b + 1) / n_batches:.0%}, {last - t0:.0f}s)")
    drain(0)
    if seen[0] or np.any(seen[1:] != 1):
        raise AssertionError(f"evaluation windows scored {int(np.sum(seen[1:] != 1))} targets other than once")
    return nll


def validate(stepper, params, split: Split, cfg: Config, eos_id: int, unscored: int | None = None) -> dict:
    """The training loop's validation pass: `score` and `summarize` exactly as `jaxlm eval` runs them
    on the run's own validation split (windows of train.seq_len, 95% intervals over documents or
    blocks of train.seq_len targets), as `eval_*` metrics. eval.max_batches scores only the
    first batches, and then there is no bits per byte (bytes are known for the whole split)."""
    T, B = cfg.train.seq_len, cfg.eval.batch_size or cfg.train.batch_size
    if cfg.eval.max_batches:
        n = min(len(split.tokens), cfg.eval.max_batches * B * T + 1)
        split = Split(split.label, split.tokens[:n], 0 if n < len(split.tokens) else split.bytes, split.documents)
    nll = score(stepper, params, split.tokens, T, None, B, eos_id if cfg.data.segment_ids else None,
                unscored=unscored)
    res = summarize(nll, split, eos_id, "auto", T, unscored)
    keys = ["loss", "ppl", "tokens", "loss_ci95", "ppl_ci95"] + (["bpb", "bpb_ci95"] if split.bytes else [])
    return {f"eval_{k}": res[k] for k in keys if k in res}


def validate_examples(stepper, params, ex, cfg: Config) -> dict:
    """The training loop's validation of fine-tuning examples: the loss over their trained targets
    (data.loss_on), with a 95% interval over examples, as `eval_*` metrics."""
    from jaxlm.tasks import score_examples

    sums, counts = score_examples(stepper, params, ex, cfg.train.seq_len, cfg.eval.batch_size or cfg.train.batch_size)
    loss = float(sums.sum() / max(counts.sum(), 1))
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(counts.sum()),
           "eval_examples": len(ex)}
    ci = ratio_interval(sums[counts > 0], counts[counts > 0])
    if ci is not None:
        out["eval_loss_ci95"] = list(ci)
    return out


def each_checkpoint(o, all_checkpoints: bool, log):
    """(step, params, time its restore began) of each checkpoint `open_checkpoints` chose; with
    `all_checkpoints` one that does not restore is skipped with a warning."""
    for s in o.steps:
        t0 = time.perf_counter()
        try:
            params, _, s = ckpt.restore_params(o.run_dir, s, o.target, log)
        except CheckpointError as e:
            if not all_checkpoints:
                raise
            log(f"warning: skipping checkpoint {s}: {e}")
            continue
        yield s, params, t0
        del params


def evaluate_task(path: str, task_file: str, *, fewshot: int = 0, seq_len: int = 0, all_checkpoints: bool = False,
                  overrides: list[str] | tuple[str, ...] = (), devices=None, write: bool = True,
                  log=None) -> list[dict]:
    """Multiple-choice accuracy (`jaxlm.tasks`) of the checkpoint(s) at `path`; each result is stored
    as <run>/eval/task-<name>-step<N>.json with every example's prediction."""
    from jaxlm import tasks

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    task = tasks.read_task(task_file, fewshot)  # bad input fails before any checkpoint is opened
    o = open_checkpoints(path, overrides, devices, all_checkpoints)
    T = seq_len or o.cfg.model.max_seq_len  # lm-eval's max_length on an export (config.json)
    if T > o.cfg.model.max_seq_len:
        raise ConfigError(f"context length {T} is longer than the model's max_seq_len {o.cfg.model.max_seq_len}")
    results = []
    for s, params, t0 in each_checkpoint(o, all_checkpoints, log):
        t1 = time.perf_counter()
        res = tasks.score_task(o.stepper, params, o.tokenizer, task, T, o.cfg.eval.batch_size)
        res = {"run_dir": o.run_dir, "step": s, "task": task_file, "fewshot": fewshot, "context": T, **res,
               "restore_s": t1 - t0, "eval_s": time.perf_counter() - t1, "tokenizer_sha256": o.tokenizer.sha256,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        results.append(res)
        if write and jax.process_index() == 0:
            files.write_json(os.path.join(o.run_dir, "eval", f"task-{files.slug(task.name)}-step{s}.json"), res)
        log(f"checkpoint {s}: acc {res['acc']:.4f}, acc_norm {res['acc_norm']:.4f} over {res['examples']} examples "
            f"({res['eval_s']:.1f}s)")
    if not results:
        raise CheckpointError(f"no checkpoint of {o.run_dir} could be evaluated")
    return results


def task_table(results: list[dict]) -> str:
    lines = [f"{'step':>8} {'examples':>8} {'acc':>7} {'acc 95% CI':>15} {'acc_norm':>8} {'acc_norm 95% CI':>15}"]
    for r in results:
        lines.append(f"{r['step']:>8} {r['examples']:>8} {r['acc']:>7.4f} {'{:.3f}..{:.3f}'.format(*r['acc_ci95']):>15}"
                     f" {r['acc_norm']:>8.4f} {'{:.3f}..{:.3f}'.format(*r['acc_norm_ci95']):>15}")
    lines.append(f"task: {results[0]['task']}; {results[0]['fewshot']}-shot; 95% Wilson intervals over examples")
    return "\n".join(lines)


def evaluate(path: str, *, data: str | None = None, split: str | None = None, seq_len: int = 0,
             stride: int = 0, all_checkpoints: bool = False, ci_unit: str = "auto", ci_block: int = 0,
             overrides: list[str] | tuple[str, ...] = (), devices=None, write: bool = True,
             log=None) -> list[dict]:
    """Evaluate the checkpoint at `path` (a run directory: its newest usable one, or every one
    with `all_checkpoints`; or <run>/checkpoints/<step>). Returns one result dict per checkpoint
    and, with `write`, stores each as JSON under <run>/eval/.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    o = open_checkpoints(path, overrides, devices, all_checkpoints)
    run_dir, cfg, tok, mesh = o.run_dir, o.cfg, o.tokenizer, o.mesh
    if cfg.data.format == "sft" and data is None:
        if seq_len or stride:
            raise ConfigError("a fine-tuning run's examples are scored as it trained on them: --context and "
                              "--stride apply to --data")
        return _evaluate_examples(o, split or "validation", all_checkpoints, write, log)
    T = seq_len or cfg.train.seq_len
    if T > cfg.model.max_seq_len:
        raise ConfigError(f"context length {T} is longer than the model's max_seq_len {cfg.model.max_seq_len}")
    evaluated = load_split(cfg, tok, data, split, log)
    win = Windows(len(evaluated.tokens), T, stride or None)  # the same windows for every checkpoint
    eos = tok.start_id if cfg.data.segment_ids else None
    B = cfg.eval.batch_size
    block = ci_block or T
    shape = {k: int(v) for k, v in mesh.shape.items()}
    results = []
    for s, params, t0 in each_checkpoint(o, all_checkpoints, log):
        t1 = time.perf_counter()
        nll = score(o.stepper, params, evaluated.tokens, T, stride or None, B, eos, log, unscored_id(tok))
        dt = time.perf_counter() - t1
        res = {"run_dir": run_dir, "step": s, "data": evaluated.label, "context": T, "stride": win.stride,
               "min_context": win.min_context, "windows": win.count, "batch_size": B, "mesh": shape,
               **summarize(nll, evaluated, tok.start_id, ci_unit, block, unscored_id(tok)),
               "restore_s": t1 - t0, "eval_s": dt, "tokens_per_s": (len(evaluated.tokens) - 1) / dt,
               "tokenizer_sha256": tok.sha256, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        results.append(res)
        if write and jax.process_index() == 0:
            _write(run_dir, res, f"step{s}")
        log(f"checkpoint {s}: loss {res['loss']:.4f}, {res['bpb']:.4f} bits/byte over {res['tokens']:,} tokens "
            f"({dt:.1f}s)")
    if not results:
        raise CheckpointError(f"no checkpoint of {run_dir} could be evaluated")
    if write and all_checkpoints and jax.process_index() == 0:
        _write(run_dir, {"data": evaluated.label, "results": results}, "all")
    return results


def _evaluate_examples(o, split: str, all_checkpoints: bool, write: bool, log) -> list[dict]:
    """A fine-tuning run (data.format=sft) on its own examples: the loss over their trained targets,
    as its validation reports it (`validate_examples`); there is no bits per byte."""
    from jaxlm.data import examples

    if split not in ("validation", "train"):
        raise DataError(f"--split {split}: a fine-tuning run's examples have the splits validation and train")
    train, valid = examples.load(o.cfg.data, o.tokenizer, o.cfg.train.seq_len)
    ex = valid if split == "validation" else train
    source = (o.cfg.data.valid_source if split == "validation" else "") or o.cfg.data.source
    T = o.cfg.train.seq_len
    results = []
    for s, params, t0 in each_checkpoint(o, all_checkpoints, log):
        t1 = time.perf_counter()
        ev = validate_examples(o.stepper, params, ex, o.cfg)
        res = {"run_dir": o.run_dir, "step": s, "data": f"{split} examples of {source}", "context": T,
               "stride": T, "tokens": ev["eval_tokens"], "bytes": 0, "documents": len(ex), "loss": ev["eval_loss"],
               "ppl": ev["eval_ppl"], "bpb": float("nan"), "ci_unit": f"{len(ex)} examples",
               "mesh": {k: int(v) for k, v in o.mesh.shape.items()}, "restore_s": t1 - t0,
               "eval_s": time.perf_counter() - t1, "tokenizer_sha256": o.tokenizer.sha256,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if "eval_loss_ci95" in ev:
            res.update(loss_ci95=ev["eval_loss_ci95"], ppl_ci95=[math.exp(min(v, 700.0)) for v in ev["eval_loss_ci95"]])
        results.append(res)
        if write and jax.process_index() == 0:
            _write(o.run_dir, res, f"step{s}")
        log(f"checkpoint {s}: loss {res['loss']:.4f} over the {res['tokens']:,} trained tokens of {len(ex)} examples")
    return results


def _write(run_dir: str, record: dict, name: str) -> str:
    """<run>/eval/<name>-<data>[-ctxT-strideS].json, written to a temporary file and renamed."""
    r = record if "context" in record else record["results"][0]
    suffix = f"-ctx{r['context']}-stride{r['stride']}" if r["stride"] != r["context"] else ""
    out_dir = os.path.join(run_dir, "eval")
    path = os.path.join(out_dir, f"{name}-{files.slug(record['data'])}{suffix}.json")
    files.write_json(path, record)
    return path


def table(results: list[dict]) -> str:
    """A plain-text table of results, one line per checkpoint."""
    head = f"{'step':>8} {'tokens':>10} {'bytes':>11} {'loss':>8} {'loss 95% CI':>19} {'ppl':>10} {'bits/byte':>9} " \
           f"{'bpb 95% CI':>17}"
    lines = [head]
    for r in results:
        lci = "{:.4f}..{:.4f}".format(*r["loss_ci95"]) if "loss_ci95" in r else "-"
        bci = "{:.4f}..{:.4f}".format(*r["bpb_ci95"]) if "bpb_ci95" in r else "-"
        lines.append(f"{r['step']:>8} {r['tokens']:>10,} {r['bytes']:>11,} {r['loss']:>8.4f} {lci:>19} "
                     f"{r['ppl']:>10.3f} {r['bpb']:>9.4f} {bci:>17}")
    first = results[0]
    lines.append(f"data: {first['data']}; context {first['context']}, stride {first['stride']}; "
                 f"95% CI over {first['ci_unit']}; mesh {first['mesh']}")
    return "\n".join(lines)
