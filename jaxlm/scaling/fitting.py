"""`jaxlm fit`: the law fitted to a sweep's results.csv or to any CSV of (N, D, loss) points.

`fit` runs approach 3 (law.py) with bootstrap intervals (bootstrap.py), approach 2 when the
sweep has IsoFLOP rows (isoflop.py), and the predictions (predict.py), and returns the content
of fit.json; `command` is the CLI around it. docs/scaling.md#fitting has the method and the
keys of fit.json.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from jaxlm.scaling.bootstrap import DEFAULT_BOOTSTRAP, bootstrap_law, scatter, with_ci95
from jaxlm.scaling.isoflop import isoflop
from jaxlm.scaling.law import BEST_RTOL, PARAM_NAMES, fit_law, params
from jaxlm.scaling.lbfgs import HUBER_DELTA
from jaxlm.scaling.points import (CONVENTIONS, DEFAULT_CONVENTION, FitError, Points, check_fittable, file_sha256,
                                  load_source)
from jaxlm.scaling.predict import budget_predictions, holdout_predictions, time_predictions
from jaxlm.scaling.report import format_table, write_result


def fit(points: Points, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, budgets=(), starts=None,
        seconds: float | None = None) -> dict:
    """Approach 3 with bootstrap intervals, approach 2 when there are IsoFLOP rows, held-out
    predictions and budget optima: the content of fit.json (see docs/scaling.md#fitting)."""
    _check_options(points, bootstrap, budgets, seconds)
    check_fittable(points)
    m = points.fitted
    n, d, loss = points.n[m], points.d[m], points.loss[m]
    t0 = time.perf_counter()
    law_fit = fit_law(n, d, loss, starts)
    t1 = time.perf_counter()
    boot = bootstrap_law(n, d, loss, law_fit, bootstrap, seed)
    t2 = time.perf_counter()
    best = params(law_fit.x)
    samples = [params(row) for row in boot]
    spread = scatter(n, d, loss, law_fit.x)
    result = _about(points)
    result["law"] = {key: best[key] for key in ("E", "A", "B", "alpha", "beta")}
    result["law_log"] = dict(zip(PARAM_NAMES, map(float, law_fit.x)))  # log A, log B, log E: finite where A overflows
    for key in ("E", "alpha", "beta", "a", "A", "B"):
        result[key] = with_ci95(best[key], [s[key] for s in samples])
    result["A"]["weakly_identified"] = result["B"]["weakly_identified"] = True
    result["objective"] = {"value": law_fit.objective, "huber_delta": HUBER_DELTA, "on": "log L, summed over runs"}
    result["starts"] = {"count": law_fit.starts, "reached_best": law_fit.starts_at_best, "rtol": BEST_RTOL,
                        "best_start": dict(zip(PARAM_NAMES, map(float, law_fit.best_start)))}
    result["bootstrap"] = {"samples": bootstrap, "seed": seed, "starts_per_sample": 1 + len(law_fit.good_starts)}
    result["scatter"] = spread
    t3 = time.perf_counter()
    result["isoflop"] = isoflop(points, bootstrap, seed)
    result["holdout"] = holdout_predictions(points, law_fit.x, boot, spread)
    result["budgets"] = budget_predictions(law_fit.x, boot, budgets, points.k)
    if seconds is not None:
        result["time_budget"] = time_predictions(points, law_fit.x, boot, spread, seconds)
    result["seconds"] = {"fit": t1 - t0, "bootstrap": t2 - t1, "rest": time.perf_counter() - t3}
    return result


def _check_options(points: Points, bootstrap: int, budgets, seconds: float | None) -> None:
    """Refuse options that cannot apply, before the (long) fit starts."""
    if bootstrap < 0:
        raise FitError(f"--bootstrap {bootstrap}: give a number of samples >= 0")
    bad = [c for c in budgets if not (math.isfinite(c) and c > 0)]
    if bad:
        raise FitError(f"--budget {bad[0]}: a compute budget must be a positive number of FLOPs, e.g. 1e18")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise FitError(f"--seconds {seconds}: give a positive wall time in seconds, e.g. 300")
    if seconds is not None and points.columns is not None:
        raise FitError("--seconds needs a sweep's results.csv: the throughput of each size comes from its runs' "
                       "tokens and wall_s")


def _about(points: Points) -> dict:
    """The keys of fit.json that say what was fitted: the source, its convention, the runs."""
    return {
        "source": {"path": points.source, "sha256": file_sha256(points.source), "columns": points.columns},
        "convention": points.convention,
        "convention_note": CONVENTIONS[points.convention][2] if points.convention in CONVENTIONS
        else _columns_note(points.columns),
        "k": points.k, "k_note": points.k_note, "points": int(points.fitted.sum()),
        "held_out_runs": [points.names[i] for i in np.flatnonzero(points.held_out)],
        "excluded": points.excluded,
    }


def _columns_note(columns: dict) -> str:
    if columns["d_col"]:
        return f"N = '{columns['n_col']}', D = '{columns['d_col']}', C = 6ND"
    return f"N = '{columns['n_col']}', C = '{columns['c_col']}', D = C / (6N)"


def add_arguments(parser) -> None:
    """The arguments of `jaxlm fit` (the caller sets func=command)."""
    parser.add_argument("source", metavar="SWEEP_DIR_OR_CSV",
                        help="a sweep directory (its results.csv), a results.csv, or any CSV with --n-col ...")
    parser.add_argument("--convention", choices=list(CONVENTIONS), default=None,
                        help=f"which N and C a sweep's results.csv gives (default {DEFAULT_CONVENTION}: "
                             "all parameters and C = 6ND, as Hoffmann et al.)")
    parser.add_argument("--n-col", help="points CSV: the column of N (parameters)")
    parser.add_argument("--d-col", help="points CSV: the column of D (training tokens)")
    parser.add_argument("--c-col", help="points CSV: the column of C (training FLOPs), instead of --d-col; "
                                        "D = C / (6N)")
    parser.add_argument("--loss-col", help="points CSV: the column of the loss")
    parser.add_argument("--holdout", action="append", default=[], metavar="SIZE",
                        help="leave the runs of this size label out of the fit and predict them (repeatable)")
    parser.add_argument("--budget", action="append", type=float, default=[], metavar="C",
                        help="report the compute-optimal N*, D*, L* of this budget in FLOPs, e.g. 1e18 "
                             "(repeatable)")
    parser.add_argument("--seconds", type=float, default=None, metavar="S",
                        help="sweep only: what each size reaches in S seconds of wall time at the throughput its "
                             "runs measured, and the best size (e.g. 300)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="K",
                        help=f"bootstrap samples for the intervals (default {DEFAULT_BOOTSTRAP}; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    parser.add_argument("--out", metavar="DIR",
                        help="where fit.json goes (default: the sweep directory, or the CSV's directory)")
    parser.add_argument("--plot", action="store_true", help="also draw the sweep figures into OUT/plots")
    parser.add_argument("--accuracy", choices=("acc", "acc_norm"), default=None,
                        help="a task-scored sweep (`jaxlm sweep eval SWEEP_DIR --task FILE`): also fit this accuracy "
                             "against loss (a sigmoid) and predict the held-out sizes' accuracy")


def command(args) -> tuple[Points, dict, str]:
    """`jaxlm fit` without its figures: fit, print the table, write fit.json. Returns (points, the
    fit, the output directory), from which `jaxlm fit --plot` draws (jaxlm.scaling.plot)."""
    points = load_source(args.source, args.convention, args.holdout, args.n_col, args.loss_col, args.d_col,
                         args.c_col)
    result = fit(points, bootstrap=args.bootstrap, seed=args.seed, budgets=args.budget,
                 seconds=getattr(args, "seconds", None))
    out = args.out or os.path.dirname(os.path.abspath(points.source))
    if getattr(args, "accuracy", None):
        from jaxlm.scaling.accuracy import accuracy_fit, format_accuracy

        result["accuracy"] = accuracy_fit(points, result, args.accuracy, args.bootstrap, args.seed)
        print(format_accuracy(result["accuracy"]))
    print(format_table(result))
    print(f"wrote {write_result(result, out)}")
    return points, result, out
