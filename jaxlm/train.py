"""run(cfg): data, mesh, sharded state, the training loop, evaluation, metrics, checkpoints.

`run` is callable in-process (sweeps call it many times): it keeps no global state, takes
its devices as an argument, and returns a summary instead of exiting.
"""

from __future__ import annotations

import dataclasses
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
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.errors import CheckpointError, ConfigError, DivergedError
from jaxlm.metrics import (MetricsWriter, Throughput, count_params, flops_per_token, peak_flops, read_metrics,
                           truncate_metrics)
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


def prepare_data(cfg: Config, log=print, tokenizer: Tokenizer | None = None) -> Data:
    """Tokenizer and token streams, from the token cache when sources and tokenizer are unchanged.

    `tokenizer` (a resumed run's own) takes the place of data.tokenizer or a trained one.
    """
    t0 = time.perf_counter()
    train_parts, weights, valid_parts = cache.parts(cfg.data)
    tok = tokenizer or cache.get_tokenizer(cfg.data, train_parts, log)
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


def _state_key_changes(old: Config, new: Config, keys=STATE_KEYS) -> list[str]:
    o, n = _flat(old), _flat(new)
    return [f"{k} ({o[k]!r} -> {n[k]!r})" for k in keys
            if o[k] != n[k] and not (k.startswith("data.") and new.data.tokenizer)]


def _existing_checkpoints(cfg: Config, restart: bool, resume: bool) -> list[int]:
    """Committed checkpoint steps to resume from ([] for a fresh run); refuses what cannot resume."""
    run_dir = cfg.run.path
    if restart:
        return []
    done = ckpt.steps(run_dir)
    if not done:
        if resume:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt.checkpoint_dir(run_dir)} to resume from; "
                                  "drop --resume to start a new run there, or point run.dir at the run")
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and read_metrics(run_dir):
            raise ConfigError(f"run directory '{run_dir}' holds a run but no complete checkpoint to resume from; "
                              f"pass --restart (run(..., restart=True)) to start it over, or choose another "
                              f"run.name / run.dir")
        return []
    saved_cfg = os.path.join(run_dir, "config.yaml")
    differ = _state_key_changes(load_config(saved_cfg), cfg) if os.path.exists(saved_cfg) else []
    if differ:
        raise ConfigError(f"run directory '{run_dir}' cannot resume with a different " + ", ".join(differ)
                          + "; pass --restart to start over, or choose another run.name / run.dir")
    return done


def _run_tokenizer(run_dir: str, done: list[int]) -> Tokenizer:
    """The tokenizer a run was trained with: its tokenizer.model, else the copy inside its newest checkpoint."""
    path = os.path.join(run_dir, "tokenizer.model")
    if os.path.exists(path):
        return load_tokenizer(path)
    errors = []
    for step in reversed(done):
        try:
            return Tokenizer(ckpt.read_tokenizer(run_dir, step))
        except CheckpointError as e:
            errors.append(str(e))
    raise CheckpointError(f"run '{run_dir}' has no tokenizer.model and no checkpoint with a readable tokenizer: "
                          + "; ".join(errors))


@dataclass
class _InitSource:
    run_dir: str
    step: int | None
    tokenizer: Tokenizer


def _init_source(cfg: Config) -> _InitSource:
    """Where `checkpoint.init_from` points, checked against this run's model before any work."""
    src_dir, step = ckpt.resolve(cfg.checkpoint.init_from)
    done = ckpt.steps(src_dir)
    if not done or (step is not None and step not in done):
        raise CheckpointError(f"checkpoint.init_from={cfg.checkpoint.init_from}: no committed checkpoint "
                              + (f"{step} " if step is not None else "") + f"in {ckpt.checkpoint_dir(src_dir)}")
    model_keys = tuple(k for k in STATE_KEYS if k.startswith("model."))
    src_cfg_path = os.path.join(src_dir, "config.yaml")
    if os.path.exists(src_cfg_path):
        differ = _state_key_changes(load_config(src_cfg_path), cfg, model_keys)
        if differ:
            raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} has a different model: "
                              + ", ".join(differ) + "; use the same model.* keys as that run")
    tok = _run_tokenizer(src_dir, done if step is None else [step])
    if cfg.data.tokenizer and load_tokenizer(cfg.data.tokenizer).sha256 != tok.sha256:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of {src_dir}; drop "
                          "data.tokenizer to use that run's own (token ids must mean the same)")
    return _InitSource(src_dir, step, tok)


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


