"""`jaxlm fit`: scaling laws fitted to a sweep's results.csv or to any CSV of (N, D, loss) points.

Approach 3 of Hoffmann et al. 2022 (arXiv 2203.15556), fitted as Besiroglu et al. 2024
(arXiv 2404.10102) did: L(N, D) = E + A/N^alpha + B/D^beta with a = log A, b = log B,
e = log E, minimising the sum over points of Huber(1e-3) of LSE(a - alpha log N,
b - beta log D, e) - log L from a grid of 4500 starts. The starts run together in a
vectorised L-BFGS (`minimize_batch`); scipy's L-BFGS-B then polishes the best end points.
A bootstrap over runs gives 95% intervals, prediction intervals for held-out runs and the
compute-optimal N*, D*, L* of given budgets. Approach 2 (one parabola per IsoFLOP budget)
runs when the sweep has IsoFLOP rows. docs/scaling.md#fitting has the method and the
keys of fit.json.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os

import numpy as np

from jaxlm.errors import ConfigError

HUBER_DELTA = 1e-3
BEST_RTOL = 1e-6  # a start "reaches the best" when its objective is within this relative tolerance
DEFAULT_BOOTSTRAP = 200
DEFAULT_CONVENTION = "total"
MIN_POINTS = 5
MIN_DISTINCT = 3  # distinct N and distinct D values the law needs
BOOT_GRID_STARTS = 4  # grid starts (besides the warm start) each bootstrap sample runs from
BOOT_MAX_ITER = 400  # L-BFGS iterations of a bootstrap problem (warm starts converge in about 150)
BOOT_FTOL = 1e-8  # looser than the main fit's 1e-10: the intervals agree to 4 digits, in 3/4 of the time
PARAM_NAMES = ("a", "b", "e", "alpha", "beta")

# convention -> (N column, C column or None for C = 6ND, what it means)
CONVENTIONS = {
    "total": ("n_total", None, "N = n_total (all parameters), C = 6ND (Hoffmann et al. 2022)"),
    "non_embedding": ("n_non_embedding", None, "N = n_non_embedding, C = 6ND (Kaplan et al. 2020)"),
    "6N+attn": ("n_matmul", "c_6N+attn", "N = n_matmul, C = c_6N+attn (6N plus attention FLOPs)"),
    "palm": ("n_matmul", "c_palm", "N = n_matmul, C = c_palm (PaLM's FLOP count)"),
}
SWEEP_COLUMNS = ("name", "size", "n_total", "n_non_embedding", "n_embedding", "n_head", "n_matmul", "tokens",
                 "steps", "c_6N", "c_6N+attn", "c_palm", "loss", "loss_lo", "loss_hi", "bpb", "bpb_lo", "bpb_hi",
                 "lr", "seed", "budget", "isoflop_c", "holdout", "wall_s", "status")


class FitError(ConfigError):
    """Points that cannot be fitted: a missing file or column, a bad value, too few points."""


# ---------------------------------------------------------------------------------------------- points


@dataclasses.dataclass
class Points:
    """The runs of a source: rows in file order; `held_out` rows are predicted, never fitted."""

    n: np.ndarray  # parameters, as the convention counts them
    d: np.ndarray  # training tokens
    c: np.ndarray  # training compute, C = k N D
    loss: np.ndarray
    names: list[str]
    sizes: list[str]  # size labels ("" for a plain CSV)
    held_out: np.ndarray  # bool
    isoflop_c: np.ndarray  # the IsoFLOP budget of each row, nan when the row has none
    excluded: list[dict]  # {"name", "status"} of runs that did not finish
    source: str  # the CSV that was read
    convention: str
    k: float
    k_note: str
    columns: dict | None = None  # the named columns of a points CSV (None for a sweep)

    @property
    def fitted(self) -> np.ndarray:
        return ~self.held_out


def results_path(source: str) -> str:
    """The CSV of a source: SWEEP_DIR/results.csv, or the file itself."""
    source = os.fspath(source)
    path = os.path.join(source, "results.csv") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        what = "has no results.csv (run the sweep first)" if os.path.isdir(source) else "does not exist"
        raise FitError(f"'{source}' {what}")
    return path


def _read_csv(path: str) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not header:
        raise FitError(f"{path} is empty: it needs a header row and one row per run")
    return header, rows


def _require_columns(path: str, header: list[str], needed: list[str], hint: str = "") -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise FitError(f"{path} has no column {', '.join(repr(c) for c in missing)}{hint}; "
                       f"its columns are: {', '.join(repr(c) for c in header)}")


def _number(path: str, line: int, name: str, row: dict, col: str) -> float:
    text = (row.get(col) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise FitError(f"{path} line {line} ({name}): column '{col}' is {text!r}, not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise FitError(f"{path} line {line} ({name}): column '{col}' is {text}; N, D, C and the loss must be "
                       "positive and finite (fix or remove the row)")
    return value


def _is_sweep_csv(header: list[str]) -> bool:
    return "name" in header and "status" in header


def read_sweep(source: str, convention: str = DEFAULT_CONVENTION, holdout_sizes=()) -> Points:
    """The finished runs of a sweep's results.csv; runs of `holdout_sizes` (and holdout=1 rows) are held out."""
    path = results_path(source)
    if convention not in CONVENTIONS:
        raise FitError(f"unknown convention '{convention}'; use one of {', '.join(CONVENTIONS)}")
    n_col, c_col, note = CONVENTIONS[convention]
    header, rows = _read_csv(path)
    _require_columns(path, header, ["name", "size", "tokens", "loss", "status", "holdout", "isoflop_c", n_col]
                     + ([c_col] if c_col else []), f" (needed by --convention {convention})")
    unknown = sorted(set(holdout_sizes) - {r["size"] for r in rows})
    if unknown:
        raise FitError(f"--holdout {', '.join(unknown)}: no such size in {path}; its sizes are "
                       f"{', '.join(sorted({r['size'] for r in rows}))}")
    cols = {k: [] for k in ("n", "d", "c", "loss", "names", "sizes", "held_out", "isoflop_c")}
    excluded = []
    for line, row in enumerate(rows, start=2):
        name, status = row["name"], (row["status"] or "").strip()
        if status != "done":
            excluded.append({"name": name, "status": status or "unknown"})
            continue
        n, d = _number(path, line, name, row, n_col), _number(path, line, name, row, "tokens")
        cols["n"].append(n)
        cols["d"].append(d)
        cols["c"].append(_number(path, line, name, row, c_col) if c_col else 6.0 * n * d)
        cols["loss"].append(_number(path, line, name, row, "loss"))
        cols["names"].append(name)
        cols["sizes"].append(row["size"])
        flag = (row["holdout"] or "0").strip().lower()
        if flag not in ("0", "1", "true", "false"):
            raise FitError(f"{path} line {line} ({name}): holdout is {flag!r}; use 0 or 1")
        cols["held_out"].append(flag in ("1", "true") or row["size"] in holdout_sizes)
        iso = (row["isoflop_c"] or "").strip()
        cols["isoflop_c"].append(_number(path, line, name, row, "isoflop_c") if iso else np.nan)
    pts = _points(cols, excluded, path, convention, 6.0, "C = 6ND")
    if c_col:
        ratio = pts.c[pts.fitted] / (pts.n[pts.fitted] * pts.d[pts.fitted])
        pts.k = float(np.median(ratio)) if ratio.size else 6.0
        pts.k_note = (f"C = k N D with k = {pts.k:.4g}, the median of {c_col} / (N D) over the fitted runs "
                      f"(used for --budget)")
    return pts


