"""Figures of a sweep and its scaling-law fit (`jaxlm plot SWEEP_DIR`, `jaxlm fit --plot`).

`plot_sweep` writes four PNGs: loss against compute with the fitted compute-optimal frontier
L*(C); IsoFLOP curves (loss against N per budget with the approach-2 parabolas, or, without
IsoFLOP rows, loss against N per token budget with the fitted law); fitted against measured
loss; relative residuals against N and C. Held-out runs are drawn hollow in black.
docs/scaling.md#plots describes them.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxlm.plot import save_figure
from jaxlm.scaling import fitting
from jaxlm.scaling.law import PARAM_NAMES, log_loss, optimum
from jaxlm.scaling.points import Points, file_sha256, load_source, read_points, read_sweep, results_path

FIGURES = ("loss_vs_compute.png", "isoflop.png", "fit_vs_measured.png", "residuals.png")
MAX_TOKEN_GROUPS = 8  # without IsoFLOP rows, more distinct D than this are binned by log D
MAX_SIZE_COLOURS = 10  # more size labels than this are coloured by log N on a colour bar


def plot_sweep(source, out_dir: str, fit_result: dict | None = None) -> list[str]:
    """Draw the figures of `source` (a sweep directory, a results-like CSV, or a `Points`) into
    `out_dir`; returns the paths written. Without `fit_result`, a fit.json next to the source (or
    in out_dir or its parent) of the same data is used, else the law is fitted (no bootstrap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, result = _inputs(source, out_dir, fit_result)
    x = _law_x(result)
    style = _Style(points, plt)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, draw, panels in ((FIGURES[0], _loss_vs_compute, 1), (FIGURES[1], _isoflop, 1),
                               (FIGURES[2], _fit_vs_measured, 1), (FIGURES[3], _residuals, 2)):
        fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
        draw(axes[0], points, result, x, style)
        written.append(save_figure(fig, out_dir, name, dpi=110))
    return written


def _inputs(source, out_dir: str, fit_result: dict | None) -> tuple[Points, dict]:
    """The points and the fit result to draw; a points object passed in is used as it is."""
    if isinstance(source, Points):
        points = source
        result = fit_result if fit_result is not None else fitting.fit(points, bootstrap=0)
        return points, result
    path = results_path(source)
    result = fit_result if fit_result is not None else _saved_fit(path, out_dir)
    if result is None:
        points = load_source(path)
        return points, fitting.fit(points, bootstrap=0)
    columns = result["source"].get("columns")
    if columns:
        points = read_points(path, **columns)
    else:
        points = read_sweep(path, result["convention"])
    points.held_out |= np.isin(points.names, result["held_out_runs"])
    return points, result


def _saved_fit(path: str, out_dir: str) -> dict | None:
    """A fit.json of exactly this CSV (same sha256), next to it, in out_dir or in out_dir's parent."""
    sha = file_sha256(path)
    for directory in (os.path.dirname(os.path.abspath(path)), out_dir, os.path.dirname(os.path.abspath(out_dir))):
        candidate = os.path.join(directory, "fit.json")
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("source", {}).get("sha256") == sha and saved.get("law"):
                return saved
    return None


def _law_x(result: dict) -> np.ndarray:
    """The law's (log A, log B, log E, alpha, beta): from `law_log` (finite even when A or B
    overflows a float, as in a degenerate fit), else from `law` (a fit.json written before)."""
    if result.get("law_log"):
        return np.array([result["law_log"][k] for k in PARAM_NAMES], np.float64)
    law = {k: np.inf if v is None else v for k, v in result["law"].items()}
    return np.array([np.log(law["A"]), np.log(law["B"]), np.log(law["E"]), law["alpha"], law["beta"]])


class _Style:
    """One colour per size label (ordered by N), or a colour scale of log N for unlabelled points
    (or more than MAX_SIZE_COLOURS labels)."""

    def __init__(self, points: Points, plt):
        labels = sorted({s for s in points.sizes if s},
                        key=lambda s: np.median(points.n[np.array(points.sizes) == s]))
        self.labelled = bool(labels) and all(points.sizes) and len(labels) <= MAX_SIZE_COLOURS
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        self.by_size = {s: cycle[i % len(cycle)] for i, s in enumerate(labels)} if self.labelled else {}
        self.cmap = plt.get_cmap("viridis")
        self.log_n = (np.log(points.n.min()), np.log(points.n.max()))

    def colors(self, points: Points, rows) -> list:
        if self.labelled:
            return [self.by_size[points.sizes[i]] for i in rows]
        lo, hi = self.log_n
        return [self.cmap((np.log(points.n[i]) - lo) / (hi - lo) if hi > lo else 0.5) for i in rows]

    def colour_bar(self, ax) -> None:
        import matplotlib.cm
        import matplotlib.colors

        lo, hi = (v / np.log(10) for v in self.log_n)
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(lo, hi if hi > lo else lo + 1), self.cmap)
        ax.figure.colorbar(mappable, ax=ax, label="log10 N")

    def scatter(self, ax, points: Points, xs, ys, rows, legend: bool = True) -> None:
        """Fitted rows filled in their colour (one legend entry per size), held-out rows hollow in black."""
        rows = np.asarray(rows)
        fitted = rows[~points.held_out[rows]]
        held = rows[points.held_out[rows]]
        pos = {r: i for i, r in enumerate(rows)}
        if self.labelled and legend:
            for size, color in self.by_size.items():
                sel = [r for r in fitted if points.sizes[r] == size]
                if sel:
                    ax.scatter([xs[pos[r]] for r in sel], [ys[pos[r]] for r in sel], s=22, color=color, label=size)
        elif len(fitted):
            ax.scatter([xs[pos[r]] for r in fitted], [ys[pos[r]] for r in fitted], s=22,
                       c=self.colors(points, fitted))
            if legend:
                self.colour_bar(ax)
        if len(held):
            ax.scatter([xs[pos[r]] for r in held], [ys[pos[r]] for r in held], s=40, facecolors="none",
                       edgecolors="black", linewidths=1.2, label="held out" if legend else None)


