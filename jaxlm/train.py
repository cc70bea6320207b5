"""run(cfg): the run directory, data, mesh and sharded state; then `loop.Loop` trains.

`run` is callable in-process (sweeps call it many times): it keeps no global state, takes
its devices as an argument, and returns a summary instead of exiting. Setting up is a few
functions with explicit inputs and outputs: which checkpoints to resume (`_existing_checkpoints`),
where an init_from run is (`_init_source`), the data (`prepare_data`), the run directory
(`_prepare_run_dir`), the first state (`_first_state`), the compiled step and plan print
(`_compile_and_plan`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm import distributed, faults, kernels, memory, mup
from jaxlm.config import Config, DistConfig, check_vocab, load_config, to_yaml
from jaxlm.data import cache, chat, examples
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer, run_tokenizer_file, tokenizer_from_bytes
from jaxlm.errors import CheckpointError, ConfigError, DivergedError
from jaxlm.data.loader import unscored_id
from jaxlm.evaluate import Split
from jaxlm.loop import Loop, Position, RunResult, Setup
from jaxlm.metrics import (count_params, flops_per_token_conventions, peak_flops_info, read_metrics,
                           truncate_metrics)
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build
from jaxlm.summary import RunSummary

__all__ = ["Data", "RunResult", "prepare_data", "run"]


@dataclass
class Data:
    tokenizer: Tokenizer
    train_streams: list[np.ndarray]  # one EOS-joined token stream per source of the mixture
    weights: list[float]
    valid: Split  # the validation split, EOS-joined
    train_bytes: int
    examples: tuple | None = None  # data.format=sft: (training, validation) `examples.Examples`


def prepare_data(cfg: Config, log=print, tokenizer: Tokenizer | None = None, group=None) -> Data:
    """Tokenizer and token streams, from the token cache when sources and tokenizer are unchanged.

    `tokenizer` (a resumed run's own) takes the place of data.tokenizer or a trained one. With a
    `distributed.Group`, its processes build missing cache entries together (`jaxlm.data.build`).
    """
    t0 = time.perf_counter()
    if cfg.data.format == "sft":
        return _prepare_examples(cfg, log, tokenizer, t0)
    train_parts, weights, valid_parts = cache.parts(cfg.data)
    tok = tokenizer or cache.get_tokenizer(cfg.data, train_parts, log)
    train = [cache.tokens(cfg.data, tok, p, "train", log, group) for p in train_parts]
    valid = [cache.tokens(cfg.data, tok, p, "valid", log, group) for p in valid_parts]
    split = Split.joined(f"validation of {cfg.data.valid_source or cfg.data.source}", valid)
    data = Data(tok, [t for t, _ in train], weights, split, sum(m["bytes"] for _, m in train))
    n_train = sum(len(t) for t in data.train_streams)
    log(f"data: {sum(m['documents'] for _, m in train)} train / {split.documents} valid "
        f"documents, {n_train:,} / {len(split.tokens):,} tokens, vocab {tok.vocab_size}, "
        f"{data.train_bytes / max(n_train, 1):.2f} bytes/token ({time.perf_counter() - t0:.1f}s)")
    if len(train) > 1:
        log("mixture: " + ", ".join(f"{p.source} weight {w / sum(weights):.3f} ({len(t):,} tokens)"
                                    for p, w, t in zip(train_parts, weights, data.train_streams)))
    return data


def _prepare_examples(cfg: Config, log, tokenizer: Tokenizer | None, t0: float) -> Data:
    """data.format=sft: the examples, encoded by every process (they are small next to pretraining text)."""
    tok = tokenizer or cache.get_tokenizer(cfg.data, [], log)
    train, valid = examples.load(cfg.data, tok, cfg.train.seq_len)
    empty = Split("no text", np.zeros(1, np.int32), 0, 0)
    log(f"data: {len(train)} train / {len(valid)} valid examples, {len(train.ids):,} / {len(valid.ids):,} tokens, "
        f"{int(train.trained.sum()):,} / {int(valid.trained.sum()):,} of them trained (data.loss_on="
        f"{cfg.data.loss_on}), vocab {tok.vocab_size}" + (f", {train.truncated + valid.truncated} examples cut to "
                                                         f"train.seq_len+1" if train.truncated + valid.truncated else "")
        + f" ({time.perf_counter() - t0:.1f}s)")
    return Data(tok, [], [1.0], empty, 0, (train, valid))


# Keys that shape the train state or the token ids: a run cannot resume across a change in them.
STATE_KEYS = ("model.family", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
              "model.n_kv_heads", "model.d_ff", "model.max_seq_len", "model.bias", "model.qkv_bias", "model.tie_embeddings",
              "model.scan_layers", "model.parametrization", "optim.grad_clip", "optim.decay_embeddings",
              "data.tokenizer_vocab", "data.tokenizer_type", "data.tokenizer_max_bytes")

# STATE_KEYS that shape only the optimizer state (mup's chain has a step of its own), which init_from leaves
# behind: it takes the params alone, whose tree is the same under sp and mup.
OPTIMIZER_STATE_KEYS = ("model.parametrization",)


# What a branch (checkpoint.branch_from) must share with its source run on top of STATE_KEYS: the
# model and the data stream, so that its steps continue the source's exactly.
BRANCH_KEYS = STATE_KEYS + ("model.dropout", "data.source", "data.sampling", "data.valid_source", "data.valid_fraction",
                            "data.text_field", "data.doc_separator", "data.segment_ids", "train.seed",
                            "train.batch_size", "train.seq_len")


def _flat(cfg: Config) -> dict:
    return {f"{sec}.{k}": v for sec in ("model", "optim", "data", "train")
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


def _sampling_it_started_with(cfg: Config, restart: bool, log) -> Config:
    """A run directory made before `data.sampling` existed resumes with the sampling it started with:
    its config.yaml has no such key, and windows were drawn at random."""
    saved = os.path.join(cfg.run.path, "config.yaml")
    if restart or cfg.data.sampling == "random" or not os.path.exists(saved) or not ckpt.steps(cfg.run.path):
        return cfg
    import yaml

    with open(saved, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if "sampling" in (raw.get("data") or {}):
        return cfg
    log(f"{cfg.run.path} started before data.sampling existed: it continues with data.sampling=random, the "
        "sampling it was trained with")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sampling="random"))


def _run_tokenizer(run_dir: str, done: list[int], eos_token: str = "", bos_token: str = "") -> Tokenizer:
    """The tokenizer a run was trained with: its tokenizer.json or tokenizer.model, else the copy inside its
    newest checkpoint."""
    path = run_tokenizer_file(run_dir)
    if path:
        return load_tokenizer(path, eos_token, bos_token)
    errors = []
    for step in reversed(done):
        try:
            return tokenizer_from_bytes(ckpt.read_tokenizer(run_dir, step), eos_token, f"checkpoint {step}", bos_token)
        except CheckpointError as e:
            errors.append(str(e))
    raise CheckpointError(f"run '{run_dir}' has no tokenizer file and no checkpoint with a readable tokenizer: "
                          + "; ".join(errors))


@dataclass
class _InitSource:
    run_dir: str
    step: int | None
    tokenizer: Tokenizer
    branch: bool = False  # checkpoint.branch_from: the whole state, not only the params


def _init_source(cfg: Config) -> _InitSource:
    """Where `checkpoint.init_from` or `checkpoint.branch_from` points, checked against this run before
    any work (a branch must have the source's model and data stream, and start before train.steps)."""
    branch = bool(cfg.checkpoint.branch_from)
    key, path = ("branch_from", cfg.checkpoint.branch_from) if branch else ("init_from", cfg.checkpoint.init_from)
    src_dir, step = ckpt.resolve(path)
    done = ckpt.steps(src_dir)
    if not done or (step is not None and step not in done):
        raise CheckpointError(f"checkpoint.{key}={path}: no committed checkpoint "
                              + (f"{step} " if step is not None else "") + f"in {ckpt.checkpoint_dir(src_dir)}")
    if branch:
        step = done[-1] if step is None else step
        if step >= cfg.train.steps:
            raise ConfigError(f"checkpoint.branch_from={path} is at step {step}, not before train.steps="
                              f"{cfg.train.steps}; branch from an earlier checkpoint or train longer")
    keys = BRANCH_KEYS if branch else tuple(k for k in STATE_KEYS
                                            if k.startswith("model.") and k not in OPTIMIZER_STATE_KEYS)
    src_cfg_path = os.path.join(src_dir, "config.yaml")
    if os.path.exists(src_cfg_path):
        differ = _state_key_changes(load_config(src_cfg_path), cfg, keys)
        if differ:
            what = "model or data stream" if branch else "model"
            raise ConfigError(f"checkpoint.{key}={path} has a different {what}: " + ", ".join(differ)
                              + "; use the same keys as that run")
    tok = _run_tokenizer(src_dir, done if step is None else [step], cfg.data.eos_token, cfg.data.bos_token)
    if cfg.data.tokenizer and load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token, cfg.data.bos_token).sha256 != tok.sha256:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of {src_dir}; drop "
                          "data.tokenizer to use that run's own (token ids must mean the same)")
    return _InitSource(src_dir, step, tok, branch)