def read_points(path: str, n_col: str, loss_col: str, d_col: str | None = None, c_col: str | None = None) -> Points:
    """(N, D, loss) points of any CSV; D from `d_col`, or D = C / (6N) from `c_col`."""
    path = results_path(path)
    if (d_col is None) == (c_col is None):
        raise FitError("give exactly one of --d-col (tokens) and --c-col (compute, D = C / (6N))")
    header, rows = _read_csv(path)
    _require_columns(path, header, [n_col, loss_col, d_col or c_col])
    cols = {k: [] for k in ("n", "d", "c", "loss", "names", "sizes", "held_out", "isoflop_c")}
    for line, row in enumerate(rows, start=2):
        name = f"line {line}"
        n = _number(path, line, name, row, n_col)
        if d_col:
            d = _number(path, line, name, row, d_col)
            c = 6.0 * n * d
        else:
            c = _number(path, line, name, row, c_col)
            d = c / (6.0 * n)
        cols["n"].append(n)
        cols["d"].append(d)
        cols["c"].append(c)
        cols["loss"].append(_number(path, line, name, row, loss_col))
        cols["names"].append(name)
        cols["sizes"].append("")
        cols["held_out"].append(False)
        cols["isoflop_c"].append(np.nan)
    pts = _points(cols, [], path, "columns", 6.0, "C = 6ND")
    pts.columns = {"n_col": n_col, "loss_col": loss_col, "d_col": d_col, "c_col": c_col}
    return pts


