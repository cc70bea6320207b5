"""run(cfg): data, mesh, sharded state, the training loop, evaluation, metrics, checkpoints.

`run` is callable in-process (sweeps call it many times): it keeps no global state, takes
its devices as an argument, and returns a summary instead of exiting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.config import Config, check_vocab, load_config, to_yaml
from jaxlm.data import cache
from jaxlm.data.loader import Prefetch, TrainBatches, eval_batches
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.metrics import MetricsWriter, Throughput, count_params, flops_per_token, peak_flops, read_metrics
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build

@dataclass
class Data:
    tokenizer: Tokenizer
    train_streams: list[np.ndarray]  # one EOS-joined token stream per source of the mixture
    weights: list[float]
    valid_tokens: np.ndarray
    valid_bytes: int
    train_bytes: int


@dataclass
class RunResult:
    run_dir: str
    steps: int
    eval_loss: float | None = None
    eval_bpb: float | None = None
    stopped_by_signal: bool = False
    history: list[dict] = field(default_factory=list)


def prepare_data(cfg: Config, log=print) -> Data:
    """Tokenizer and token streams, from the token cache when sources and tokenizer are unchanged."""
    t0 = time.perf_counter()
    train_parts, weights, valid_parts = cache.parts(cfg.data)
    tok = cache.get_tokenizer(cfg.data, train_parts, log)
    train = [cache.tokens(cfg.data, tok, p, "train", log) for p in train_parts]
    valid = [cache.tokens(cfg.data, tok, p, "valid", log) for p in valid_parts]
    valid_tokens = valid[0][0] if len(valid) == 1 else np.concatenate([v for v, _ in valid])
    data = Data(tok, [t for t, _ in train], weights, valid_tokens, sum(m["bytes"] for _, m in valid),
                sum(m["bytes"] for _, m in train))
    n_train = sum(len(t) for t in data.train_streams)
    log(f"data: {sum(m['documents'] for _, m in train)} train / {sum(m['documents'] for _, m in valid)} valid "
        f"documents, {n_train:,} / {len(valid_tokens):,} tokens, vocab {tok.vocab_size}, "
        f"{data.train_bytes / max(n_train, 1):.2f} bytes/token ({time.perf_counter() - t0:.1f}s)")
    if len(train) > 1:
        log("mixture: " + ", ".join(f"{p.source} weight {w / sum(weights):.3f} ({len(t):,} tokens)"
                                    for p, w, t in zip(train_parts, weights, data.train_streams)))
    return data


# Keys that shape the train state or the token ids: a run cannot resume across a change in them.
STATE_KEYS = ("model.family", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
              "model.n_kv_heads", "model.d_ff", "model.max_seq_len", "model.bias", "model.tie_embeddings",
              "model.scan_layers", "optim.grad_clip", "optim.decay_embeddings", "data.tokenizer_vocab",
              "data.tokenizer_type", "data.tokenizer_max_bytes")


def _flat(cfg: Config) -> dict:
    return {f"{sec}.{k}": v for sec in ("model", "optim", "data")
            for k, v in dataclasses.asdict(getattr(cfg, sec)).items()}


def _resume_point(cfg: Config, restart: bool) -> int | None:
    """The checkpoint step to resume from, None for a fresh run; refuses what cannot resume."""
    run_dir = cfg.run.path
    if restart or not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return None
    done = ckpt.steps(run_dir)
    if not done:
        raise ConfigError(f"run directory '{run_dir}' holds a run but no complete checkpoint to resume from; "
                          f"pass --restart (run(..., restart=True)) to start it over, or choose another "
                          f"run.name / run.dir")
    saved = load_config(os.path.join(run_dir, "config.yaml"))
    old, new = _flat(saved), _flat(cfg)
    differ = [k for k in STATE_KEYS if old[k] != new[k] and not (k.startswith("data.") and cfg.data.tokenizer)]
    if differ:
        raise ConfigError(f"run directory '{run_dir}' cannot resume with a different " + ", ".join(
            f"{k} ({old[k]!r} -> {new[k]!r})" for k in differ) + "; pass --restart to start over, or choose "
            "another run.name / run.dir")
    return done[-1]


def _prepare_run_dir(cfg: Config, restart: bool) -> str:
    run_dir = cfg.run.path
    if restart and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"run directory '{run_dir}' is not writable")
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    return run_dir


def _truncate_metrics(run_dir: str, start: int) -> None:
    """Drop records of steps at or after `start` (written after the checkpoint a run resumes from)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    kept = [r for r in read_metrics(run_dir) if r.get("step", -1) < start]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def evaluate(stepper: Stepper, state, data: Data, cfg: Config) -> dict[str, float]:
    """Loss over the whole validation stream (every token once) and bits per byte."""
    bs = cfg.eval.batch_size or cfg.train.batch_size
    pc, pi = jax.process_count(), jax.process_index()
    total_nll = total_count = 0.0
    sums = [stepper.evaluate(state, stepper.place(b, bs))
            for b in eval_batches(data.valid_tokens, bs, cfg.train.seq_len, cfg.eval.max_batches, pi, pc,
                                  _eos(cfg, data))]
    for s in jax.device_get(sums):
        total_nll += float(s["sum_nll"])
        total_count += float(s["count"])
    loss = total_nll / total_count
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(total_count)}
    if not cfg.eval.max_batches:  # bytes are only known for the whole split
        out["eval_bpb"] = total_nll / math.log(2) / data.valid_bytes
    return out


