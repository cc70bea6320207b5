"""The training loop: one compiled step per iteration, the host reading each step one step late.

`Loop(setup).run()` trains from `setup.start` to train.steps and returns a `RunResult`. The host
never waits for the step it just dispatched: while it runs, `Steps` reads the previous one (`_Step`),
first whether it was finite (`Guard`), then, on a logging step, its metrics record. A step about to
be checkpointed or to end the run is read at once, so no checkpoint holds a non-finite state.

`Cadence` says which steps log, evaluate and checkpoint. The run ends for one `StopReason`: the step
count, a signal (`SignalStop`, the same step on every process), more non-finite steps in a row than
train.max_bad_steps with no rollback left (`loop_io.Checkpoints`), or a runaway loss. What the loop
reads and writes (batches, records, checkpoints) is in `jaxlm.loop_io`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import signal
import time

import jax
import numpy as np

from jaxlm.config import Config
from jaxlm.distributed import Group, StopVote
from jaxlm.evaluate import Split
from jaxlm.loop_io import Batches, Checkpoints, Outputs, Records
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
    start_id: int  # the id in front of every document (EOS for the models jaxlm pretrains)
    summary: RunSummary
    flops_per_token: float
    peak: tuple[float | None, str]  # (peak FLOP/s of one device, where that number comes from)
    resumed: bool
    group: Group = dataclasses.field(default_factory=Group)  # this run's processes
    poison: frozenset[int] = frozenset()  # data positions whose steps come out NaN (tests only)
    unscored: int | None = None  # targets of this id are not scored (`jaxlm.data.loader.unscored_id`)
    examples: tuple | None = None  # data.format=sft: (training, validation) `jaxlm.data.examples.Examples`


class StopReason(enum.Enum):
    """Why the loop ended; `status` is the run summary's word for it."""

    DONE = "done"  # train.steps reached
    SIGNAL = "signal"  # SIGTERM/SIGINT: the state is checkpointed and the run can resume
    NON_FINITE = "non_finite"  # more than train.max_bad_steps non-finite steps in a row, no rollback left
    RUNAWAY = "runaway"  # train.diverge_factor: the logged training loss ran away

    @property
    def diverged(self) -> bool:
        return self in (StopReason.NON_FINITE, StopReason.RUNAWAY)

    @property
    def status(self) -> str:
        return "diverged" if self.diverged else "stopped" if self is StopReason.SIGNAL else "done"


@dataclasses.dataclass(frozen=True)
class Stop:
    """The one reason the loop stops; set once a step by `SignalStop.poll`, or by the `Guard`."""

    reason: StopReason
    message: str = ""  # for a divergence: what happened and what to change (DivergedError's message)


@dataclasses.dataclass
class RunResult:
    """What the loop did: `train.run` reports it, raises DivergedError for a divergence, and returns it."""

    run_dir: str
    steps: int
    eval_loss: float | None = None
    eval_bpb: float | None = None
    stop: Stop = Stop(StopReason.DONE)
    history: list[dict] = dataclasses.field(default_factory=list)
    summary: dict | None = None
    loop_s: float = 0.0  # the step loop and the run's end (its last evaluation and checkpoint)
    input_wait_s: float = 0.0
    input_waits: int = 0  # steps whose batch was not ready when asked for (a count: no machine's speed in it)
    skipped_steps: int = 0  # skipped as non-finite, over the whole run

    @property
    def stopped_by_signal(self) -> bool:
        """Stopped by SIGTERM/SIGINT with its state checkpointed (the command line exits 75)."""
        return self.stop.reason is StopReason.SIGNAL


@dataclasses.dataclass(frozen=True)
class Due:
    """What happens after a step besides training. `eval` and `save` are mid-run only: the run's end
    evaluates and checkpoints on its own."""

    log: bool
    eval: bool
    save: bool
    last: bool


@dataclasses.dataclass(frozen=True)
class Cadence:
    """train.log_every, eval.every and the checkpoint steps (checkpoint.every and .at), in one place."""

    steps: int
    log_every: int
    eval_every: int
    save_every: int  # 0: no periodic checkpoints (none at all without a saver)
    save_at: frozenset[int]

    @classmethod
    def of(cls, cfg: Config, saving: bool) -> Cadence:
        c = cfg.checkpoint
        return cls(cfg.train.steps, cfg.train.log_every, cfg.eval.every, c.every if saving else 0,
                   frozenset(c.at if saving else ()))

    def at(self, step: int) -> Due:
        """For step `step` (0-based); metrics records at step 0, every log_every steps and the last."""
        n = step + 1
        last = n == self.steps
        save = (bool(self.save_every) and n % self.save_every == 0) or n in self.save_at
        return Due(log=n % self.log_every == 0 or step == 0 or last,
                   eval=bool(self.eval_every) and n % self.eval_every == 0 and not last,
                   save=save and not last, last=last)