def _points(cols: dict, excluded: list, path: str, convention: str, k: float, k_note: str) -> Points:
    arrays = {key: np.array(cols[key], np.float64) for key in ("n", "d", "c", "loss", "isoflop_c")}
    return Points(**arrays, names=cols["names"], sizes=cols["sizes"], held_out=np.array(cols["held_out"], bool),
                  excluded=excluded, source=path, convention=convention, k=k, k_note=k_note)


def load_source(source, convention: str | None = None, holdout_sizes=(), n_col: str | None = None,
                loss_col: str | None = None, d_col: str | None = None, c_col: str | None = None) -> Points:
    """A sweep directory or results.csv (by convention), or any CSV with the named columns."""
    path = results_path(source)
    if n_col or loss_col or d_col or c_col:
        if not (n_col and loss_col):
            raise FitError("a points CSV needs --n-col and --loss-col, and --d-col or --c-col")
        if convention or holdout_sizes:
            raise FitError("--convention and --holdout apply to a sweep's results.csv; for a points CSV, N and D "
                           "are the columns you name")
        return read_points(path, n_col, loss_col, d_col, c_col)
    header, _ = _read_csv(path)
    if not _is_sweep_csv(header):
        raise FitError(f"{path} is not a sweep's results.csv (it has columns {', '.join(map(repr, header))}); "
                       "name the columns with --n-col, --loss-col and --d-col or --c-col")
    return read_sweep(path, convention or DEFAULT_CONVENTION, holdout_sizes)


def check_fittable(points: Points) -> None:
    """Raise FitError when the fitted points cannot identify the five parameters of the law."""
    m = points.fitted
    n_pts, n_n, n_d = int(m.sum()), len(np.unique(points.n[m])), len(np.unique(points.d[m]))
    if n_pts < MIN_POINTS or n_n < MIN_DISTINCT or n_d < MIN_DISTINCT:
        raise FitError(f"{points.source}: {n_pts} fitted points with {n_n} distinct N and {n_d} distinct D; "
                       f"the law needs at least {MIN_POINTS} points, {MIN_DISTINCT} distinct N and "
                       f"{MIN_DISTINCT} distinct D (add runs, or hold out fewer)")


# ----------------------------------------------------------------------------------- objective, L-BFGS


