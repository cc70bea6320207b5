"""Downstream accuracy against loss: a sigmoid fitted to a sweep's runs, and predictions for held-out sizes.

As in the second step of OLMo's model ladder (Bhagia et al. 2024, "Establishing Task Scaling Laws via
Compute-Efficient Model Ladders"), accuracy is a sigmoid of loss:

    acc(L) = chance + a / (1 + exp(k (L - L0)))

with chance = the mean of 1 / (number of choices) over the task's examples, fixed, and a in
[0, 1 - chance], k > 0 and L0 fitted by least squares over the fitted (not held-out) runs, each
run's accuracy against its validation loss. A held-out size is predicted twice: from the loss the
law L(N, D) predicts for it (the two steps chained, as the ladder does) and from its measured loss
(the sigmoid alone). Intervals: the sigmoid refitted to runs resampled with replacement gives the
2.5 and 97.5 percentiles at the loss (for the chained prediction, the widest over the point and the
ends of the law's 95% loss interval); the runs' scatter around the curve (1.96 rmse: task sampling
noise and what the curve misses, kept whole for a mean of seeds) is added to each side in quadrature.

What a CPU-sized sweep can show: models of a few million parameters sit near chance on most real
tasks, so the fit sees the start of the curve only, and its L0 and k are poorly pinned; a task the
models do learn (the synthetic sentiment task of tools/make_sentiment.py) shows the shape.
"""

from __future__ import annotations

import math

import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.scaling.points import Points, read_csv

METRICS = ("acc", "acc_norm")
Z95 = 1.959964
MIN_RUNS = 4


def sigmoid(loss, chance: float, a: float, k: float, l0: float):
    return chance + a / (1.0 + np.exp(np.clip(k * (np.asarray(loss, np.float64) - l0), -60, 60)))


def fit_sigmoid(loss: np.ndarray, acc: np.ndarray, chance: float, weights: np.ndarray | None = None,
                x0=None) -> np.ndarray:
    """(a, k, L0) minimising the (weighted) squared error, from a few starts (or from `x0` alone)."""
    from scipy.optimize import least_squares

    loss, acc = np.asarray(loss, np.float64), np.asarray(acc, np.float64)
    w = np.ones_like(loss) if weights is None else np.sqrt(np.asarray(weights, np.float64))
    span = max(float(loss.max() - loss.min()), 1e-3)
    lo, hi = [0.0, 1e-6, loss.min() - 5 * span], [1.0 - chance, 1e4, loss.max() + 5 * span]
    starts = [np.clip(x0, lo, hi)] if x0 is not None else [
        [0.5 * (1 - chance), k0, l0] for k0 in (1.0 / span, 4.0 / span, 16.0 / span)
        for l0 in np.quantile(loss, [0.25, 0.5, 0.75])]
    best = None
    for start in starts:
        r = least_squares(lambda p: w * (sigmoid(loss, chance, *p) - acc), start, bounds=(lo, hi))
        if best is None or r.cost < best.cost:
            best = r
    return best.x


def _columns(points: Points, metric: str) -> tuple[np.ndarray, float]:
    """(accuracy of each point, chance level) from the source CSV's `metric` and `chance` columns."""
    header, rows = read_csv(points.source)
    by_name = {r["name"]: r for r in rows}
    if metric not in header or "chance" not in header or not all(by_name[n].get(metric) for n in points.names):
        raise ConfigError(f"{points.source} has no '{metric}' column: score the sweep's runs on a task first "
                          "(`jaxlm sweep eval SWEEP_DIR --task FILE.jsonl`) and fit its rescored directory")
    try:
        acc = np.array([float(by_name[n][metric]) for n in points.names])
        chance = float(by_name[points.names[0]]["chance"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{points.source}: a finished run has no {metric} value ({e})") from None
    return acc, chance


def accuracy_fit(points: Points, law: dict, metric: str = "acc", bootstrap: int = 200, seed: int = 0) -> dict:
    """The sigmoid over the fitted runs and the held-out predictions (module docstring); `law` is
    `fitting.fit`'s result (its held-out loss predictions)."""
    if metric not in METRICS:
        raise ConfigError(f"--accuracy {metric}: choose {' or '.join(METRICS)}")
    acc, chance = _columns(points, metric)
    m = points.fitted
    if int(m.sum()) < MIN_RUNS:
        raise ConfigError(f"the accuracy fit needs at least {MIN_RUNS} fitted runs, got {int(m.sum())}")
    loss, y = points.loss[m], acc[m]
    x = fit_sigmoid(loss, y, chance)
    rng = np.random.default_rng(seed)
    boots = [fit_sigmoid(loss, y, chance, rng.multinomial(len(y), np.full(len(y), 1 / len(y))) + 1e-9, x)
             for _ in range(bootstrap)]
    resid = y - sigmoid(loss, chance, *x)
    out = {"metric": metric, "chance": chance, "a": float(x[0]), "k": float(x[1]), "L0": float(x[2]),
           "rmse": float(math.sqrt(np.mean(resid ** 2))), "runs": int(m.sum()), "bootstrap": bootstrap,
           "formula": "acc(L) = chance + a / (1 + exp(k (L - L0)))", "held_out": []}
    for h in law.get("holdout", []):
        rows = [points.names.index(n) for n in h["runs"]]
        measured = float(acc[rows].mean())
        item = {"size": h["size"], "runs": h["runs"], "measured_acc": measured, "measured_loss": h["measured"]}
        scatter = Z95 * out["rmse"]  # one run's scatter around the curve (not divided by the seeds: it is not all noise)
        for label, at, ends in (("from_law", h["predicted"], h["ci95"]), ("from_loss", h["measured"], [])):
            point = float(sigmoid(at, chance, *x))
            ci = None
            if boots:
                curves = np.array([sigmoid([at, *ends], chance, *b) for b in boots])  # samples x losses
                lo = float(np.min(np.percentile(curves, 2.5, axis=0)))
                hi = float(np.max(np.percentile(curves, 97.5, axis=0)))
                ci = [point - math.hypot(point - lo, scatter), point + math.hypot(hi - point, scatter)]
            item[label] = {"loss": float(at), "acc": point, "ci95": ci,
                           "inside": bool(ci[0] <= measured <= ci[1]) if ci else None}
        out["held_out"].append(item)
    return out


def format_accuracy(res: dict) -> str:
    lines = [f"{res['metric']}(L) = {res['chance']:.3f} + {res['a']:.3f} / (1 + exp({res['k']:.3g} (L - "
             f"{res['L0']:.4f}))) over {res['runs']} runs; rmse {res['rmse']:.4f}"]
    for h in res["held_out"]:
        for label in ("from_law", "from_loss"):
            p = h[label]
            ci = "" if p["ci95"] is None else " (95% {:.3f}..{:.3f})".format(*p["ci95"])
            lines.append(f"  held out {h['size']}: predicted {res['metric']} {p['acc']:.3f}{ci} at loss "
                         f"{p['loss']:.4f} ({label.replace('_', ' ')}); measured {h['measured_acc']:.3f}")
    return "\n".join(lines)
