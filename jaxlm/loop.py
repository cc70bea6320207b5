"""The training loop: steps, metrics one step late, evaluation and checkpoint cadence, stops.

`Loop(setup).run()` trains from `setup.start` to `train.steps`. Its state is explicit
attributes, changed only by its own methods:

- the step loop (`run`, `_steps`): one compiled step per iteration; the host reads the
  previous step's metrics while the next one runs;
- metrics (`_flush`, `_record`): metrics.jsonl, TensorBoard, W&B, the run summary;
- evaluation cadence (`_evaluate`): the evaluation harness's scorer on the validation split;
- checkpoint cadence (`_save`);
- stop conditions: the step count, a signal (`Stop`), a streak of non-finite steps
  (`_settle`), which rolls back to the last checkpoint (`_rollback`) or ends the run.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm import faults
from jaxlm.config import Config
from jaxlm.data.loader import Prefetch, TrainBatches
from jaxlm.distributed import Group, StopVote
from jaxlm.evaluate import Split, validate
from jaxlm.metrics import MetricsWriter, Throughput, mfu_note, read_metrics
from jaxlm.summary import RunSummary


@dataclasses.dataclass
class Position:
    """Where the run is in its data: batch of step s = the batch at data position s + offset.

    The offset is non-zero only after a rollback skipped batches; all three are checkpointed.
    """

    offset: int = 0
    skipped: int = 0  # steps skipped as non-finite
    rollbacks: int = 0


@dataclasses.dataclass
class Setup:
    """Everything `train.run` prepared for the loop."""

    cfg: Config
    run_dir: str
    stepper: object  # step.Stepper
    saver: object  # checkpoint.Saver, or None with checkpoint.enabled=false
    state: object
    start: int  # the first step to run
    position: Position
    train_streams: list[np.ndarray]
    weights: list[float]
    valid: Split
    eos_id: int
    summary: RunSummary
    flops_per_token: float
    peak: tuple[float | None, str]  # (peak FLOP/s of one device, where that number comes from)
    resumed: bool
    group: Group = dataclasses.field(default_factory=Group)  # this run's processes
    poison: frozenset[int] = frozenset()  # data positions whose steps come out NaN (tests only)


@dataclasses.dataclass
class RunResult:
    run_dir: str
    steps: int
    eval_loss: float | None = None
    eval_bpb: float | None = None
    stopped_by_signal: bool = False
    history: list[dict] = dataclasses.field(default_factory=list)
    summary: dict | None = None


class Stop:
    """SIGTERM/SIGINT handler: `signalled` is this process's own flag; `requested` is the stop the
    loop acts on (the agreed one when several processes train: see `distributed.StopVote`). The
    loop finishes its step, checkpoints and returns."""

    def __init__(self):
        self.signalled = self.requested = False
        self.at = 0.0

    def __call__(self, signum, frame):
        if not self.signalled:
            self.signalled, self.at = True, time.perf_counter()


@dataclasses.dataclass
class _Mark:
    """Input wait, time and step at the last metrics record: the next record's rates are since then."""

    wait: float
    time: float
    step: int


