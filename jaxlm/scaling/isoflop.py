"""Approach 2 of Hoffmann et al. 2022: one parabola of loss in log N per IsoFLOP budget, its
minimum N_opt, and the exponent a of N_opt ~ C^a across the budgets, with a bootstrap interval."""

from __future__ import annotations

import math

import numpy as np

from jaxlm.scaling.bootstrap import DEFAULT_BOOTSTRAP, ci95
from jaxlm.scaling.points import Points


def _parabola(log_n, loss) -> tuple[np.ndarray, float | None, str]:
    """Least-squares loss = p2 x^2 + p1 x + p0 in x = log N; its minimum's log N or the reason it has none."""
    coef = np.polyfit(log_n, loss, 2)
    if not coef[0] > 0:
        return coef, None, "the parabola opens downward (no minimum)"
    x_min = -coef[1] / (2 * coef[0])
    lo, hi = log_n.min(), log_n.max()
    if not lo < x_min < hi:
        side = "smaller" if x_min <= lo else "larger"
        return coef, None, (f"its minimum N = {math.exp(x_min):.3g} is outside the range of its sizes "
                            f"[{math.exp(lo):.3g}, {math.exp(hi):.3g}] (add {side} models)")
    return coef, float(x_min), ""


def _slope(log_c, log_n_opt) -> tuple[float, float]:
    """(a, const) of the line log N_opt = a log C + const through the budgets' minima."""
    a, const = np.polyfit(log_c, log_n_opt, 1)
    return float(a), float(const)


def isoflop(points: Points, samples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict | None:
    """Approach 2: per IsoFLOP budget, a parabola of loss in log N and its N_opt; then
    log N_opt = a log C + const over the budgets whose minimum lies inside their sizes.

    The interval of a resamples the runs of each budget (with replacement) and refits."""
    rows = np.flatnonzero(points.fitted & np.isfinite(points.isoflop_c))
    if not rows.size:
        return None
    by_c = {c: rows[points.isoflop_c[rows] == c] for c in np.unique(points.isoflop_c[rows])}
    budgets, used = [], {}
    for c, r in by_c.items():
        entry = {"C": float(c), "runs": len(r), "sizes": int(len(np.unique(points.n[r])))}
        if entry["sizes"] < 3:
            entry.update(coef=None, N_opt=None, used=False,
                         reason=f"budget C = {c:.3g} has {entry['sizes']} sizes; a parabola needs 3")
        else:
            coef, x_min, reason = _parabola(np.log(points.n[r]), points.loss[r])
            entry.update(coef=[float(v) for v in coef], N_opt=None if x_min is None else math.exp(x_min),
                         used=x_min is not None, reason=f"budget C = {c:.3g}: {reason}" if reason else "")
            if x_min is not None:
                used[c] = x_min
        budgets.append(entry)
    out = {"budgets": budgets, "a": None, "const": None, "bootstrap_used": 0}
    if len(used) < 2:
        out["reason"] = f"{len(used)} budget(s) with a minimum inside their sizes; the slope needs 2"
        return out
    a, const = _slope(np.log(list(used)), list(used.values()))
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(samples):
        pairs = []
        for c in used:
            r = rng.choice(by_c[c], size=len(by_c[c]))
            if len(np.unique(points.n[r])) >= 3:
                _, x_min, _ = _parabola(np.log(points.n[r]), points.loss[r])
                if x_min is not None:
                    pairs.append((math.log(c), x_min))
        if len(pairs) >= 2:
            boot.append(_slope(*zip(*pairs))[0])
    out.update(a={"value": a, "ci95": ci95(boot) if boot else [None, None]}, const=const,
               bootstrap_used=len(boot), bootstrap_samples=samples)
    return out
