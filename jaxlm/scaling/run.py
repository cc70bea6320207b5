"""Running a sweep: the runs not finished yet, one after the other in this process, so running the
same command again after an interruption (or a failed run) finishes the sweep; then results.csv.

A sweep directory is refused when its runs were trained with another config than the sweep
file now gives them (`check_drift`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time

from omegaconf import OmegaConf

from jaxlm import files
from jaxlm.config import Config, to_yaml
from jaxlm.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_RUNS_FAILED, ConfigError
from jaxlm.scaling.plan import PlannedRun, command, error_path, human, log_path, plan, run_config, run_dir
from jaxlm.scaling.results import run_status, write_results
from jaxlm.scaling.sweep_file import Sweep


def _flat_yaml(text: str) -> dict:
    """A YAML config as {dotted key: value}, to compare two configs key by key."""
    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    return dict(walk(OmegaConf.to_container(OmegaConf.create(text))))


def check_drift(sweep: Sweep, runs: list[PlannedRun]) -> None:
    """Refuse to continue a sweep directory whose runs were trained with another config than the file
    now gives them (a finished run would be counted under the new settings). A key the stored config
    lacks is no change when the file gives it its default: a setting added to jaxlm after the run."""
    defaults = _flat_yaml(to_yaml(Config()))
    for r in runs:
        path = os.path.join(run_dir(sweep, r.name), "config.yaml")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            old = _flat_yaml(f.read())
        new = _flat_yaml(to_yaml(run_config(sweep, r)))
        differ = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(old.keys() | new.keys())
                  if old.get(k) != new.get(k) and not (k not in old and new.get(k) == defaults.get(k))]
        if differ:
            raise ConfigError(f"run {r.name} in {sweep.dir} was trained with another config than the sweep file now "
                              f"gives it: {', '.join(differ[:5])}; restore the file, use another --dir, or "
                              f"delete {run_dir(sweep, r.name)}")


def _train(sweep: Sweep, r: PlannedRun) -> str:
    """Train (or resume) one run; its log goes to <sweep>/logs/<run>.log. Returns its status."""
    import jax

    from jaxlm import checkpoint as ckpt
    from jaxlm.errors import DivergedError, JaxlmError
    from jaxlm.train import run as train_run

    d, error = run_dir(sweep, r.name), error_path(sweep, r.name)
    restart = os.path.isdir(d) and not ckpt.steps(d)  # started, never reached a checkpoint
    os.makedirs(os.path.dirname(error), exist_ok=True)
    with open(log_path(sweep, r.name), "a", encoding="utf-8") as logf:
        def log(msg: str) -> None:
            logf.write(msg + "\n")
            logf.flush()

        log(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {'restarting' if restart else 'starting'}: {command(sweep, r)}")
        try:
            result = train_run(run_config(sweep, r), restart=restart, handle_signals=True, log=log)
        except DivergedError as e:
            log(f"diverged: {e}")
            return "diverged"
        except JaxlmError as e:
            log(f"failed: {type(e).__name__}: {e}")
            with open(error, "w", encoding="utf-8") as f:
                f.write(f"{type(e).__name__}: {e}\n")
            return "failed"
        finally:
            jax.clear_caches()
    if os.path.exists(error):
        os.remove(error)
    return "stopped" if result.stopped_by_signal else "done"


def _describe_end(sweep: Sweep, r: PlannedRun, status: str, seconds: float) -> str:
    """The log line of a run that ended: its status, time, and score (or where its log is)."""
    from jaxlm import summary

    s = summary.read(run_dir(sweep, r.name)) or {}
    ev = s.get("last_eval") or {}
    score = f", validation loss {ev['loss']:.4f}" + (f" ({ev['bpb']:.4f} bits/byte)" if "bpb" in ev else "") \
        if status == "done" and "loss" in ev else ""
    why = ""
    if status in ("diverged", "failed"):
        why = f" (see {log_path(sweep, r.name)})"
    return f"{r.name}: {status} in {seconds:.0f}s{score}{why}"


def run_sweep(sweep: Sweep, only: str | None = None, log=print) -> int:
    """Train every unfinished run (or only `only`), then write results.csv/.json. Returns the exit code."""
    runs = plan(sweep)
    by_name = {r.name: r for r in runs}
    if only is not None and only not in by_name:
        hint = difflib.get_close_matches(only, by_name, n=1)
        raise ConfigError(f"sweep has no run '{only}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    check_drift(sweep, runs)
    _write_sweep_files(sweep, runs)
    todo = [r for r in runs if only in (None, r.name)]
    t0 = time.perf_counter()
    for i, r in enumerate(todo, 1):
        status = run_status(sweep, r)
        if status in ("done", "diverged"):
            log(f"[{i}/{len(todo)}] {r.name}: {status} already")
            continue
        source = run_status(sweep, by_name[r.branch_of]) if r.kind == "branch" else ""
        if source in ("diverged", "failed", "new"):
            log(f"[{i}/{len(todo)}] {r.name}: not run, its stable run {r.branch_of} is {source}")
            continue
        log(f"[{i}/{len(todo)}] {r.name}: {'resuming' if status == 'partial' else 'training'} {r.steps} steps "
            f"({human(r.tokens)} tokens, N={r.counts['non_embedding']:,} non-embedding, lr {r.lr:.3g}"
            + (f", branch of {r.branch_of} at step {r.branch_step}" if r.kind == "branch" else "") + ")")
        start = time.perf_counter()
        status = _train(sweep, r)
        log(f"[{i}/{len(todo)}] " + _describe_end(sweep, r, status, time.perf_counter() - start))
        if status == "stopped":
            write_results(sweep, runs)
            log(f"sweep interrupted after {time.perf_counter() - t0:.0f}s; run the same command again to continue")
            return EXIT_PREEMPTED
    return _finish(sweep, runs, only, t0, log)


def _finish(sweep: Sweep, runs: list[PlannedRun], only: str | None, t0: float, log) -> int:
    """Write results.csv/.json, log how the sweep stands, and return the exit code: 1 while a run
    that should have finished has not (a diverged stable run's branches are not expected to)."""
    by_name = {r.name: r for r in runs}
    rows = write_results(sweep, runs)
    done = sum(row["status"] == "done" for row in rows)
    status = {r.name: run_status(sweep, r) for r in runs}  # each run's summary read once
    left = [r.name for r in runs if status[r.name] not in ("done", "diverged")]
    log(f"sweep {sweep.name}: {done} of {len(runs)} runs done"
        + "".join(f", {sum(row['status'] == s for row in rows)} {s}" for s in ("diverged", "failed")
                  if any(row["status"] == s for row in rows))
        + (f", {len(left)} not finished" if left else "")
        + f"; results in {os.path.join(sweep.dir, 'results.csv')} ({time.perf_counter() - t0:.0f}s)")
    unfinished = [n for n in left if only in (None, n)
                  and not (by_name[n].kind == "branch" and status[by_name[n].branch_of] == "diverged")]
    if unfinished:  # failed, or a branch not run because its stable run failed: not a finished sweep
        log(f"not finished: {', '.join(unfinished)}; fix the cause (logs/<run>.error) and run the same command "
            "again (exit 1)")
        return EXIT_RUNS_FAILED
    return EXIT_OK


def _write_sweep_files(sweep: Sweep, runs: list[PlannedRun]) -> None:
    """The sweep file as it was run and plan.json (every run and its command) in the sweep directory."""
    os.makedirs(sweep.dir, exist_ok=True)
    with open(sweep.path, encoding="utf-8") as f:
        text = f.read()
    files.write_text(os.path.join(sweep.dir, "sweep.yaml"), text)
    files.write_json(os.path.join(sweep.dir, "plan.json"),
                     {"sweep": sweep.name, "file": sweep.path, "base": sweep.base,
                      "runs": [dict(dataclasses.asdict(r), command=command(sweep, r)) for r in runs]}, indent=1)