def _loss_vs_compute(axes, points, result, x, style) -> None:
    ax = axes[0]
    rows = np.arange(len(points.n))
    style.scatter(ax, points, points.c, points.loss, rows)
    c = np.geomspace(points.c.min() / 3, points.c.max() * 3, 200)
    _, _, frontier = optimum(x, c, result["k"])
    ax.plot(c, frontier[0], color="black", lw=1.5, label="fitted compute-optimal L*(C)")
    ax.set(xscale="log", xlabel=f"training compute C (FLOPs; {result['k_note']})", ylabel="loss",
           title=f"loss against compute ({result['points']} runs fitted)")
    _legend(ax)


def _isoflop(axes, points, result, x, style) -> None:
    ax = axes[0]
    iso = result.get("isoflop")
    rows = np.flatnonzero(np.isfinite(points.isoflop_c))
    if iso and rows.size:
        _isoflop_parabolas(ax, points, iso, x, result["k"])
    else:
        _token_groups(ax, points, x, style)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss")
    _legend(ax)


def _isoflop_parabolas(ax, points, iso: dict, x, k: float) -> None:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, b in enumerate(iso["budgets"]):
        color = cycle[i % len(cycle)]
        rows = np.flatnonzero(points.isoflop_c == b["C"])
        fitted = rows[~points.held_out[rows]]
        ax.scatter(points.n[fitted], points.loss[fitted], s=22, color=color)
        held = rows[points.held_out[rows]]
        ax.scatter(points.n[held], points.loss[held], s=40, facecolors="none", edgecolors="black")
        label = f"C = {b['C']:.2g}" + ("" if b["used"] else " (refused)")
        if b["coef"] is not None:
            n = np.geomspace(points.n[rows].min() / 1.5, points.n[rows].max() * 1.5, 100)
            ax.plot(n, np.polyval(b["coef"], np.log(n)), color=color, ls="-" if b["used"] else "--", label=label)
        else:
            ax.plot([], [], color=color, ls="--", label=label)
        if b["used"]:
            ax.scatter([b["N_opt"]], [np.polyval(b["coef"], np.log(b["N_opt"]))], marker="*", s=140,
                       color=color, edgecolors="black", zorder=3)
        n = np.geomspace(points.n[rows].min(), points.n[rows].max(), 60)
        ax.plot(n, np.exp(log_loss(x, n, b["C"] / (k * n))[0]), color=color, ls=":", lw=1)
    a = iso.get("a")
    slope = f"; N_opt ~ C^{a['value']:.3f}" if a else ""
    ax.set_title(f"IsoFLOP profiles: parabolas in log N (lines), the fitted law (dotted){slope}", fontsize=9)