def _eos(cfg: Config, data: Data) -> int | None:
    """The id that starts a document, when batches carry segment ids."""
    return data.tokenizer.eos_id if cfg.data.segment_ids else None


def _plan(cfg: Config, stepper: Stepper, state, vocab: int, mesh, compile_s: float, log) -> float:
    counts = count_params(stepper.params(state))
    fpt = flops_per_token(cfg.model, counts, vocab, cfg.train.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    log(f"model: {cfg.model.family} d={cfg.model.d_model} layers={cfg.model.n_layers} heads={cfg.model.n_heads}"
        f"/{cfg.model.kv_heads} vocab={vocab} dtype={cfg.model.dtype} remat={cfg.model.remat}")
    log(f"params: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding")
    log(f"flops/token: {fpt / 1e6:.2f} M; tokens/step: {tokens_per_step:,} "
        f"({cfg.train.batch_size} x {cfg.train.seq_len}, {cfg.train.grad_accum} microbatches); "
        f"training tokens: {tokens_per_step * cfg.train.steps:,}")
    log(f"mesh: {shape} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices, "
        f"backend {cfg.mesh.backend}; compiled in {compile_s:.1f}s")
    mem = stepper.compiled_memory
    if mem is not None:
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes)
        log(f"memory per device (compiled step): {total / 2**20:.1f} MiB "
            f"(state+batch {mem.argument_size_in_bytes / 2**20:.1f}, temp {mem.temp_size_in_bytes / 2**20:.1f})")
    return fpt