@dataclasses.dataclass
class _Step:
    """A dispatched step, which the host reads one step late: whether it was finite (once), then, on a
    logging step, its metrics record (once)."""

    step: int
    metrics: dict  # on the device until read
    log: bool  # its metrics record is still to be written
    checked: bool = False  # its finiteness was read


class SignalStop:
    """SIGTERM/SIGINT. The handler only sets `signalled`; `poll`, once a step, turns it into the loop's
    stop: at once for one process; for several, when the previous step's vote (`distributed.StopVote`,
    read now, the same on every process) says some process was signalled."""

    def __init__(self, mesh, processes: int):
        self.signalled, self.at = False, 0.0
        self.vote = StopVote(mesh) if processes > 1 else None
        self.ballot = None  # the previous step's vote

    def __call__(self, signum, frame):
        if not self.signalled:
            self.signalled, self.at = True, time.perf_counter()

    def install(self) -> dict:
        """Handle SIGTERM and SIGINT; the handlers they had."""
        return {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}

    def poll(self, stop: Stop | None) -> Stop | None:
        """Cast this step's vote; the loop's stop after it (`stop` when it is stopping already)."""
        if self.vote is None:
            return stop or (Stop(StopReason.SIGNAL) if self.signalled else None)
        previous, self.ballot = self.ballot, self.vote.cast(self.signalled)
        if stop is not None or previous is None or not self.vote.result(previous):
            return stop
        self.at = self.at or time.perf_counter()
        return Stop(StopReason.SIGNAL)


class Guard:
    """The numerics guard. The compiled step skips a non-finite step (state unchanged); the guard counts
    them, and more than train.max_bad_steps in a row trigger train.on_bad_steps. After warmup, a logged
    loss above train.diverge_factor x the lowest logged so far (this session) is a runaway."""

    def __init__(self, cfg: Config, position: Position, say):
        self.cfg, self.position, self.say = cfg, position, say
        self.streak = 0  # non-finite steps in a row
        self.lowest_loss = math.inf

    def too_many(self, rec: _Step | None) -> bool:
        """Read whether `rec` was finite (once); True when more than train.max_bad_steps in a row were not."""
        if rec is None or rec.checked:
            return False
        rec.checked = True
        m = rec.metrics
        if bool(jax.device_get(m["finite"])):
            self.streak = 0
            return False
        p = self.position
        self.streak, p.skipped = self.streak + 1, p.skipped + 1
        loss, gnorm = (float(v) for v in jax.device_get((m["loss"], m["grad_norm"])))
        self.say(f"warning: step {rec.step + 1} (data position {rec.step + p.offset}): loss {loss}, grad norm "
                 f"{gnorm}; skipped ({self.streak} in a row, {p.skipped} in all)")
        return self.streak > self.cfg.train.max_bad_steps

    def runaway(self, step: int, loss: float) -> Stop | None:
        """The stop for a runaway logged loss, else None (a non-finite loss is `too_many`'s business)."""
        factor, stop = self.cfg.train.diverge_factor, None
        if not factor or not math.isfinite(loss):
            return None
        if step >= self.cfg.optim.warmup_steps and loss > factor * self.lowest_loss:
            stop = Stop(StopReason.RUNAWAY, f"stopping at step {step + 1}: the training loss {loss:.4g} is above "
                        f"train.diverge_factor={factor:g} x its lowest so far ({self.lowest_loss:.4g}); "
                        f"lower optim.lr or raise optim.warmup_steps")
        self.lowest_loss = min(self.lowest_loss, loss)
        return stop

    def non_finite(self, step: int) -> Stop:
        rollbacks = self.position.rollbacks
        return Stop(StopReason.NON_FINITE, (
            f"stopping at step {step + 1}: more than train.max_bad_steps={self.cfg.train.max_bad_steps} steps "
            f"in a row had a non-finite loss or gradient" + (f" after {rollbacks} rollbacks" if rollbacks else "")
            + "; no checkpoint holds a non-finite value. Lower optim.lr, raise optim.warmup_steps, or set "
            "train.on_bad_steps=rollback to skip the batches"))


@dataclasses.dataclass
class _Parts:
    """The loop's collaborators, built once from the Setup; `Loop` and `Steps` share them."""

    cadence: Cadence
    batches: Batches
    out: Outputs
    records: Records
    guard: Guard
    ckpts: Checkpoints
    signals: SignalStop

    @classmethod
    def of(cls, s: Setup, log) -> _Parts:
        out = Outputs(s, log)
        return cls(Cadence.of(s.cfg, saving=s.saver is not None), Batches(s), out, Records(s, out),
                   Guard(s.cfg, s.position, out.say), Checkpoints(s, log), SignalStop(s.stepper.mesh, s.group.count))

    def rewind(self, bad: int) -> tuple[int, object]:
        """Roll back to the newest checkpoint, past the data up to step `bad`'s: (its step, its state)."""
        self.batches.close()
        step, state = self.ckpts.roll_back(bad)
        self.guard.streak = 0
        self.out.rewind(step)
        self.records.restart(step - 1, self.batches.wait_s)
        self.batches.open(step, self.ckpts.position.offset)
        return step, state


