"""The batched L-BFGS that fits the law from thousands of starts at once, and its objective.

One numpy pass evaluates every problem still running, so the 4500 starts of one fit (or
the starts of 20 data sets, or of every bootstrap sample) cost about as much as a few
scipy runs. The objective is the law's: Huber on log L of L(N, D) = E + A/N^alpha + B/D^beta
in log parameters (a, b, e, alpha, beta), with its analytic gradient.
"""

from __future__ import annotations

import dataclasses

import numpy as np

HUBER_DELTA = 1e-3


def huber_objective(x, log_n, log_d, log_loss, weights=None, delta: float = HUBER_DELTA, grad: bool = True):
    """Objective (and gradient) of every row of x (S x 5: a, b, e, alpha, beta) at once.

    f_s = sum_i w_si Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i); weights
    (S x P, e.g. bootstrap counts) default to ones. The data are P points shared by all rows, or
    S x P (one data set per row). Returns f (S,) and, with grad, g (S x 5)."""
    a, b, e, alpha, beta = (x[:, i:i + 1] for i in range(5))
    t1 = a - alpha * log_n
    t2 = b - beta * log_d
    m = np.maximum(np.maximum(t1, t2), e)
    t1 = np.exp(t1 - m)
    t2 = np.exp(t2 - m)
    t3 = np.exp(e - m)
    s = t1 + t2 + t3
    r = np.log(s) + m - log_loss
    psi = np.clip(r, -delta, delta)  # Huber'(r)
    h = psi * (r - 0.5 * psi)  # r^2/2 inside [-delta, delta], delta (|r| - delta/2) outside
    if weights is not None:
        h *= weights
        psi = psi * weights
    f = h.sum(axis=1)
    if not grad:
        return f
    psi /= s
    g1, g2, g3 = t1 * psi, t2 * psi, t3 * psi  # dr/d(a, b, e) are the softmax weights
    g = np.stack([g1.sum(1), g2.sum(1), g3.sum(1), -_rowdot(g1, log_n), -_rowdot(g2, log_d)], axis=1)
    return f, g