def with_chat_template(cfg: Config) -> Config:
    """data.format=sft: data.chat_template resolved to its text (`chat.resolve`), so the run's config
    holds the template it trained with (export writes it). An empty one is taken from the tokenizer's
    folder, else from the init_from/branch_from run's config, else it is jaxlm's own."""
    if cfg.data.format != "sft":
        return cfg
    template = cfg.data.chat_template
    source = cfg.checkpoint.init_from or cfg.checkpoint.branch_from
    if not template and not cfg.data.tokenizer and source:
        src_cfg = os.path.join(ckpt.resolve(source)[0], "config.yaml")
        template = load_config(src_cfg).data.chat_template if os.path.exists(src_cfg) else ""
    text = chat.resolve(template, cfg.data.tokenizer)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_template=text))


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



def _first_state(cfg: Config, stepper: Stepper, group: distributed.Group, done: list[int],
                 init: _InitSource | None, saver, tokenizer: Tokenizer, log) -> tuple[int, object, Position]:
    """(first step, state, data position) of the run: its newest usable checkpoint of `done` (every
    process restores the same one), else a fresh init (with init_from's params in it)."""
    run_dir = cfg.run.path
    if not done and init and init.branch:
        return _branch_state(cfg, stepper, group, init, log)
    if not done:
        state = stepper.init_state(cfg.train.seed)
        if init:
            t0 = time.perf_counter()
            params, _, from_step = ckpt.restore_params(init.run_dir, init.step, stepper.restore_target().params, log)
            state = stepper.with_params(state, params)
            log(f"initialised params from {init.run_dir} step {from_step} (fresh optimizer, step 0; "
                f"{time.perf_counter() - t0:.1f}s)")
        return 0, state, Position()
    t0 = time.perf_counter()
    start, state, meta, damaged = ckpt.restore_latest(run_dir, stepper.restore_target(), log, done, group)
    if group.owner:
        for s in damaged:
            log(f"moved damaged checkpoint {s} to {ckpt.quarantine(run_dir, s)}")
    if damaged:
        group.barrier("quarantined")
        if saver:
            saver.manager.reload()  # forget the moved steps, so they can be written again
    if meta.get("tokenizer_sha256") not in (None, "", tokenizer.sha256):
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer run '{run_dir}' was "
                          f"trained with; drop data.tokenizer to use the run's own")
    position = Position(offset=meta.get("data_position", start) - start, skipped=meta.get("skipped_steps", 0),
                        rollbacks=meta.get("rollbacks", 0))
    if group.owner:
        truncate_metrics(run_dir, start)
    log(f"resuming {run_dir} from its checkpoint at step {start} (restored in {time.perf_counter() - t0:.1f}s)")
    return start, stepper.adopt(state), position


