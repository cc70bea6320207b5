"""What the training loop (`jaxlm.loop`) reads and writes: its batches, its records, its checkpoints.

- `Batches`: the prefetched training batches at the run's data position, and the time spent waiting;
- `Outputs`: metrics.jsonl (and TensorBoard), W&B, the progress bar or the log, the run summary;
- `Records`: the train records (with their rates) and the evaluation records, and their lines;
- `Checkpoints`: saving the state with its data position, and restoring the newest one for a rollback.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax

from jaxlm import checkpoint as ckpt
from jaxlm import faults
from jaxlm.data.loader import Prefetch, TrainBatches
from jaxlm.data.packing import ExampleBatches
from jaxlm.evaluate import validate, validate_examples
from jaxlm.metrics import MetricsWriter, Throughput, mfu_note, read_metrics


class Batches:
    """The batch of step s is the one at data position s + offset; the offset moves when a rollback
    skips batches, so each prefetcher is opened with its own."""

    def __init__(self, s):
        c = s.cfg
        self.s, self.rows = s, c.train.batch_size
        if s.examples:
            self.loader = ExampleBatches(s.examples[0], self.rows, c.train.seq_len, c.train.seed,
                                         s.stepper.local_rows(self.rows))
        else:
            self.loader = TrainBatches(s.train_streams, self.rows, c.train.seq_len, c.train.seed,
                                       s.stepper.local_rows(self.rows), s.weights,
                                       s.start_id if c.data.segment_ids else None, c.data.sampling, s.unscored)
        self.offset = 0
        self.prefetch = None
        self.closed_wait = 0.0  # input wait of the prefetchers closed so far
        self.closed_waits = 0  # and how many of their batches were not ready when asked for

    def open(self, first: int, offset: int) -> None:
        poison = self.s.poison
        self.offset = offset

        def make(step: int):
            batch = self.loader.batch_at(step + offset)
            if poison:
                batch = faults.mark(batch, step + offset, poison)
            return self.s.stepper.place(batch, self.rows)

        self.prefetch = Prefetch(make, first, self.s.cfg.train.steps, self.s.cfg.data.prefetch)

    def get(self, step: int):
        return self.prefetch.get(step)

    def epochs(self, step: int) -> list[float] | None:
        """Epochs of each source trained through once `step` is done ("epochs" sampling; else None)."""
        if self.loader.sampling != "epochs":
            return None
        return self.loader.epochs_at(step + 1 + self.offset)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
            self.closed_wait += self.prefetch.wait_s
            self.closed_waits += self.prefetch.waits
            self.prefetch = None

    @property
    def wait_s(self) -> float:
        """Seconds the loop has waited for input, all prefetchers together."""
        return self.closed_wait + (self.prefetch.wait_s if self.prefetch is not None else 0.0)

    @property
    def waits(self) -> int:
        """Steps whose batch was not ready when the loop asked for it, all prefetchers together."""
        return self.closed_waits + (self.prefetch.waits if self.prefetch is not None else 0)


@dataclasses.dataclass
class _Mark:
    """Input wait, time and step at the last metrics record: the next record's rates are since then."""

    wait: float
    time: float
    step: int