def _rowdot(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    return m @ v if v.ndim == 1 else np.einsum("ij,ij->i", m, v)


def _rows(data: tuple, idx) -> tuple:
    """The rows `idx` of the per-problem arrays (2-D) among `data`; shared (1-D) arrays and None as they are."""
    return tuple(v[idx] if v is not None and v.ndim == 2 else v for v in data)


@dataclasses.dataclass
class _History:
    """The last `memory` (s, y) pairs of each problem, newest first; empty slots are zeros (rho = 0),
    so they add nothing to the two-loop recursion."""

    s: np.ndarray  # problems x memory x dim
    y: np.ndarray
    rho: np.ndarray  # problems x memory: 1 / (s . y)

    @classmethod
    def empty(cls, problems: int, memory: int, dim: int) -> _History:
        return cls(np.zeros((problems, memory, dim)), np.zeros((problems, memory, dim)), np.zeros((problems, memory)))

    def direction(self, g: np.ndarray) -> np.ndarray:
        """-H g by the two-loop recursion (scaled steepest descent before the first pair)."""
        memory = self.rho.shape[1]
        q = g.copy()
        alphas = []
        for i in range(memory):  # newest first
            alpha = self.rho[:, i] * np.einsum("ij,ij->i", self.s[:, i], q)
            q -= alpha[:, None] * self.y[:, i]
            alphas.append(alpha)
        yy = np.einsum("ij,ij->i", self.y[:, 0], self.y[:, 0])
        first = 1.0 / np.maximum(np.abs(g).max(axis=1), 1e-300)
        q *= np.where(yy > 0, 1.0 / (self.rho[:, 0] * np.where(yy > 0, yy, 1.0)), first)[:, None]
        for i in reversed(range(memory)):  # oldest first
            beta = self.rho[:, i] * np.einsum("ij,ij->i", self.y[:, i], q)
            q += (alphas[i] - beta)[:, None] * self.s[:, i]
        p = -q
        uphill = np.einsum("ij,ij->i", p, g) >= 0
        p[uphill] = -g[uphill] * first[uphill, None]
        return p

    def push(self, s: np.ndarray, y: np.ndarray, moved: np.ndarray) -> None:
        """Store the pairs with positive curvature (s.y > 0), which keep H positive definite."""
        sy = np.einsum("ij,ij->i", s, y)
        rows = np.flatnonzero(moved & (sy > 0) & (sy > 1e-12 * np.einsum("ij,ij->i", y, y)))
        for hist, new in ((self.s, s), (self.y, y), (self.rho, 1.0 / np.where(sy > 0, sy, 1.0))):
            hist[rows, 1:] = hist[rows, :-1]
            hist[rows, 0] = new[rows]

    def keep(self, mask: np.ndarray) -> None:
        self.s, self.y, self.rho = self.s[mask], self.y[mask], self.rho[mask]


def _line_search(x, f, g, p, data: tuple, max_halvings: int = 40):
    """Backtracking (Armijo, c1 = 1e-4) from step 1 along p, per problem, each new step the minimum of
    the quadratic through f(0), f'(0) and f(step), kept within [0.1, 0.5] x step; returns x, f, g, moved."""
    slope = np.einsum("ij,ij->i", p, g)
    step = np.ones(len(x))
    x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
    pending = np.ones(len(x), bool)
    for _ in range(max_halvings):
        i = np.flatnonzero(pending)
        if not i.size:
            break
        trial = x[i] + step[i, None] * p[i]
        ft, gt = huber_objective(trial, *_rows(data, i))
        ok = ft <= f[i] + 1e-4 * step[i] * slope[i]  # false for nan
        x_new[i[ok]], f_new[i[ok]], g_new[i[ok]] = trial[ok], ft[ok], gt[ok]
        pending[i[ok]] = False
        t, bad = step[i[~ok]], ~ok
        curv = ft[bad] - f[i[bad]] - slope[i[bad]] * t  # > 0: the quadratic through f(0), f'(0), f(t)
        step[i[bad]] = np.clip(np.nan_to_num(-slope[i[bad]] * t * t / (2 * curv), nan=0.1 * t), 0.1 * t, 0.5 * t)
    return x_new, f_new, g_new, ~pending


def minimize_batch(x0, log_n, log_d, log_loss, weights=None, *, memory: int = 10, max_iter: int = 1000,
                   ftol: float = 1e-10, gtol: float = 1e-12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-BFGS on S independent problems at once: row s of x0 starts problem s, whose data are the
    shared points (1-D arrays) or row s of S x P arrays, with weights[s].

    Each problem has its own history, line search and stopping test (relative decrease of f
    below ftol, largest gradient component below gtol, or a failed line search), like scipy's
    L-BFGS-B without bounds; numpy evaluates the problems still running in one pass. Returns the
    end points, their objectives and the iterations each problem ran.

    It runs in centred coordinates, a' = a - alpha m_N and b' = b - beta m_D with m the mean log N
    and log D: the same objective with log N - m_N in place of log N, but without the strong
    correlation of a with alpha (and b with beta) that slows L-BFGS and, from its first, unit-length
    step, throws starts onto plateaus where one term of the law has vanished."""
    data = tuple(None if v is None else np.asarray(v, np.float64) for v in (log_n, log_d, log_loss, weights))
    centre = np.array([np.mean(data[0]), np.mean(data[1])])
    data = (data[0] - centre[0], data[1] - centre[1]) + data[2:]
    x_out = np.array(x0, np.float64)
    x_out[:, :2] -= x_out[:, 3:5] * centre
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        f_out, g = huber_objective(x_out, *data)
        live = np.flatnonzero(np.isfinite(f_out) & np.isfinite(g).all(axis=1))  # rows still running
        x, f, g, rows = x_out[live], f_out[live], g[live], _rows(data, live)
        hist = _History.empty(len(live), memory, x_out.shape[1])
        iters = np.zeros(len(x_out), np.int64)
        for _ in range(max_iter):
            if not live.size:
                break
            x_new, f_new, g_new, moved = _line_search(x, f, g, hist.direction(g), rows)
            hist.push(x_new - x, g_new - g, moved)
            done = ~moved | (f - f_new <= ftol * np.abs(f_new)) | (np.abs(g_new).max(axis=1) <= gtol)
            x, f, g = x_new, f_new, g_new
            iters[live] += 1
            if done.any():
                x_out[live[done]], f_out[live[done]] = x[done], f[done]
                keep = ~done
                live, x, f, g, rows = live[keep], x[keep], f[keep], g[keep], _rows(rows, keep)
                hist.keep(keep)
    x_out[live], f_out[live] = x, f
    x_out[:, :2] += x_out[:, 3:5] * centre
    return x_out, f_out, iters