def _branch_state(cfg: Config, stepper: Stepper, group: distributed.Group, init: _InitSource,
                  log) -> tuple[int, object, Position]:
    """(step, state, data position) of the checkpoint a branch starts from; its metrics before that step
    are copied into this run's metrics.jsonl, so the run reads like one that trained straight through."""
    t0 = time.perf_counter()
    state, meta = ckpt.restore(init.run_dir, init.step, stepper.restore_target())
    if group.owner:
        history = [r for r in read_metrics(init.run_dir) if r.get("step", 0) < init.step]
        with open(os.path.join(cfg.run.path, "metrics.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
    position = Position(offset=meta.get("data_position", init.step) - init.step,
                        skipped=meta.get("skipped_steps", 0), rollbacks=meta.get("rollbacks", 0))
    log(f"branching from {init.run_dir} step {init.step}: its params, optimizer state and data position "
        f"(restored in {time.perf_counter() - t0:.1f}s)")
    return init.step, stepper.adopt(state), position


def _kernel_line(stepper: Stepper, seq_len: int) -> str:
    """The plan's kernels line: the resolved kernel set and attention, and how the loss holds its logits."""
    device = stepper.mesh.devices.flat[0]
    budget = f"budget {stepper.logits_budget:,} logits per device" if stepper.logits_budget else "no budget"
    loss = (f"chunks of {stepper.loss_chunk} positions" if stepper.loss_chunk else "plain logits") + f" ({budget})"
    line = kernels.describe(stepper.model.cfg, device.platform, seq_len, kernels.capability(device))
    return f"{line}; loss: {loss}"


def _compile_and_plan(cfg: Config, stepper: Stepper, state, vocab: int, batch_keys: tuple[str, ...], log):
    """Compile the train step and print the plan; (compile seconds, parameter counts, FLOPs per token by
    convention, (peak FLOP/s, its source))."""
    B, T = cfg.train.batch_size, cfg.train.seq_len
    eval_keys = ("inputs", "targets", "mask") + (("segment_ids", "positions") if cfg.data.segmented else ())
    eval_rows = cfg.eval.batch_size or B
    compile_s = stepper.compile(state, {k: (B, T) for k in batch_keys}, {k: (eval_rows, T) for k in eval_keys})
    mesh = stepper.mesh
    params = stepper.params(state)
    counts = count_params(params, cfg.model.tied)
    flops = flops_per_token_conventions(cfg.model, counts, T)
    peak = peak_flops_info(mesh.devices.flat[0], cfg.run.peak_tflops, cfg.model.dtype)
    tokens_per_step = B * T
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    log(f"model: {cfg.model.family} d={cfg.model.d_model} layers={cfg.model.n_layers} heads={cfg.model.n_heads}"
        f"/{cfg.model.kv_heads} vocab={vocab} dtype={cfg.model.dtype} remat={cfg.model.remat}")
    log(f"params: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding, {counts['embedding']:,} "
        f"embedding, head {counts['head']:,}" + (" (tied)" if cfg.model.tied else ""))
    log(f"flops/token: {flops['6N+attn'] / 1e6:.2f} M (6N+attn; 6N {flops['6N'] / 1e6:.2f} M, palm "
        f"{flops['palm'] / 1e6:.2f} M); tokens/step: {tokens_per_step:,} ({B} x {T}, {cfg.train.grad_accum} "
        f"microbatches); training tokens: {tokens_per_step * cfg.train.steps:,}")
    log(f"mesh: {shape} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices, "
        f"backend {cfg.mesh.backend}; train and eval steps compiled in {compile_s:.1f}s")
    log(distributed.describe())
    log(_kernel_line(stepper, T))
    if mup.is_mup(cfg.model):
        for line in mup.describe(params, cfg.model, cfg.optim):
            log(line)
    if peak[0]:
        log(f"peak for MFU: {peak[0] / 1e12:.2f} TFLOP/s per device ({peak[1]})")
    planned = memory.plan_step(cfg, stepper, counts["total"], vocab)
    log(f"memory per device (jaxlm's plan): {planned.describe()}")
    mem = stepper.compiled_memory
    if mem is not None:
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes)
        log(f"memory per device (compiled step): {total / 2**20:.1f} MiB "
            f"(state+batch {mem.argument_size_in_bytes / 2**20:.1f}, temp {mem.temp_size_in_bytes / 2**20:.1f})")
    return compile_s, counts, flops, peak


def _shared_config(cfg: Config) -> str:
    """The resolved config every process must hold (its dist section may name the process)."""
    return to_yaml(dataclasses.replace(cfg, dist=DistConfig()))


def _own_setup(cfg: Config, restart: bool, resume: bool, log) -> tuple[dict, Tokenizer | None, _InitSource | None]:
    """Process 0's decisions before the data: what to resume, the init_from source and the tokenizer
    (the run's own, an init_from run's, data.tokenizer, or one trained now). Returns (what the
    other processes need, as JSON, the tokenizer to pass to `prepare_data`, the init_from source)."""
    done = _existing_checkpoints(cfg, restart, resume)
    starts_from = cfg.checkpoint.init_from or cfg.checkpoint.branch_from
    init = _init_source(cfg) if starts_from and not done else None
    tokenizer = init.tokenizer if init else None
    if done and not cfg.data.tokenizer:  # the run's own tokenizer, never a retrained one
        tokenizer = _run_tokenizer(cfg.run.path, done, cfg.data.eos_token, cfg.data.bos_token)
    tok = tokenizer or cache.get_tokenizer(cfg.data, cache.parts(cfg.data)[0], log)
    shared = {"done": done, "tokenizer": distributed.encode_bytes(tok.proto),
              "init": [init.run_dir, init.step, init.branch] if init else None}
    return shared, tokenizer or (None if cfg.data.tokenizer else tok), init


def _shared_state(cfg: Config, group: distributed.Group, restart: bool, resume: bool, tensor: int,
                  log) -> tuple[list[int], Data, _InitSource | None]:
    """(checkpoints to resume, data, init_from source) on every process: process 0 decides (and
    trains a tokenizer if one is needed), every process builds its share of the token cache,
    then process 0 writes the run directory while the others wait."""
    group.agree("config", _shared_config(cfg), "resolved config")
    owned = {}

    def decide():
        shared, owned["tokenizer"], owned["init"] = _own_setup(cfg, restart, resume, log)
        return shared

    shared = group.broadcast("setup", decide)
    if group.owner:
        tokenizer, init = owned["tokenizer"], owned["init"]
    else:
        tok = tokenizer_from_bytes(distributed.decode_bytes(shared["tokenizer"]), cfg.data.eos_token,
                                   bos_token=cfg.data.bos_token)
        tokenizer = None if cfg.data.tokenizer else tok
        init = (_InitSource(shared["init"][0], shared["init"][1], tok, shared["init"][2])
                if shared["init"] else None)
    data = prepare_data(cfg, log, tokenizer, group)  # bad input fails here, before the run directory is touched
    group.agree("tokenizer", data.tokenizer.sha256, "tokenizer (sha256 of its model)")

    def write_run_dir():
        check_vocab(cfg, data.tokenizer.vocab_size, tensor)
        run_dir = _prepare_run_dir(cfg, restart)
        tok_path = os.path.join(run_dir, data.tokenizer.file_name)
        if not shared["done"] or not os.path.exists(tok_path):
            data.tokenizer.save(tok_path)

    group.each("run dir", write_run_dir if group.owner else dict)
    return shared["done"], data, init


def _setup(cfg: Config, devices, restart: bool, resume: bool, log, poison: frozenset[int],
           started: float) -> Setup:
    """Everything before the first step; nothing in the run directory changes before the data is read."""
    mesh = make_mesh(cfg, devices)  # config errors before any data or compile work
    group = distributed.Group("train")
    done, data, init = _shared_state(cfg, group, restart, resume, mesh.shape["tensor"], log)
    vocab = check_vocab(cfg, data.tokenizer.vocab_size, mesh.shape["tensor"])
    run_dir = cfg.run.path
    saver = ckpt.Saver(run_dir, cfg, data.tokenizer.proto) if cfg.checkpoint.enabled else None  # fails if unwritable
    try:  # close the checkpoint manager if anything before the loop fails
        model, tx, schedule = build(cfg, vocab, mesh)
        stepper = Stepper(cfg, model, tx, schedule, mesh, wrap_step=faults.nan_step if poison else None)
        start, state, position = _first_state(cfg, stepper, group, done, init, saver, data.tokenizer, log)
        batch_keys = (("inputs", "targets") + (("segment_ids", "positions") if cfg.data.segmented else ())
                      + (("mask",) if data.examples or unscored_id(data.tokenizer) is not None else ())
                      + (("poison",) if poison else ()))
        compile_s, counts, flops, peak = _compile_and_plan(cfg, stepper, state, vocab, batch_keys, log)
        summary = RunSummary(run_dir, cfg, counts, flops, compile_s, read_metrics(run_dir) if done else [], started)
        summary.progress(max(summary.data["steps"], start))
    except BaseException:
        if saver:
            saver.close()
        raise
    return Setup(cfg=cfg, run_dir=run_dir, stepper=stepper, saver=saver, state=state, start=start,
                 position=position, train_streams=data.train_streams, weights=data.weights, valid=data.valid,
                 examples=data.examples,
                 start_id=data.tokenizer.start_id, unscored=unscored_id(data.tokenizer), summary=summary, flops_per_token=flops["6N+attn"], peak=peak,
                 resumed=bool(done), group=group, poison=poison)


def run(cfg: Config, *, devices=None, restart: bool = False, resume: bool = False, handle_signals: bool = False,
        log=None, inject_nan=()) -> RunResult:
    """Train `cfg` for cfg.train.steps, continuing its run directory when that holds checkpoints.

    restart: start an existing run directory over. resume: require a checkpoint to continue from.
    handle_signals: SIGTERM/SIGINT finish the current step, commit a checkpoint and return
    with `stopped_by_signal`. inject_nan: data positions whose steps come out NaN (a test
    hook for the numerics guard, see `jaxlm.faults`). Raises JaxlmError for bad input and
    DivergedError when more than train.max_bad_steps steps in a row are non-finite.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if restart and resume:
        raise ConfigError("restart and resume exclude each other")
    t_start = time.perf_counter()
    devices = list(jax.devices() if devices is None else devices)
    cfg = with_chat_template(_sampling_it_started_with(cfg, restart, log))
    setup = _setup(cfg, devices, restart, resume, log, frozenset(int(p) for p in inject_nan), t_start)
    result = Loop(setup, log, handle_signals).run()
    if result.stop.reason.diverged:
        raise DivergedError(result.stop.message)
    saver, skipped = setup.saver, result.skipped_steps
    log(f"done: {result.steps} steps in {time.perf_counter() - t_start:.1f}s (training loop {result.loop_s:.1f}s, "
        f"of which {result.input_wait_s:.2f}s waiting for input, at {result.input_waits} of {result.steps} steps"
        + (f", {saver.blocked_s:.2f}s starting checkpoints" if saver else "")
        + (f"; {skipped} steps skipped as non-finite" if skipped else "") + f"); run directory {setup.run_dir}")
    return result