class Steps:
    """The step loop. It dispatches a step, then reads the previous one while this one runs (`_read`)."""

    def __init__(self, s: Setup, parts: _Parts):
        self.s, self.p, self.state = s, parts, s.state
        self.prev: _Step | None = None  # the previous step, read one step late
        self.stop: Stop | None = None

    def run(self) -> tuple[int, Stop]:
        """From setup.start until train.steps or a stop: (the steps done, why they ended), all logged."""
        p, step = self.p, self.s.start
        while step < p.cadence.steps:
            self.state, metrics = self.s.stepper.train(self.state, p.batches.get(step))
            self.stop = p.signals.poll(self.stop)
            due = p.cadence.at(step)
            if self._read(_Step(step, metrics, due.log), now=due.save or due.last):
                if p.ckpts.can_roll_back():
                    self.s.saver.wait()
                    self.prev = self.state = None  # nothing of the abandoned steps is read or kept
                    step, self.state = p.rewind(bad=step)
                    continue  # even after a signal: the run stops after the step that follows
                self.stop = p.guard.non_finite(step)
            if self.stop is not None and self.stop.reason.diverged:
                step += 1
                break
            p.out.advance()
            if due.eval:
                self._log(self.prev)
                p.records.evaluate(step, self.state.params, p.batches.wait_s)
            if due.save:
                p.ckpts.save(step + 1, self.state)
            step += 1
            if self.stop is not None:
                break
        self._log(self.prev)
        return step, self.stop or Stop(StopReason.DONE)

    def _read(self, cur: _Step, now: bool) -> bool:
        """Read the previous step (finite?, then its record), and `cur` too before a checkpoint, the end or
        a stop (`now`); `cur` becomes the previous step. True when too many in a row were non-finite."""
        prev = self.prev
        if self.p.guard.too_many(prev):
            return True  # prev stays: a run that stops here still writes its record
        self._log(prev)
        if self.stop is not None and self.stop.reason.diverged:
            return False
        if (now or self.stop is not None) and self.p.guard.too_many(cur):
            return True
        self.prev = cur
        return False

    def _log(self, rec: _Step | None) -> None:
        """Write `rec`'s metrics record if it is still due; a runaway loss stops the run."""
        if rec is None or not rec.log:
            return
        rec.log = False
        loss = self.p.records.train(rec.step, rec.metrics, self.p.batches.wait_s, self.s.position.skipped,
                                    self.p.batches.epochs(rec.step))
        self.stop = self.p.guard.runaway(rec.step, loss) or self.stop


class Loop:
    """Runs a Setup to its end: opens the outputs, data and signal handlers, runs `Steps`, ends the run
    for its stop (a last evaluation and checkpoint unless it diverged), and closes what it opened."""

    def __init__(self, s: Setup, log=print, handle_signals: bool = False):
        self.s, self.log, self.handle_signals = s, log, handle_signals
        self.p = _Parts.of(s, log)
        self.steps = Steps(s, self.p)

    def run(self) -> RunResult:
        p = self.p
        old_handlers = p.signals.install() if self.handle_signals else {}
        try:
            p.out.open()
            p.out.write_summary("running")
            p.batches.open(self.s.start, self.s.position.offset)
            t0 = time.perf_counter()
            step, stop = self.steps.run()
            self._finish(step, stop)
            loop_s = time.perf_counter() - t0
        finally:
            self._close(old_handlers)
        return RunResult(run_dir=self.s.run_dir, steps=step, stop=stop, loop_s=loop_s, input_wait_s=p.batches.wait_s,
                         input_waits=p.batches.waits,
                         skipped_steps=self.s.position.skipped, eval_loss=p.records.eval.get("eval_loss"),
                         eval_bpb=p.records.eval.get("eval_bpb"), history=p.out.history, summary=p.out.summary)

    def _finish(self, step: int, stop: Stop) -> None:
        """Unless the run diverged, evaluate (not after a signal) and checkpoint its last state."""
        if stop.reason.diverged:
            self.p.out.write_summary(stop.reason.status)
            return
        signalled = stop.reason is StopReason.SIGNAL
        if signalled:
            self.log(f"stopping after step {step} on a signal")
        else:
            self.p.records.evaluate(step - 1, self.steps.state.params, self.p.batches.wait_s)
        if self.s.saver:
            self.p.ckpts.save(step, self.steps.state)
            self.s.saver.wait()
            if signalled:
                self.log(f"checkpoint {step} committed {time.perf_counter() - self.p.signals.at:.1f}s after the signal")
        self.p.out.write_summary(stop.reason.status)

    def _close(self, old_handlers: dict) -> None:
        self.p.batches.close()
        if self.s.saver:
            self.s.saver.close()
        self.p.out.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