class Loop:
    def __init__(self, s: Setup, log=print, handle_signals: bool = False):
        self.s, self.cfg, self.log = s, s.cfg, log
        self.stepper, self.saver, self.state, self.position = s.stepper, s.saver, s.state, s.position
        c = self.cfg
        self.B, self.T, self.steps = c.train.batch_size, c.train.seq_len, c.train.steps
        self.loader = TrainBatches(s.train_streams, self.B, self.T, c.train.seed, self.stepper.local_rows(self.B),
                                   s.weights, s.eos_id if c.data.segment_ids else None)
        self.handle_signals = handle_signals
        self.stop = Stop()
        self.group = s.group
        self.vote = StopVote(self.stepper.mesh) if self.group.count > 1 else None
        self.ballot = None  # the previous step's stop vote
        self.result = RunResult(run_dir=s.run_dir, steps=0)
        self.streak = 0  # consecutive non-finite steps
        self.pending = None  # (step, metrics) to log, fetched one step late
        self.unsettled = None  # (step, metrics) whose finiteness is read one step late
        self.diverged = ""  # why the run stopped on non-finite steps or a runaway loss
        self.lowest_loss = math.inf  # of the logged training losses (train.diverge_factor)
        self.warned_mfu = False
        self.prefetch = None
        self.waited = 0.0  # input wait of prefetchers closed by rollbacks
        self.throughput = Throughput()
        self.mark = _Mark(0.0, time.perf_counter(), s.start - 1)
        self.bar = None
        self.writer = self.sink = None

    # -- the step loop ----------------------------------------------------------------
    def run(self) -> RunResult:
        from jaxlm.wandb_sink import make_sink

        old_handlers = {}
        if self.handle_signals:
            old_handlers = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.writer = MetricsWriter(self.s.run_dir, self.cfg.run.tensorboard, owner=self.group.owner)
            self.sink = make_sink(self.s.run_dir, self.cfg, self.s.resumed)
            if self.cfg.run.progress and sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=self.steps, initial=self.s.start, unit="step", dynamic_ncols=True)
            self._write_summary("running")
            self._open_prefetch(self.s.start)
            t0 = time.perf_counter()
            self._finish(self._steps())
            self.loop_s = time.perf_counter() - t0
        finally:
            self._close(old_handlers)
        return self.result

    def _steps(self) -> int:
        """Run steps until the step count, a signal or too many non-finite steps; the steps done."""
        step = self.s.start
        while step < self.steps:
            self.state, metrics = self.stepper.train(self.state, self.prefetch.get(step))
            self._poll_stop()
            over = self._settle()  # the previous step's, read while this one runs
            self.unsettled = (step, metrics)
            if self.pending is not None and not over:
                self._flush()
                if self.diverged:  # train.diverge_factor: the loss ran away
                    return step + 1
            last = step + 1 == self.steps
            every = self.cfg.checkpoint.every
            save_now = bool(self.saver and ((every and (step + 1) % every == 0) or step + 1 in self.cfg.checkpoint.at))
            if not over and (save_now or last or self.stop.requested):
                over = self._settle()  # never checkpoint or end on an unchecked step
            if over:
                if self._can_roll_back():
                    step = self._rollback(bad_to=step + self.position.offset)
                    continue
                self.diverged = self._divergence_message(step)
                return step + 1
            if (step + 1) % self.cfg.train.log_every == 0 or step == 0 or last:
                self.pending = (step, metrics)
            if self.bar is not None:
                self.bar.update(1)
            if self.cfg.eval.every and (step + 1) % self.cfg.eval.every == 0 and not last:
                self._flush()
                self._evaluate(step)
            if save_now and not last:
                self._save(step + 1)
            step += 1
            if self.stop.requested or self.diverged:
                break
        return step

    def _poll_stop(self) -> None:
        """Turn a signal into the stop the loop acts on: at once for one process; for several, when the
        previous step's vote (read now, the same on every process) says a process was signalled."""
        if self.vote is None:
            self.stop.requested = self.stop.signalled
            return
        ballot, previous = self.vote.cast(self.stop.signalled), self.ballot
        self.ballot = ballot
        if previous is not None and not self.stop.requested and self.vote.result(previous):
            self.stop.requested = True
            self.stop.at = self.stop.at or time.perf_counter()

    def _finish(self, step: int) -> None:
        """Log the last metrics; then, unless the run diverged, evaluate and checkpoint the final state."""
        self._flush()
        self.result.steps = step
        if self.diverged:
            self._write_summary("diverged")
            return
        if self.stop.requested:
            self.result.stopped_by_signal = True
            self.log(f"stopping after step {step} on a signal")
        else:
            self._evaluate(step - 1)
        if self.saver:
            self._save(step)
            self.saver.wait()
            if self.stop.requested:
                self.log(f"checkpoint {step} committed {time.perf_counter() - self.stop.at:.1f}s after the signal")
        self._write_summary("stopped" if self.stop.requested else "done")

    def _close(self, old_handlers: dict) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        if self.bar is not None:
            self.bar.close()
        if self.saver:
            self.saver.close()
        if self.writer is not None:
            self.writer.close()
        if self.sink is not None:
            self.sink.close(0 if self.result.summary and self.result.summary["status"] != "diverged" else 1)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    # -- data ------------------------------------------------------------------------
    def _open_prefetch(self, first: int) -> None:
        offset, poison = self.position.offset, self.s.poison  # fixed for this prefetcher's lifetime

        def make(step: int):
            batch = self.loader.batch_at(step + offset)
            if poison:
                batch = faults.mark(batch, step + offset, poison)
            return self.stepper.place(batch, self.B)

        self.prefetch = Prefetch(make, first, self.steps, self.cfg.data.prefetch)

    def input_wait(self) -> float:
        return self.waited + (self.prefetch.wait_s if self.prefetch is not None else 0.0)

    # -- metrics ---------------------------------------------------------------------
    def _flush(self) -> None:
        """Write the pending train record (its metrics were fetched one step late)."""
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        m = jax.device_get(metrics)
        tok_s = self.throughput.update(step, self.B * self.T)
        now, wait = time.perf_counter(), self.input_wait()
        dw, dt, n = wait - self.mark.wait, now - self.mark.time, step - self.mark.step
        self.mark = _Mark(wait, now, step)
        rec = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": (step + 1) * self.B * self.T, "tokens_per_s": tok_s, "input_wait_s": dw / max(n, 1),
               "input_wait_frac": dw / dt if dt > 0 else 0.0, "skipped_steps": self.position.skipped}
        peak, source = self.s.peak
        if peak and tok_s:
            rec["mfu"] = self.s.flops_per_token * tok_s / (peak * self.stepper.mesh.devices.size)
            note = mfu_note(rec["mfu"], peak, source)
            if note and not self.warned_mfu:
                self.warned_mfu = True
                self._say(note)
        self._record(rec)
        self._check_runaway(step, rec["loss"])
        desc = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {tok_s:,.0f} tok/s" + (
            f" mfu {rec['mfu']:.1%}" if "mfu" in rec else "")
        if self.bar is not None:
            self.bar.set_postfix_str(desc, refresh=False)
        else:
            self.log(f"step {step + 1}/{self.steps} {desc}")

    def _record(self, rec: dict) -> None:
        self.writer.write(rec)
        if self.sink is not None:
            self.sink.log(rec)
        self.result.history.append(rec)
        self.s.summary.record(rec)

    def _write_summary(self, status: str) -> None:
        if self.group.owner:
            self.result.summary = self.s.summary.write(status)
            if self.sink is not None:
                self.sink.summary(self.result.summary)

    def _say(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else self.log)(msg)

    # -- evaluation and checkpoint cadence -------------------------------------------
    def _evaluate(self, step: int) -> None:
        t0 = time.perf_counter()
        ev = validate(self.stepper, self.state.params, self.s.valid, self.cfg, self.s.eos_id)
        rec = {"step": step, **ev, "eval_s": time.perf_counter() - t0}
        self._record(rec)
        self.result.eval_loss, self.result.eval_bpb = ev["eval_loss"], ev.get("eval_bpb")
        ci = "" if "eval_bpb_ci95" not in ev else " (95% CI {:.4f}..{:.4f})".format(*ev["eval_bpb_ci95"])
        self._say(f"eval @ step {step + 1}: loss {ev['eval_loss']:.4f}"
                  + (f", {ev['eval_bpb']:.4f} bits/byte{ci}" if "eval_bpb" in ev else "")
                  + f" ({rec['eval_s']:.1f}s)")
        self._write_summary("running")
        self.throughput.update(step, 0)  # evaluation time is not training throughput
        self.mark = _Mark(self.input_wait(), time.perf_counter(), step)

    def _save(self, at: int) -> None:
        p = self.position
        self.saver.save(at, self.stepper.logical_state(self.state), data_position=at + p.offset,
                        skipped_steps=p.skipped, rollbacks=p.rollbacks)

    # -- stop conditions -------------------------------------------------------------
    def _settle(self) -> bool:
        """Read the unsettled step's finiteness; count a non-finite one as skipped. True once
        more than train.max_bad_steps steps in a row were non-finite."""
        if self.unsettled is None:
            return False
        (s, m), self.unsettled = self.unsettled, None
        if bool(jax.device_get(m["finite"])):
            self.streak = 0
            return False
        self.streak += 1
        self.position.skipped += 1
        loss, gnorm = (float(v) for v in jax.device_get((m["loss"], m["grad_norm"])))
        self._say(f"warning: step {s + 1} (data position {s + self.position.offset}): loss {loss}, grad norm "
                  f"{gnorm}; skipped ({self.streak} in a row, {self.position.skipped} in all)")
        return self.streak > self.cfg.train.max_bad_steps

    def _can_roll_back(self) -> bool:
        return (self.cfg.train.on_bad_steps == "rollback" and self.saver is not None
                and self.saver.manager.latest_step() is not None
                and self.position.rollbacks < self.cfg.train.max_rollbacks)

    def _rollback(self, bad_to: int) -> int:
        """Go back to the newest checkpoint and skip data positions up to `bad_to`; the step to run next."""
        self.saver.wait()
        self.pending = self.unsettled = self.state = None
        self.prefetch.close()
        self.waited += self.prefetch.wait_s
        candidates = self.group.broadcast("rollback-steps", lambda: ckpt.steps(self.s.run_dir))
        step, state, _, _ = ckpt.restore_latest(self.s.run_dir, self.stepper.restore_target(), self.log,
                                                candidates, self.group)
        self.state = self.stepper.adopt(state)
        p = self.position
        first_skipped = step + p.offset
        p.offset, p.rollbacks, self.streak = bad_to + 1 - step, p.rollbacks + 1, 0
        self.writer.truncate(step)
        self.result.history = [r for r in self.result.history if r["step"] < step]
        self.s.summary.rewind(read_metrics(self.s.run_dir))
        self.log(f"rollback {p.rollbacks}/{self.cfg.train.max_rollbacks}: back to the checkpoint at step {step}, "
                 f"skipping data positions {first_skipped}..{bad_to}")
        self._open_prefetch(step)
        self.throughput.update(step - 1, 0)
        self.mark = _Mark(self.input_wait(), time.perf_counter(), step - 1)
        if self.bar is not None:
            self.bar.reset(total=self.steps)
            self.bar.update(step)
        return step

    def _check_runaway(self, step: int, loss: float) -> None:
        """train.diverge_factor: after warmup, a logged loss above the factor times the lowest logged so
        far (from the first step of this session) ends the run as diverged."""
        factor = self.cfg.train.diverge_factor
        if not factor or not math.isfinite(loss):  # non-finite: the numerics guard (train.max_bad_steps) decides
            return
        if step >= self.cfg.optim.warmup_steps and loss > factor * self.lowest_loss:
            self.diverged = (f"stopping at step {step + 1}: the training loss {loss:.4g} is above "
                             f"train.diverge_factor={factor:g} x its lowest so far ({self.lowest_loss:.4g}); "
                             f"lower optim.lr or raise optim.warmup_steps")
        self.lowest_loss = min(self.lowest_loss, loss)

    def _divergence_message(self, step: int) -> str:
        rollbacks = self.position.rollbacks
        return (f"stopping at step {step + 1}: more than train.max_bad_steps={self.cfg.train.max_bad_steps} steps "
                f"in a row had a non-finite loss or gradient" + (f" after {rollbacks} rollbacks" if rollbacks else "")
                + "; no checkpoint holds a non-finite value. Lower optim.lr, raise optim.warmup_steps, or set "
                "train.on_bad_steps=rollback to skip the batches")