class _Stop:
    """Set by SIGTERM/SIGINT; the loop finishes its step, checkpoints and returns."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def run(cfg: Config, *, devices=None, restart: bool = False, handle_signals: bool = False, log=None) -> RunResult:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    devices = list(jax.devices() if devices is None else devices)
    mesh = make_mesh(cfg, devices)  # config errors before any data or compile work
    start = _resume_point(cfg, restart)
    data_cfg = cfg
    if start is not None and not cfg.data.tokenizer:  # the run's own tokenizer, never a retrained one
        data_cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, tokenizer=os.path.join(cfg.run.path, "tokenizer.model")))
    data = prepare_data(data_cfg, log)  # bad input fails here, before the run directory is touched
    vocab = check_vocab(cfg, data.tokenizer.vocab_size, mesh.shape["tensor"])
    run_dir = _prepare_run_dir(cfg, restart)
    if start is None:
        data.tokenizer.save(os.path.join(run_dir, "tokenizer.model"))

    model, tx, schedule = build(cfg, vocab)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    if start is None:
        start = 0
        state = stepper.init_state(cfg.train.seed)
    else:
        t0 = time.perf_counter()
        state, meta = ckpt.restore(run_dir, start, stepper.restore_target())
        state = stepper.adopt(state)
        if meta.get("tokenizer_sha256") not in (None, "", data.tokenizer.sha256):
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer run '{run_dir}' was "
                              f"trained with; drop data.tokenizer to use the run's own")
        _truncate_metrics(run_dir, start)
        log(f"resuming {run_dir} from its checkpoint at step {start} (restored in {time.perf_counter() - t0:.1f}s)")
    B, T = cfg.train.batch_size, cfg.train.seq_len
    batch_keys = ("inputs", "targets") + (("segment_ids", "positions") if cfg.data.segment_ids else ())
    compile_s = stepper.compile(state, {k: (B, T) for k in batch_keys})
    fpt = _plan(cfg, stepper, state, vocab, mesh, compile_s, log)
    peak = peak_flops(devices[0], cfg.run.peak_tflops)

    loader = TrainBatches(data.train_streams, B, T, cfg.train.seed, jax.process_index(), jax.process_count(),
                          data.weights, _eos(cfg, data))
    writer = MetricsWriter(run_dir, cfg.run.tensorboard and jax.process_index() == 0)
    saver = ckpt.Saver(run_dir, cfg, data.tokenizer.sha256) if cfg.checkpoint.enabled else None
    stop = _Stop()
    old_handlers = {}
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, stop)

    result = RunResult(run_dir=run_dir, steps=0)
    bar = None
    if cfg.run.progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, unit="step", dynamic_ncols=True)
    throughput = Throughput()
    pending = None  # (step, metrics on device): fetched one step late
    log_every, steps = cfg.train.log_every, cfg.train.steps
    prefetch = Prefetch(lambda s: stepper.place(loader.batch_at(s), B), start, steps, cfg.data.prefetch)
    mark = [0.0, time.perf_counter(), start - 1]  # input wait, time and step at the last record

    def flush(item):
        step, metrics = item
        m = jax.device_get(metrics)
        tok_s = throughput.update(step, B * T)
        now, wait = time.perf_counter(), prefetch.wait_s
        dw, dt, n = wait - mark[0], now - mark[1], step - mark[2]
        mark[:] = [wait, now, step]
        rec = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": (step + 1) * B * T, "tokens_per_s": tok_s, "input_wait_s": dw / max(n, 1),
               "input_wait_frac": dw / dt if dt > 0 else 0.0}
        if peak and tok_s:
            rec["mfu"] = fpt * tok_s / (peak * mesh.devices.size)
        writer.write(rec)
        result.history.append(rec)
        desc = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {tok_s:,.0f} tok/s" + (
            f" mfu {rec['mfu']:.1%}" if "mfu" in rec else "")
        if bar is not None:
            bar.set_postfix_str(desc, refresh=False)
        else:
            log(f"step {step + 1}/{steps} {desc}")

    def run_eval(step: int):
        t0 = time.perf_counter()
        ev = evaluate(stepper, state, data, cfg)
        rec = {"step": step, **ev, "eval_s": time.perf_counter() - t0}
        writer.write(rec)
        result.history.append(rec)
        result.eval_loss, result.eval_bpb = ev["eval_loss"], ev.get("eval_bpb")
        msg = f"eval @ step {step + 1}: loss {ev['eval_loss']:.4f}" + (
            f", {ev['eval_bpb']:.4f} bits/byte" if "eval_bpb" in ev else "") + f" ({rec['eval_s']:.1f}s)"
        (bar.write if bar is not None else log)(msg)
        throughput.update(step, 0)  # evaluation time is not training throughput
        mark[:] = [prefetch.wait_s, time.perf_counter(), step]

    step = start - 1
    t_loop = time.perf_counter()
    try:
        for step in range(start, steps):
            state, metrics = stepper.train(state, prefetch.get(step))
            if pending is not None:
                flush(pending)
                pending = None
            if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
                pending = (step, metrics)
            if bar is not None:
                bar.update(1)
            last = step + 1 == steps
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last:
                if pending is not None:
                    flush(pending)
                    pending = None
                run_eval(step)
            if saver and cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and not last:
                saver.save(step + 1, state, stepper)
            if stop.requested:
                break
        if pending is not None:
            flush(pending)
        result.steps = step + 1
        if stop.requested:
            result.stopped_by_signal = True
            log(f"stopping after step {step + 1} on a signal")
        else:
            run_eval(step)
        if saver:
            saver.save(step + 1, state, stepper)
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
        if saver:
            saver.close()
        writer.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    loop_s = time.perf_counter() - t_loop
    log(f"done: {result.steps} steps in {time.perf_counter() - t_start:.1f}s (training loop {loop_s:.1f}s, of which "
        f"{prefetch.wait_s:.2f}s waiting for input); run directory {run_dir}")
    return result