def grid_starts() -> np.ndarray:
    """Besiroglu et al.'s 4500 starts, rows (a, b, e, alpha, beta): a, b in {0, 5, ..., 25},
    e in {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2}."""
    ab = np.arange(0.0, 26.0, 5.0)
    e = np.arange(-1.0, 1.01, 0.5)
    ex = np.arange(0.0, 2.01, 0.5)
    grid = np.meshgrid(ab, ab, e, ex, ex, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


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


# ---------------------------------------------------------------------------------------------- the law


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


# ----------------------------------------------------------------------------------------- uncertainty


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


def _groups(n, d) -> dict:
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
    groups = list(_groups(n, d).values())
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


def holdout_predictions(points: Points, x, boot_x, spread: dict) -> list[dict]:
    """Seed-mean measured loss against the prediction for every held-out (N, D) configuration."""
    idx = np.flatnonzero(points.held_out)
    out = []
    for rows in _groups(points.n[idx], points.d[idx]).values():
        rows = idx[rows]
        n, d, measured = points.n[rows[0]], points.d[rows[0]], float(points.loss[rows].mean())
        pred, lo, hi = (float(v[0]) for v in prediction_interval(x, boot_x, spread, [n], [d], [len(rows)]))
        out.append({"size": points.sizes[rows[0]], "runs": [points.names[i] for i in rows], "N": float(n),
                    "D": float(d), "C": float(points.c[rows].mean()), "seeds": len(rows), "measured": measured,
                    "predicted": pred, "ci95": [lo, hi], "relative_error": (pred - measured) / measured,
                    "inside": bool(lo <= measured <= hi)})
    return out


def budget_predictions(x, boot_x, budgets, k: float) -> list[dict]:
    """N*, D*, L* of each compute budget, with 95% intervals over the bootstrap fits."""
    budgets = np.asarray(list(budgets), np.float64)
    if not budgets.size:
        return []
    n, d, loss = optimum(x, budgets, k)
    bn, bd, bl = optimum(boot_x, budgets, k) if len(boot_x) else (np.zeros((0, len(budgets))),) * 3
    return [{"C": float(c), "N_opt": _value(n[0, j], bn[:, j]), "D_opt": _value(d[0, j], bd[:, j]),
             "loss": _value(loss[0, j], bl[:, j]), "tokens_per_parameter": float(d[0, j] / n[0, j])}
            for j, c in enumerate(budgets)]


def throughputs(path: str, header: list[str], rows: list[dict]) -> dict:
    """Per size of a sweep's results.csv (read as header, rows): training tokens per second of wall
    time, the median of tokens / wall_s over its finished straight and stable runs (start-up,
    compilation and evaluation included; a branch is left out, as its wall time covers only its
    cooldown)."""
    _require_columns(path, header, ["size", "tokens", "wall_s", "status"], " (needed by --seconds)")
    rates: dict = {}
    for line, row in enumerate(rows, start=2):
        if (row["status"] or "").strip() != "done" or (row.get("kind") or "").strip() == "branch":
            continue
        tokens, wall = (_number(path, line, row.get("name", ""), row, col) for col in ("tokens", "wall_s"))
        rates.setdefault(row["size"], []).append(tokens / wall)
    return {size: float(np.median(r)) for size, r in rates.items()}


def time_predictions(points: Points, x, boot_x, spread: dict, seconds: float) -> dict:
    """What each size of a sweep reaches in `seconds` of wall time on the machine that ran it:
    D = seconds x its measured throughput, the law's loss there with a one-seed 95% prediction
    interval (and bits per byte, at the runs' median ratio of the two), and the best size."""
    header, rows = _read_csv(points.source)
    rates = throughputs(points.source, header, rows)
    ratio = None
    if "bpb" in header:
        names = set(points.names)
        r = [float(row["bpb"]) / float(row["loss"]) for row in rows if row["name"] in names and row["bpb"]]
        ratio = float(np.median(r)) if r else None
    out = []
    for size in dict.fromkeys(points.sizes):
        if size not in rates:
            continue
        idx = [i for i, s in enumerate(points.sizes) if s == size]
        n, d = points.n[idx[0]], seconds * rates[size]
        pred, lo, hi = (float(v[0]) for v in prediction_interval(x, boot_x, spread, [n], [d], [1]))
        out.append({"size": size, "N": float(n), "tokens_per_s": rates[size], "D": float(d),
                    "D_max_run": float(points.d[idx].max()), "beyond_grid": bool(d > points.d[idx].max() * 1.05),
                    "loss": pred, "ci95": [lo, hi],
                    "bpb": None if ratio is None else pred * ratio,
                    "bpb_ci95": [None, None] if ratio is None else [lo * ratio, hi * ratio]})
    best = min(out, key=lambda r: r["loss"])["size"] if out else None
    return {"seconds": seconds, "sizes": out, "best": best, "bpb_per_nat": ratio}


def _value(value, samples) -> dict:
    return {"value": _num(value), "ci95": ci95(samples) if len(samples) else [None, None]}


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------- approach 2


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


# ------------------------------------------------------------------------------------------- the fit


def fit(points: Points, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, budgets=(), starts=None,
        seconds: float | None = None) -> dict:
    """Approach 3 with bootstrap intervals, approach 2 when there are IsoFLOP rows, held-out
    predictions and budget optima: the content of fit.json (see docs/scaling.md#fitting)."""
    import time

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
    result = {
        "source": {"path": points.source, "sha256": file_sha256(points.source), "columns": points.columns},
        "convention": points.convention,
        "convention_note": CONVENTIONS[points.convention][2] if points.convention in CONVENTIONS
        else _columns_note(points.columns),
        "k": points.k, "k_note": points.k_note, "points": int(m.sum()),
        "held_out_runs": [points.names[i] for i in np.flatnonzero(points.held_out)],
        "excluded": points.excluded,
        "law": {key: best[key] for key in ("E", "A", "B", "alpha", "beta")},
        "law_log": dict(zip(PARAM_NAMES, map(float, law_fit.x))),  # log A, log B, log E: finite where A overflows
    }
    for key in ("E", "alpha", "beta", "a", "A", "B"):
        result[key] = _value(best[key], [s[key] for s in samples])
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


def _columns_note(columns: dict) -> str:
    if columns["d_col"]:
        return f"N = '{columns['n_col']}', D = '{columns['d_col']}', C = 6ND"
    return f"N = '{columns['n_col']}', C = '{columns['c_col']}', D = C / (6N)"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_result(result: dict, out_dir: str) -> str:
    """Write `result` to out_dir/fit.json (nan becomes null); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fit.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(result), f, indent=2)
        f.write("\n")
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------------------- output


def _g(v, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def _ci(v: dict, digits: int = 4) -> str:
    lo, hi = v["ci95"]
    return "" if lo is None else f"[{_g(lo, digits)}, {_g(hi, digits)}]"


def excluded_line(excluded: list[dict]) -> str:
    """'excluded 1 diverged run: s3-b2-seed1; 2 failed runs: a, b' (empty when none)."""
    by_status: dict = {}
    for e in excluded:
        by_status.setdefault(e["status"], []).append(e["name"])
    parts = [f"{len(v)} {s} run{'s' if len(v) > 1 else ''}: {', '.join(v)}" for s, v in by_status.items()]
    return "excluded " + "; ".join(parts) if parts else ""


def format_table(result: dict) -> str:
    """A readable summary of a fit result."""
    st = result["starts"]
    lines = [f"{result['source']['path']}: {result['points']} runs fitted; {result['convention_note']}"]
    if result["excluded"]:
        lines.append(excluded_line(result["excluded"]))
    if result["held_out_runs"]:
        lines.append(f"held out {len(result['held_out_runs'])} runs: {', '.join(result['held_out_runs'])}")
    start = " ".join(f"{k}={_g(v)}" for k, v in st["best_start"].items())
    lines += [f"L(N, D) = E + A/N^alpha + B/D^beta; Huber({HUBER_DELTA:g}) on log L, objective "
              f"{result['objective']['value']:.6g}; {st['reached_best']} of {st['count']} starts reached it "
              f"(rel. tol. {st['rtol']:g}); best start {start}",
              f"{'':24s}{'value':>10s}  95% interval ({result['bootstrap']['samples']} bootstrap samples)"]
    for key, label in (("E", "E"), ("alpha", "alpha"), ("beta", "beta"), ("a", "a = beta/(alpha+beta)"),
                       ("A", "A"), ("B", "B")):
        flag = "  (weakly identified)" if result[key].get("weakly_identified") else ""
        lines.append(f"{label:24s}{_g(result[key]['value']):>10s}  {_ci(result[key])}{flag}")
    sc = result["scatter"]
    lines.append(f"scatter in log L: {sc['between']:.3g} between configurations, {sc['within']:.3g} between "
                 f"seeds ({sc['replicated']} of {sc['configurations']} configurations have several seeds)")
    lines += _isoflop_lines(result["isoflop"]) + _holdout_lines(result["holdout"]) + _budget_lines(result)
    lines += _time_lines(result.get("time_budget"))
    return "\n".join(lines)


def _isoflop_lines(iso: dict | None) -> list[str]:
    if iso is None:
        return []
    lines = ["approach 2 (IsoFLOP parabolas):"]
    for b in iso["budgets"]:
        if b["used"]:
            lines.append(f"  C = {b['C']:.3g} ({b['sizes']} sizes, {b['runs']} runs): N_opt = {_g(b['N_opt'])}")
        else:
            lines.append(f"  refused {b['reason']} ({b['sizes']} sizes, {b['runs']} runs)")
    if iso["a"] is None:
        lines.append(f"  no exponent: {iso['reason']}")
    else:
        lines.append(f"  N_opt ~ C^a with a = {_g(iso['a']['value'])} {_ci(iso['a'])} "
                     f"({iso['bootstrap_used']} of {iso['bootstrap_samples']} bootstrap samples usable)")
    return lines


def _holdout_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["held out (95% prediction interval of the mean loss of that many seeds):",
             f"  {'size':10s}{'N':>10s}{'D':>10s}{'seeds':>6s}{'measured':>10s}{'predicted':>10s}"
             f"{'interval':>22s}{'rel.err':>9s}  inside"]
    for r in rows:
        interval = f"[{_g(r['ci95'][0])}, {_g(r['ci95'][1])}]"
        lines.append(f"  {r['size'] or '-':10s}{_g(r['N'], 3):>10s}{_g(r['D'], 3):>10s}{r['seeds']:>6d}"
                     f"{_g(r['measured']):>10s}{_g(r['predicted']):>10s}{interval:>22s}"
                     f"{100 * r['relative_error']:>8.2f}%  {'yes' if r['inside'] else 'no'}")
    return lines


def _budget_lines(result: dict) -> list[str]:
    if not result["budgets"]:
        return []
    lines = [f"compute-optimal ({result['k_note']}; 95% intervals over the bootstrap fits):"]
    for b in result["budgets"]:
        lines.append(f"  C = {b['C']:.3g}: N* = {_g(b['N_opt']['value'])} {_ci(b['N_opt'])}, D* = "
                     f"{_g(b['D_opt']['value'])} {_ci(b['D_opt'])}, L* = {_g(b['loss']['value'])} "
                     f"{_ci(b['loss'])}, D*/N* = {_g(b['tokens_per_parameter'], 3)}")
    return lines


def _time_lines(tb: dict | None) -> list[str]:
    if not tb:
        return []
    bpb = tb["bpb_per_nat"] is not None
    lines = [f"in {tb['seconds']:g} s of wall time (D = seconds x each size's measured tokens/s; 95% prediction "
             "interval of one run):",
             f"  {'size':10s}{'N':>10s}{'tokens/s':>10s}{'D':>10s}{'D/N':>7s}{'loss':>9s}{'interval':>20s}"
             + (f"{'bpb':>8s}{'interval':>20s}" if bpb else "")]
    for r in tb["sizes"]:
        row = (f"  {r['size']:10s}{_g(r['N'], 3):>10s}{r['tokens_per_s']:>10.0f}{_g(r['D'], 3):>10s}"
               f"{r['D'] / r['N']:>7.1f}{r['loss']:>9.4f}{_pair(r['ci95']):>20s}")
        if bpb:
            row += f"{r['bpb']:>8.4f}{_pair(r['bpb_ci95']):>20s}"
        if r["beyond_grid"]:
            row += f"  beyond its runs (largest D {_g(r['D_max_run'], 3)})"
        lines.append(row)
    if tb["best"] is not None:
        lines.append(f"  best in {tb['seconds']:g} s: {tb['best']}")
    return lines


def _pair(v) -> str:
    return f"[{v[0]:.4f}, {v[1]:.4f}]"


# ---------------------------------------------------------------------------------------------- CLI


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


def command(args) -> tuple[Points, dict, str]:
    """`jaxlm fit` without its figures: fit, print the table, write fit.json. Returns (points, the
    fit, the output directory), from which `jaxlm fit --plot` draws (jaxlm.fit_plot)."""
    points = load_source(args.source, args.convention, args.holdout, args.n_col, args.loss_col, args.d_col,
                         args.c_col)
    result = fit(points, bootstrap=args.bootstrap, seed=args.seed, budgets=args.budget,
                 seconds=getattr(args, "seconds", None))
    out = args.out or os.path.dirname(os.path.abspath(points.source))
    print(format_table(result))
    print(f"wrote {write_result(result, out)}")
    return points, result, out