def _token_groups(ax, points, x, style) -> None:
    """Loss against N for each token budget (binned by log D when there are many) with L(N, D)."""
    import matplotlib.pyplot as plt

    log_d = np.log(points.d)
    keys = np.unique(np.round(log_d, 6))
    binned = len(keys) > MAX_TOKEN_GROUPS
    if binned:
        edges = np.quantile(log_d, np.linspace(0, 1, MAX_TOKEN_GROUPS + 1))
        group = np.clip(np.searchsorted(edges, log_d, side="right") - 1, 0, MAX_TOKEN_GROUPS - 1)
    else:
        group = np.searchsorted(keys, np.round(log_d, 6))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_line = np.geomspace(points.n.min() / 1.5, points.n.max() * 1.5, 100)
    for j, g in enumerate(np.unique(group)):
        rows = np.flatnonzero(group == g)
        color = cycle[j % len(cycle)]
        d = float(np.exp(np.median(log_d[rows])))
        fitted = rows[~points.held_out[rows]]
        held = rows[points.held_out[rows]]
        ax.scatter(points.n[fitted], points.loss[fitted], s=22, color=color)
        ax.scatter(points.n[held], points.loss[held], s=40, facecolors="none", edgecolors="black")
        ax.plot(n_line, np.exp(log_loss(x, n_line, d)[0]), color=color,
                label=f"D {'~' if binned else '='} {d:.3g}")
    what = f"{MAX_TOKEN_GROUPS} bins of log D (curves at each bin's median D)" if binned else "token budget"
    ax.set_title(f"loss against N per {what}, with the fitted L(N, D)", fontsize=9)


def _fit_vs_measured(axes, points, result, x, style) -> None:
    ax = axes[0]
    pred = np.exp(log_loss(x, points.n, points.d)[0])
    style.scatter(ax, points, points.loss, pred, np.arange(len(pred)))
    lo, hi = min(pred.min(), points.loss.min()), max(pred.max(), points.loss.max())
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, label="y = x")
    ax.set(xlabel="measured loss", ylabel="fitted L(N, D)", title="fitted against measured")
    _legend(ax)


def _residuals(axes, points, result, x, style) -> None:
    pred = np.exp(log_loss(x, points.n, points.d)[0])
    rel = 100 * (points.loss / pred - 1)
    band = 100 * result["scatter"]["rms_relative"]
    for ax, values, label in ((axes[0], points.n, "parameters N"), (axes[1], points.c, "training compute C")):
        style.scatter(ax, points, values, rel, np.arange(len(rel)), legend=ax is axes[0])
        ax.axhline(0, color="gray", lw=1)
        for sign in (-1, 1):
            ax.axhline(sign * band, color="gray", lw=0.8, ls=":")
        ax.set(xscale="log", xlabel=label, ylabel="measured / fitted - 1 (%)",
               title=f"relative residuals (dotted: rms of the fitted runs, {band:.2f}%)")
    _legend(axes[0])


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="best")