class Outputs:
    """Where the loop's records and lines go: metrics.jsonl (and TensorBoard), W&B, the progress bar or
    the log, the run summary; keeps the history and summary the run returns. Only the process that owns
    the run directory writes files."""

    def __init__(self, s, log):
        self.s, self.log = s, log
        self.history: list[dict] = []
        self.summary: dict | None = None
        self.writer = self.sink = self.bar = None

    def open(self) -> None:
        from jaxlm.wandb_sink import make_sink

        cfg = self.s.cfg
        self.writer = MetricsWriter(self.s.run_dir, cfg.run.tensorboard, owner=self.s.group.owner)
        self.sink = make_sink(self.s.run_dir, cfg, self.s.resumed)
        if cfg.run.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=self.s.start, unit="step", dynamic_ncols=True)

    def record(self, rec: dict) -> None:
        self.writer.write(rec)
        if self.sink is not None:
            self.sink.log(rec)
        self.history.append(rec)
        self.s.summary.record(rec)

    def say(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else self.log)(msg)

    def write_summary(self, status: str) -> None:
        if self.s.group.owner:
            self.summary = self.s.summary.write(status)
            if self.sink is not None:
                self.sink.summary(self.summary)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def rewind(self, step: int) -> None:
        """Forget the records from `step` on: a rollback trains those steps again."""
        self.writer.truncate(step)
        self.history = [r for r in self.history if r["step"] < step]
        self.s.summary.rewind(read_metrics(self.s.run_dir))
        if self.bar is not None:
            self.bar.reset(total=self.s.cfg.train.steps)
            self.bar.update(step)

    def close(self) -> None:
        """W&B learns the exit status: 0 unless the run diverged (or this process wrote no summary)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.sink is not None:
            self.sink.close(0 if self.summary and self.summary["status"] != "diverged" else 1)


class Records:
    """The train and evaluation records and their lines. A train record's rates (tokens/s, input wait,
    MFU) are since the previous record, or since the evaluation or rollback that restarted them."""

    def __init__(self, s, out: Outputs):
        self.s, self.out, self.tokens = s, out, s.cfg.train.batch_size * s.cfg.train.seq_len
        self.throughput = Throughput()
        self.mark = _Mark(0.0, time.perf_counter(), s.start - 1)
        self.warned_mfu = False
        self.eval: dict = {}  # the latest evaluation's metrics

    def restart(self, step: int, wait: float) -> None:
        """Rates from after `step` on: evaluation and rollback time is not training throughput."""
        self.throughput.update(step, 0)
        self.mark = _Mark(wait, time.perf_counter(), step)

    def train(self, step: int, metrics, wait: float, skipped: int, epochs: list[float] | None = None) -> float:
        """Write the train record of `step` (its device metrics are fetched now) and its line; its loss."""
        m, tok_s = jax.device_get(metrics), self.throughput.update(step, self.tokens)
        now = time.perf_counter()
        dw, dt, n = wait - self.mark.wait, now - self.mark.time, step - self.mark.step
        self.mark = _Mark(wait, now, step)
        rec = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens": (step + 1) * self.tokens, "tokens_per_s": tok_s, "input_wait_s": dw / max(n, 1),
               "input_wait_frac": dw / dt if dt > 0 else 0.0, "skipped_steps": skipped,
               **({"epochs": epochs} if epochs is not None else {})}
        peak, source = self.s.peak
        if peak and tok_s:
            rec["mfu"] = self.s.flops_per_token * tok_s / (peak * self.s.stepper.mesh.devices.size)
            note = mfu_note(rec["mfu"], peak, source)
            if note and not self.warned_mfu:
                self.warned_mfu = True
                self.out.say(note)
        self.out.record(rec)
        desc = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {tok_s:,.0f} tok/s" + (
            f" mfu {rec['mfu']:.1%}" if "mfu" in rec else "")
        if self.out.bar is not None:
            self.out.bar.set_postfix_str(desc, refresh=False)
        else:
            self.out.log(f"step {step + 1}/{self.s.cfg.train.steps} {desc}")
        return rec["loss"]

    def evaluate(self, step: int, params, wait: float) -> None:
        """Score the validation split with the evaluation harness's scorer; record and say it."""
        t0 = time.perf_counter()
        ev = (validate_examples(self.s.stepper, params, self.s.examples[1], self.s.cfg) if self.s.examples
              else validate(self.s.stepper, params, self.s.valid, self.s.cfg, self.s.start_id,
                                 self.s.unscored))
        rec = {"step": step, **ev, "eval_s": time.perf_counter() - t0}
        self.out.record(rec)
        self.eval = ev
        ci = "" if "eval_bpb_ci95" not in ev else " (95% CI {:.4f}..{:.4f})".format(*ev["eval_bpb_ci95"])
        self.out.say(f"eval @ step {step + 1}: loss {ev['eval_loss']:.4f}"
                     + (f", {ev['eval_bpb']:.4f} bits/byte{ci}" if "eval_bpb" in ev else "")
                     + f" ({rec['eval_s']:.1f}s)")
        self.out.write_summary("running")
        self.restart(step, wait)


class Checkpoints:
    """Checkpoints hold the state and the data position (`loop.Position`); a rollback restores the
    newest one and moves the data position past the bad batches."""

    def __init__(self, s, log):
        self.s, self.saver, self.position, self.log = s, s.saver, s.position, log

    def save(self, at: int, state) -> None:
        p = self.position
        self.saver.save(at, self.s.stepper.logical_state(state), data_position=at + p.offset,
                        skipped_steps=p.skipped, rollbacks=p.rollbacks)

    def can_roll_back(self) -> bool:
        t = self.s.cfg.train
        return (t.on_bad_steps == "rollback" and self.saver is not None
                and self.saver.manager.latest_step() is not None and self.position.rollbacks < t.max_rollbacks)

    def roll_back(self, bad: int) -> tuple[int, object]:
        """Restore the newest checkpoint (every process the same one); skip the data positions from its
        step's to bad step's. (Its step, the restored state.)"""
        s, p = self.s, self.position
        bad_to = bad + p.offset
        candidates = s.group.broadcast("rollback-steps", lambda: ckpt.steps(s.run_dir))
        step, state, _, _ = ckpt.restore_latest(s.run_dir, s.stepper.restore_target(), self.log, candidates, s.group)
        state = s.stepper.adopt(state)
        first_skipped = step + p.offset
        p.offset, p.rollbacks = bad_to + 1 - step, p.rollbacks + 1
        self.log(f"rollback {p.rollbacks}/{s.cfg.train.max_rollbacks}: back to the checkpoint at step {step}, "
                 f"skipping data positions {first_skipped}..{bad_to}")
        return step, state
