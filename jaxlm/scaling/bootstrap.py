"""Uncertainty: bootstrap refits over runs, their 95% intervals, the runs' scatter around the law,
and the prediction intervals that combine the two."""

from __future__ import annotations

import math

import numpy as np

from jaxlm.scaling.law import BOOT_GRID_STARTS, LawFit, log_loss
from jaxlm.scaling.lbfgs import minimize_batch

DEFAULT_BOOTSTRAP = 200
BOOT_MAX_ITER = 400  # L-BFGS iterations of a bootstrap problem (warm starts converge in about 150)
BOOT_FTOL = 1e-8  # looser than the main fit's 1e-10: the intervals agree to 4 digits, in 3/4 of the time


def bootstrap_law(n, d, loss, law_fit: LawFit, samples: int, seed: int = 0) -> np.ndarray:
    """Parameter rows (samples x 5) refitted to runs resampled with replacement.

    Sample k weights each run by how often it was drawn and runs from the best fit (warm start)
    and from `law_fit.good_starts`; the lowest end point of each sample is kept."""
    return bootstrap_laws(np.asarray(n)[None], np.asarray(d)[None], np.asarray(loss)[None], [law_fit], samples,
                          seed)[0]


def bootstrap_laws(n, d, loss, fits: list[LawFit], samples: int, seed: int = 0) -> np.ndarray:
    """`bootstrap_law` of R data sets (R x P arrays) and their fits at once: R x samples x 5."""
    n, d, loss = (np.log(np.atleast_2d(np.asarray(v, np.float64))) for v in (n, d, loss))
    sets, points = n.shape
    if samples <= 0:
        return np.zeros((sets, 0, 5))
    counts = np.random.default_rng(seed).multinomial(points, np.full(points, 1.0 / points), size=(sets, samples))
    starts = np.stack([np.vstack([ft.x[None], ft.good_starts[np.arange(BOOT_GRID_STARTS) % len(ft.good_starts)]])
                       for ft in fits])  # sets x starts x 5
    shape = (sets, samples, starts.shape[1])
    x0 = np.broadcast_to(starts[:, None], shape + (5,)).reshape(-1, 5)
    weights = np.broadcast_to(counts[:, :, None].astype(np.float64), shape + (points,)).reshape(-1, points)
    data = [v[0] if sets == 1 else np.broadcast_to(v[:, None, None], shape + (points,)).reshape(-1, points)
            for v in (n, d, loss)]
    x, f, _ = minimize_batch(x0, *data, weights, max_iter=BOOT_MAX_ITER, ftol=BOOT_FTOL)
    f = np.where(np.isfinite(f), f, np.inf).reshape(shape)
    best = np.argmin(f, axis=2)
    return x.reshape(shape + (5,))[np.arange(sets)[:, None], np.arange(samples)[None], best]


def ci95(values) -> list[float]:
    """The 2.5% and 97.5% percentiles of the values that are not nan (an infinite bound, written as
    null in fit.json, says the bootstrap could not bound it); nan when there are none."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return [float("nan"), float("nan")]
    method = "linear" if np.isfinite(v).all() else "inverted_cdf"  # interpolating with inf gives nan
    return [float(q) for q in np.percentile(v, [2.5, 97.5], method=method)]


def seed_groups(n, d) -> dict:
    """Row indices by (N, D): the seeds of one run configuration."""
    out: dict = {}
    for i, key in enumerate(zip(np.round(np.log(n), 9), np.round(np.log(d), 9))):
        out.setdefault(key, []).append(i)
    return out


def scatter(n, d, loss, x) -> dict:
    """How far the fitted runs lie from the law, in log L.

    within: pooled standard deviation of log L between seeds of the same (N, D) (0 when no
    configuration has two seeds); between: the part of the scatter of the seed means around
    the law that seed noise does not explain, sqrt(max(0, sum r_g^2 / (G - 5) - within^2 mean(1/n_g)))."""
    resid = np.log(loss) - log_loss(x, n, d)[0]
    groups = list(seed_groups(n, d).values())
    ss = sum(float(((resid[g] - resid[g].mean()) ** 2).sum()) for g in groups)
    dof = sum(len(g) - 1 for g in groups)
    within2 = ss / dof if dof else 0.0
    means = np.array([resid[g].mean() for g in groups])
    inv_n = np.mean([1.0 / len(g) for g in groups])
    between2 = max(0.0, float((means ** 2).sum()) / max(len(groups) - 5, 1) - within2 * inv_n)
    return {"within": math.sqrt(within2), "between": math.sqrt(between2), "configurations": len(groups),
            "replicated": sum(len(g) > 1 for g in groups),
            "rms_relative": float(np.sqrt(np.mean(np.expm1(resid) ** 2)))}


def prediction_interval(x, boot_x, spread: dict, n, d, seeds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted loss and 95% interval of the mean loss of `seeds` seeds at each (n, d).

    In log L: the bootstrap percentile interval of the law's value (fit uncertainty) is widened,
    on each side, in quadrature by 1.96 sqrt(between^2 + within^2 / seeds) (run-to-run scatter)."""
    centre = log_loss(x, n, d)[0]
    noise = 1.96 * np.sqrt(spread["between"] ** 2 + spread["within"] ** 2 / np.asarray(seeds, np.float64))
    if len(boot_x):
        with np.errstate(over="ignore", invalid="ignore"):
            boot = log_loss(boot_x, n, d)
        lo_q, hi_q = np.array([ci95(col) for col in boot.T]).T
        lo_f, hi_f = np.maximum(centre - lo_q, 0.0), np.maximum(hi_q - centre, 0.0)
    else:
        lo_f = hi_f = np.zeros_like(centre)
    lo = centre - np.sqrt(lo_f ** 2 + noise ** 2)
    hi = centre + np.sqrt(hi_f ** 2 + noise ** 2)
    return np.exp(centre), np.exp(lo), np.exp(hi)


def with_ci95(value, samples) -> dict:
    """{"value", "ci95"} as fit.json gives an estimate: no interval without bootstrap samples."""
    return {"value": finite_or_none(value), "ci95": ci95(samples) if len(samples) else [None, None]}


def finite_or_none(v) -> float | None:
    """A float, or None (null in fit.json) where it is not finite."""
    v = float(v)
    return v if math.isfinite(v) else None