def evaluate(stepper: Stepper, state, data: Data, cfg: Config) -> dict[str, float]:
    """Loss over the whole validation stream (every token once) and bits per byte."""
    bs = cfg.eval.batch_size or cfg.train.batch_size
    pc, pi = jax.process_count(), jax.process_index()
    total_nll = total_count = 0.0
    sums = [stepper.evaluate(state, stepper.place(b, bs))
            for b in eval_batches(data.valid_tokens, bs, cfg.train.seq_len, cfg.eval.max_batches, pi, pc,
                                  _eos(cfg, data))]
    for s in jax.device_get(sums):
        total_nll += float(np.sum(s["sum_nll"]))  # pmap: one sum per device
        total_count += float(np.sum(s["count"]))
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
        self.at = 0.0

    def __call__(self, signum, frame):
        if not self.requested:
            self.requested, self.at = True, time.perf_counter()


def run(cfg: Config, *, devices=None, restart: bool = False, resume: bool = False, handle_signals: bool = False,
        log=None, inject_nan=()) -> RunResult:
    """Train `cfg` for cfg.train.steps, continuing its run directory when that holds checkpoints.

    restart: start an existing run directory over. resume: require a checkpoint to continue from.
    handle_signals: SIGTERM/SIGINT finish the current step, commit a checkpoint and return
    with `stopped_by_signal`. inject_nan: data positions whose gradients are made NaN (a
    test hook for the numerics guard). Raises JaxlmError for bad input and DivergedError
    when more than train.max_bad_steps steps in a row are non-finite.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if restart and resume:
        raise ConfigError("restart and resume exclude each other")
    t_start = time.perf_counter()
    devices = list(jax.devices() if devices is None else devices)
    mesh = make_mesh(cfg, devices)  # config errors before any data or compile work
    done = _existing_checkpoints(cfg, restart, resume)
    init = _init_source(cfg) if cfg.checkpoint.init_from and not done else None
    tokenizer = init.tokenizer if init else None
    if done and not cfg.data.tokenizer:  # the run's own tokenizer, never a retrained one
        tokenizer = _run_tokenizer(cfg.run.path, done)
    data = prepare_data(cfg, log, tokenizer)  # bad input fails here, before the run directory is touched
    vocab = check_vocab(cfg, data.tokenizer.vocab_size, mesh.shape["tensor"])
    run_dir = _prepare_run_dir(cfg, restart)
    tok_path = os.path.join(run_dir, "tokenizer.model")
    if not done or not os.path.exists(tok_path):
        data.tokenizer.save(tok_path)
    saver = ckpt.Saver(run_dir, cfg, data.tokenizer.proto) if cfg.checkpoint.enabled else None  # fails if unwritable

    try:  # close the checkpoint manager if anything before the loop fails
        model, tx, schedule = build(cfg, vocab)
        stepper = Stepper(cfg, model, tx, schedule, mesh)
        counters = {"offset": 0, "skipped": 0, "rollbacks": 0}  # data position = step + offset
        if done:
            t0 = time.perf_counter()
            start, state, meta, damaged = ckpt.restore_latest(run_dir, stepper.restore_target(), log)
            if jax.process_index() == 0:
                for s in damaged:
                    log(f"moved damaged checkpoint {s} to {ckpt.quarantine(run_dir, s)}")
            if damaged and saver:
                saver.manager.reload()  # forget the moved steps, so they can be written again
            state = stepper.adopt(state)
            if meta.get("tokenizer_sha256") not in (None, "", data.tokenizer.sha256):
                raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer run '{run_dir}' was "
                                  f"trained with; drop data.tokenizer to use the run's own")
            counters.update(offset=meta.get("data_position", start) - start, skipped=meta.get("skipped_steps", 0),
                            rollbacks=meta.get("rollbacks", 0))
            truncate_metrics(run_dir, start)
            log(f"resuming {run_dir} from its checkpoint at step {start} (restored in {time.perf_counter() - t0:.1f}s)")
        else:
            start = 0
            state = stepper.init_state(cfg.train.seed)
            if init:
                t0 = time.perf_counter()
                params, _, from_step = ckpt.restore_params(init.run_dir, init.step, stepper.restore_target().params,
                                                                log)
                state = stepper.with_params(state, params)
                log(f"initialised params from {init.run_dir} step {from_step} (fresh optimizer, step 0; "
                    f"{time.perf_counter() - t0:.1f}s)")
        B, T = cfg.train.batch_size, cfg.train.seq_len
        poison = frozenset(int(p) for p in inject_nan)
        batch_keys = (("inputs", "targets") + (("segment_ids", "positions") if cfg.data.segment_ids else ())
                      + (("poison",) if poison else ()))
        compile_s = stepper.compile(state, {k: (B, T) for k in batch_keys})
        fpt = _plan(cfg, stepper, state, vocab, mesh, compile_s, log)
        peak = peak_flops(devices[0], cfg.run.peak_tflops)

    except BaseException:
        if saver:
            saver.close()
        raise

    loader = TrainBatches(data.train_streams, B, T, cfg.train.seed, jax.process_index(), jax.process_count(),
                          data.weights, _eos(cfg, data))
    writer = MetricsWriter(run_dir, cfg.run.tensorboard and jax.process_index() == 0)
    stop = _Stop()
    old_handlers = {}
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, stop)

    result = RunResult(run_dir=run_dir, steps=0)
    bar = None
    if cfg.run.progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)
    throughput = Throughput()
    log_every, steps = cfg.train.log_every, cfg.train.steps

    def open_prefetch(first: int) -> Prefetch:
        offset = counters["offset"]

        def make(s):
            batch = loader.batch_at(s + offset)
            if poison:
                batch["poison"] = np.full(batch["inputs"].shape, int(s + offset in poison), np.int32)
            return stepper.place(batch, B)

        return Prefetch(make, first, steps, cfg.data.prefetch)

    prefetch = open_prefetch(start)
    waited = [0.0]  # input wait of prefetchers closed by rollbacks

    def total_wait() -> float:
        return waited[0] + prefetch.wait_s

    mark = [0.0, time.perf_counter(), start - 1]  # input wait, time and step at the last record

    def flush(item):
        step, metrics = item
        m = jax.device_get(metrics)
        tok_s = throughput.update(step, B * T)
        now, wait = time.perf_counter(), total_wait()
        dw, dt, n = wait - mark[0], now - mark[1], step - mark[2]
        mark[:] = [wait, now, step]
        rec = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": (step + 1) * B * T, "tokens_per_s": tok_s, "input_wait_s": dw / max(n, 1),
               "input_wait_frac": dw / dt if dt > 0 else 0.0, "skipped_steps": counters["skipped"]}
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

    def run_eval(state, step: int):
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
        mark[:] = [total_wait(), time.perf_counter(), step]

    def save(state, at: int):
        saver.save(at, state, stepper, data_position=at + counters["offset"], skipped_steps=counters["skipped"],
                   rollbacks=counters["rollbacks"])

    streak = [0]  # consecutive non-finite steps

    def settle(item) -> bool:
        """Count a step whose loss or gradient was not finite; True once more than max_bad_steps in a row."""
        s, m = item
        if bool(jax.device_get(m["finite"])):
            streak[0] = 0
            return False
        streak[0] += 1
        counters["skipped"] += 1
        loss, gnorm = (float(v) for v in jax.device_get((m["loss"], m["grad_norm"])))
        (bar.write if bar is not None else log)(
            f"warning: step {s + 1} (data position {s + counters['offset']}): loss {loss}, grad norm {gnorm}; "
            f"skipped ({streak[0]} in a row, {counters['skipped']} in all)")
        return streak[0] > cfg.train.max_bad_steps

    diverged = ""
    pending = None  # (step, metrics) of a step to log: fetched one step late
    unsettled = None  # (step, metrics) whose finiteness is read one step late
    step = start
    t_loop = time.perf_counter()
    try:
        while step < steps:
            state, metrics = stepper.train(state, prefetch.get(step))
            over = settle(unsettled) if unsettled is not None else False  # while this step runs
            unsettled = (step, metrics)
            if pending is not None and not over:
                flush(pending)
                pending = None
            last = step + 1 == steps
            save_now = bool(saver and cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0)
            if not over and (save_now or last or stop.requested):
                over, unsettled = settle(unsettled), None
            if over:
                bad_to = step + counters["offset"]  # the newest data position already used
                latest = saver.manager.latest_step() if saver else None
                if cfg.train.on_bad_steps == "rollback" and latest is not None \
                        and counters["rollbacks"] < cfg.train.max_rollbacks:
                    saver.wait()
                    pending = unsettled = state = None
                    prefetch.close()
                    waited[0] += prefetch.wait_s
                    step, state, _, _ = ckpt.restore_latest(run_dir, stepper.restore_target(), log)
                    state = stepper.adopt(state)
                    first_skipped = step + counters["offset"]
                    counters["offset"] = bad_to + 1 - step
                    counters["rollbacks"] += 1
                    streak[0] = 0
                    writer.truncate(step)
                    result.history = [r for r in result.history if r["step"] < step]
                    log(f"rollback {counters['rollbacks']}/{cfg.train.max_rollbacks}: back to the checkpoint at "
                        f"step {step}, skipping data positions {first_skipped}..{bad_to}")
                    prefetch = open_prefetch(step)
                    throughput.update(step - 1, 0)
                    mark[:] = [total_wait(), time.perf_counter(), step - 1]
                    if bar is not None:
                        bar.reset(total=steps)
                        bar.update(step)
                    continue
                diverged = (f"stopping at step {step + 1}: more than train.max_bad_steps="
                            f"{cfg.train.max_bad_steps} steps in a row had a non-finite loss or gradient"
                            + (f" after {counters['rollbacks']} rollbacks" if counters["rollbacks"] else "")
                            + "; no checkpoint holds a non-finite value. Lower optim.lr, raise "
                            "optim.warmup_steps, or set train.on_bad_steps=rollback to skip the batches")
                step += 1
                break
            if (step + 1) % log_every == 0 or step == 0 or last:
                pending = (step, metrics)
            if bar is not None:
                bar.update(1)
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last:
                if pending is not None:
                    flush(pending)
                    pending = None
                run_eval(state, step)
            if save_now and not last:
                save(state, step + 1)
            step += 1
            if stop.requested:
                break
        if pending is not None:
            flush(pending)
        result.steps = step
        if stop.requested and not diverged:
            result.stopped_by_signal = True
            log(f"stopping after step {step} on a signal")
        elif not diverged:
            run_eval(state, step - 1)
        if saver and not diverged:
            save(state, step)
            saver.wait()
            if stop.requested:
                log(f"checkpoint {step} committed {time.perf_counter() - stop.at:.1f}s after the signal")
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
    if diverged:
        raise DivergedError(diverged)
    log(f"done: {result.steps} steps in {time.perf_counter() - t_start:.1f}s (training loop {loop_s:.1f}s, of which "
        f"{total_wait():.2f}s waiting for input" + (f", {saver.blocked_s:.2f}s starting checkpoints" if saver else "")
        + (f"; {counters['skipped']} steps skipped as non-finite" if counters["skipped"] else "")
        + f"); run directory {run_dir}")
    return result
