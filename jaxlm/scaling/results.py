"""A sweep's results: where each run stands, one row per finished run, results.csv / results.json,
and the same rows rescored on another corpus.

`RESULT_COLUMNS` is the results.csv format, defined here only: `jaxlm fit` reads these columns
(points.CONVENTIONS names the ones each convention needs).
"""

from __future__ import annotations

import csv
import json
import os
import time

from jaxlm import files
from jaxlm.errors import ConfigError
from jaxlm.metrics import FLOP_CONVENTIONS
from jaxlm.scaling.plan import PlannedRun, error_path, run_dir
from jaxlm.scaling.sweep_file import Sweep

RESULT_COLUMNS = ("name", "size", "n_total", "n_non_embedding", "n_embedding", "n_head", "n_matmul", "tokens",
                  "steps", *(f"c_{k}" for k in FLOP_CONVENTIONS), "loss", "loss_lo", "loss_hi", "bpb", "bpb_lo",
                  "bpb_hi", "lr", "seed", "budget", "isoflop_c", "holdout", "wall_s", "status", "kind", "branch_of",
                  "acc", "acc_lo", "acc_hi", "acc_norm", "acc_norm_lo", "acc_norm_hi", "chance")
FINISHED = ("done", "diverged", "failed")


def run_status(sweep: Sweep, r: PlannedRun) -> str:
    """new, partial (started, not finished), done, diverged, or failed (its last attempt raised)."""
    from jaxlm import summary

    d = run_dir(sweep, r.name)
    s = summary.read(d) if os.path.isdir(d) else None
    if s and s.get("status") in ("done", "diverged"):
        return s["status"]
    if os.path.exists(error_path(sweep, r.name)):
        return "failed"
    return "partial" if os.path.isdir(d) else "new"


def result_row(sweep: Sweep, r: PlannedRun) -> dict | None:
    """One results row for a finished run (done, diverged or failed), else None."""
    from jaxlm import summary

    status = run_status(sweep, r)
    if status not in FINISHED:
        return None
    s = summary.read(run_dir(sweep, r.name)) or {}
    counts = s.get("params") or r.counts
    flops = s.get("training_flops") or {}
    ev = (s.get("last_eval") or {}) if status == "done" else {}
    row = {"name": r.name, "size": r.size, "tokens": s.get("tokens", r.tokens), "steps": s.get("steps", 0),
           "lr": r.lr, "seed": r.seed, "budget": r.budget, "isoflop_c": r.isoflop_c if r.isoflop_c else "",
           "holdout": int(r.holdout), "wall_s": round(float(s.get("wall_s", 0.0)), 2), "status": status,
           "kind": r.kind, "branch_of": r.branch_of}
    row.update({f"n_{k}": counts.get(k, "") for k in ("total", "non_embedding", "embedding", "head", "matmul")})
    row.update({f"c_{k}": flops.get(k, "") for k in FLOP_CONVENTIONS})
    row.update(_scores(ev))
    return row


def _scores(record: dict) -> dict:
    """The loss and bits-per-byte columns (value and 95% interval) of an evaluation record."""
    out = {}
    for key in ("loss", "bpb"):
        ci = record.get(f"{key}_ci95") or ["", ""]
        out.update({key: record.get(key, ""), f"{key}_lo": ci[0], f"{key}_hi": ci[1]})
    return out


def write_results(sweep: Sweep, runs: list[PlannedRun], directory: str | None = None) -> list[dict]:
    """Collect the rows of the finished runs and save them (in the sweep directory by default)."""
    rows = [row for row in (result_row(sweep, r) for r in runs) if row is not None]
    save_results(directory or sweep.dir, rows, {"sweep": sweep.name, "file": sweep.path})
    return rows


