"""The law L(N, D) = E + A/N^alpha + B/D^beta: its value, its compute-optimal point, and its fit.

Approach 3 of Hoffmann et al. 2022 (arXiv 2203.15556), fitted as Besiroglu et al. 2024
(arXiv 2404.10102) did: parameters x = (a, b, e, alpha, beta) with a = log A, b = log B,
e = log E, minimising Huber(1e-3) of LSE(a - alpha log N, b - beta log D, e) - log L from a
grid of 4500 starts (`lbfgs.minimize_batch`); scipy's L-BFGS-B then polishes the best end points.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxlm.scaling.lbfgs import huber_objective, minimize_batch

PARAM_NAMES = ("a", "b", "e", "alpha", "beta")
BEST_RTOL = 1e-6  # a start "reaches the best" when its objective is within this relative tolerance
BOOT_GRID_STARTS = 4  # grid starts (besides the warm start) each bootstrap sample runs from


def grid_starts() -> np.ndarray:
    """Besiroglu et al.'s 4500 starts, rows (a, b, e, alpha, beta): a, b in {0, 5, ..., 25},
    e in {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2}."""
    ab = np.arange(0.0, 26.0, 5.0)
    e = np.arange(-1.0, 1.01, 0.5)
    ex = np.arange(0.0, 2.01, 0.5)
    grid = np.meshgrid(ab, ab, e, ex, ex, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def log_loss(x, n, d) -> np.ndarray:
    """log L(N, D) of parameter rows x (K x 5: a, b, e, alpha, beta) at points n, d: K x P."""
    x = np.atleast_2d(x)
    a, b, e, alpha, beta = (x[:, i:i + 1] for i in range(5))
    return np.logaddexp(np.logaddexp(a - alpha * np.log(n), b - beta * np.log(d)), e)


def optimum(x, c, k: float = 6.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute-optimal N*, D*, L* (each K x len(c)) of parameter rows x under C = k N D.

    Minimising A/N^alpha + B/D^beta with N D = C/k gives N* = G (C/k)^(beta/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)), and D* = (C/k) / N*; nan where alpha or beta <= 0."""
    x = np.atleast_2d(x)
    a, b, alpha, beta = x[:, 0:1], x[:, 1:2], x[:, 3:4], x[:, 4:5]
    log_x = np.log(np.asarray(c, np.float64) / k)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ok = (alpha > 0) & (beta > 0)
        log_g = (np.log(np.where(ok, alpha, 1.0)) + a - np.log(np.where(ok, beta, 1.0)) - b) / (alpha + beta)
        log_n = np.where(ok, log_g + beta / (alpha + beta) * log_x, np.nan)
        n = np.exp(log_n)
        d = np.exp(log_x - log_n)
        loss = np.exp(np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * (log_x - log_n)), x[:, 2:3]))
    return n, d, loss


def params(x) -> dict:
    """{E, A, B, alpha, beta, a} of one parameter row."""
    a, b, e, alpha, beta = (float(v) for v in x)
    big = math.log(np.finfo(np.float64).max)  # a bootstrap sample may run A or B off to infinity
    ex = lambda v: math.exp(v) if v < big else math.inf  # noqa: E731
    return {"E": ex(e), "A": ex(a), "B": ex(b), "alpha": alpha, "beta": beta,
            "a": beta / (alpha + beta) if alpha + beta else float("nan")}


@dataclasses.dataclass
class LawFit:
    """The best end point of one fit, and which starts got there (the bootstrap starts from them)."""

    x: np.ndarray  # best (a, b, e, alpha, beta)
    objective: float
    starts: int
    best_start: np.ndarray  # the start whose end point was best
    starts_at_best: int  # starts whose objective came within BEST_RTOL of the best
    good_starts: np.ndarray  # the starts that reached the best in the fewest iterations (the bootstrap reuses them)


def fit_law(n, d, loss, starts=None, polish: int = 3) -> LawFit:
    """Approach 3 on points n, d, loss: all starts (default `grid_starts`) by `minimize_batch`,
    then scipy L-BFGS-B (analytic gradient) from the `polish` best end points; the lowest wins."""
    return fit_laws(np.asarray(n)[None], np.asarray(d)[None], np.asarray(loss)[None], starts, polish)[0]


def fit_laws(n, d, loss, starts=None, polish: int = 3) -> list[LawFit]:
    """`fit_law` of R data sets at once (n, d, loss: R x P arrays), in one `minimize_batch`."""
    n, d, loss = (np.log(np.atleast_2d(np.asarray(v, np.float64))) for v in (n, d, loss))
    starts = grid_starts() if starts is None else np.asarray(starts, np.float64)
    sets, count = len(n), len(starts)
    data = [v[0] if sets == 1 else np.repeat(v, count, axis=0) for v in (n, d, loss)]
    x, f, iters = minimize_batch(np.tile(starts, (sets, 1)), *data)
    f = np.where(np.isfinite(f), f, np.inf)
    x, f, iters = x.reshape(sets, count, 5), f.reshape(sets, count), iters.reshape(sets, count)
    return [_best_of(starts, x[r], f[r], iters[r], (n[r], d[r], loss[r]), polish) for r in range(sets)]


def _best_of(starts, x, f, iters, data, polish: int) -> LawFit:
    """The lowest of the batched end points after scipy polishes the `polish` best of them."""
    from scipy.optimize import minimize

    def fun(theta):
        fv, gv = huber_objective(theta[None], *data)
        return float(fv[0]), gv[0]

    order = np.argsort(f, kind="stable")
    best_x, best_f = x[order[0]], f[order[0]]
    for i in order[:polish]:
        res = minimize(fun, x[i], jac=True, method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-15,
                                                                         "gtol": 1e-12})
        if res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    reached = np.flatnonzero(f <= best_f * (1 + BEST_RTOL) + 1e-300)
    pick = reached[np.argsort(iters[reached], kind="stable")[:BOOT_GRID_STARTS]]  # the quickest to get there
    return LawFit(x=np.array(best_x), objective=float(best_f), starts=len(starts), best_start=starts[order[0]],
                  starts_at_best=len(reached), good_starts=starts[pick] if len(reached) else starts[order[:1]])