def save_results(directory: str, rows: list[dict], about: dict) -> None:
    """results.csv (RESULT_COLUMNS) and results.json ({about..., "runs": rows}) in `directory`."""
    with files.atomic_open(os.path.join(directory, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    files.write_json(os.path.join(directory, "results.json"), dict(about, runs=rows), indent=1)


def read_results(directory: str) -> list[dict]:
    path = os.path.join(directory, "results.json")
    if not os.path.exists(path):
        raise ConfigError(f"'{directory}' holds no results.json: run `jaxlm sweep SWEEP.yaml` (or point at a "
                          f"sweep directory)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["runs"]


def rescore(sweep_dir: str, source: str, name: str = "", log=print) -> str:
    """Score every finished run's final checkpoint on `source` with the evaluation harness; writes
    <sweep_dir>/rescored/<name>/results.csv/.json (the sweep's rows with this loss and bits per byte),
    which `jaxlm fit` reads like a sweep directory. Returns that directory."""
    from jaxlm.evaluate import evaluate

    rows = [row for row in read_results(sweep_dir) if row["status"] == "done"]
    if not rows:
        raise ConfigError(f"sweep '{sweep_dir}' has no finished run to rescore")
    out_dir = os.path.join(sweep_dir, "rescored", name or files.slug(source))
    out = []
    for i, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        rec = evaluate(os.path.join(sweep_dir, "runs", row["name"]), data=source)[-1]
        out.append(dict(row, **_scores(rec)))
        log(f"[{i}/{len(rows)}] {row['name']}: loss {rec['loss']:.4f}"
            + (f" ({rec['bpb']:.4f} bits/byte)" if "bpb" in rec else "") + f" in {time.perf_counter() - t0:.0f}s")
    save_results(out_dir, out, {"sweep_dir": os.path.abspath(sweep_dir), "data": source})
    log(f"rescored {len(out)} runs on {source}: {os.path.join(out_dir, 'results.csv')}")
    return out_dir


def rescore_task(sweep_dir: str, task_file: str, name: str = "", fewshot: int = 0, log=print) -> str:
    """Multiple-choice accuracy (`jaxlm eval --task`) of every finished run's final checkpoint; writes
    <sweep_dir>/rescored/<name>/results.csv/.json: the sweep's rows (their own validation loss) with the
    acc, acc_norm and chance columns, which `jaxlm fit DIR --accuracy acc` fits. Returns that directory."""
    from jaxlm.evaluate import evaluate_task
    from jaxlm.tasks import read_task

    task = read_task(task_file, fewshot)  # a bad task file fails before any run is opened
    chance = sum(1.0 / len(c) for c in task.choices) / len(task.choices)
    rows = [row for row in read_results(sweep_dir) if row["status"] == "done"]
    if not rows:
        raise ConfigError(f"sweep '{sweep_dir}' has no finished run to score")
    out_dir = os.path.join(sweep_dir, "rescored", name or f"task-{files.slug(task.name)}")
    out = []
    for i, row in enumerate(rows, 1):
        rec = evaluate_task(os.path.join(sweep_dir, "runs", row["name"]), task_file, fewshot=fewshot,
                            log=lambda m: None)[-1]
        out.append(dict(row, chance=chance, **{f"{k}{s}": v for k in ("acc", "acc_norm")
                                               for s, v in zip(("", "_lo", "_hi"), (rec[k], *rec[f"{k}_ci95"]))}))
        log(f"[{i}/{len(rows)}] {row['name']}: loss {row['loss']}, acc {rec['acc']:.4f} (95% "
            f"{rec['acc_ci95'][0]:.3f}..{rec['acc_ci95'][1]:.3f}), acc_norm {rec['acc_norm']:.4f} in "
            f"{rec['eval_s']:.1f}s")
    save_results(out_dir, out, {"sweep_dir": os.path.abspath(sweep_dir), "task": os.path.abspath(task_file),
                                "fewshot": fewshot})
    log(f"scored {len(out)} runs on {task_file}: {os.path.join(out_dir, 'results.csv')}")
    return out_dir
