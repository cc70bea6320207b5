"""The (N, D, C, loss) points a law is fitted to: a sweep's results.csv, or any CSV with named columns.

Every check on the input lives here, so that a bad file is refused with its path, line and
column before any fitting starts.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os

import numpy as np

from jaxlm.errors import ConfigError

DEFAULT_CONVENTION = "total"
MIN_POINTS = 5
MIN_DISTINCT = 3  # distinct N and distinct D values the law needs

# convention -> (N column, C column or None for C = 6ND, what it means)
CONVENTIONS = {
    "total": ("n_total", None, "N = n_total (all parameters), C = 6ND (Hoffmann et al. 2022)"),
    "non_embedding": ("n_non_embedding", None, "N = n_non_embedding, C = 6ND (Kaplan et al. 2020)"),
    "6N+attn": ("n_matmul", "c_6N+attn", "N = n_matmul, C = c_6N+attn (6N plus attention FLOPs)"),
    "palm": ("n_matmul", "c_palm", "N = n_matmul, C = c_palm (PaLM's FLOP count)"),
}
_COLUMNS = ("n", "d", "c", "loss", "names", "sizes", "held_out", "isoflop_c")  # what a reader collects per row


class FitError(ConfigError):
    """Points that cannot be fitted: a missing file or column, a bad value, too few points."""


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


def file_sha256(path: str) -> str:
    """The digest fit.json stores, by which a figure finds the fit of exactly its data."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_csv(path: str) -> tuple[list[str], list[dict]]:
    """(header, rows) of a CSV that has at least a header."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not header:
        raise FitError(f"{path} is empty: it needs a header row and one row per run")
    return header, rows


def require_columns(path: str, header: list[str], needed: list[str], hint: str = "") -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise FitError(f"{path} has no column {', '.join(repr(c) for c in missing)}{hint}; "
                       f"its columns are: {', '.join(repr(c) for c in header)}")


def number(path: str, line: int, name: str, row: dict, col: str) -> float:
    """The positive, finite value of `col` in a row (line and run name for the error)."""
    text = (row.get(col) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise FitError(f"{path} line {line} ({name}): column '{col}' is {text!r}, not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise FitError(f"{path} line {line} ({name}): column '{col}' is {text}; N, D, C and the loss must be "
                       "positive and finite (fix or remove the row)")
    return value


def is_sweep_csv(header: list[str]) -> bool:
    return "name" in header and "status" in header


def read_sweep(source: str, convention: str = DEFAULT_CONVENTION, holdout_sizes=()) -> Points:
    """The finished runs of a sweep's results.csv; runs of `holdout_sizes` (and holdout=1 rows) are held out."""
    path = results_path(source)
    if convention not in CONVENTIONS:
        raise FitError(f"unknown convention '{convention}'; use one of {', '.join(CONVENTIONS)}")
    n_col, c_col, _ = CONVENTIONS[convention]
    header, rows = read_csv(path)
    require_columns(path, header, ["name", "size", "tokens", "loss", "status", "holdout", "isoflop_c", n_col]
                    + ([c_col] if c_col else []), f" (needed by --convention {convention})")
    unknown = sorted(set(holdout_sizes) - {r["size"] for r in rows})
    if unknown:
        raise FitError(f"--holdout {', '.join(unknown)}: no such size in {path}; its sizes are "
                       f"{', '.join(sorted({r['size'] for r in rows}))}")
    cols: dict = {k: [] for k in _COLUMNS}
    excluded = []
    for line, row in enumerate(rows, start=2):
        status = (row["status"] or "").strip()
        if status != "done":
            excluded.append({"name": row["name"], "status": status or "unknown"})
            continue
        _add_sweep_row(cols, path, line, row, n_col, c_col, holdout_sizes)
    pts = _points(cols, excluded, path, convention)
    if c_col:
        ratio = pts.c[pts.fitted] / (pts.n[pts.fitted] * pts.d[pts.fitted])
        pts.k = float(np.median(ratio)) if ratio.size else 6.0
        pts.k_note = (f"C = k N D with k = {pts.k:.4g}, the median of {c_col} / (N D) over the fitted runs "
                      f"(used for --budget)")
    return pts


def _add_sweep_row(cols: dict, path: str, line: int, row: dict, n_col: str, c_col: str | None,
                   holdout_sizes) -> None:
    """Append one finished run of a results.csv to the collected columns."""
    name = row["name"]
    n, d = number(path, line, name, row, n_col), number(path, line, name, row, "tokens")
    cols["n"].append(n)
    cols["d"].append(d)
    cols["c"].append(number(path, line, name, row, c_col) if c_col else 6.0 * n * d)
    cols["loss"].append(number(path, line, name, row, "loss"))
    cols["names"].append(name)
    cols["sizes"].append(row["size"])
    flag = (row["holdout"] or "0").strip().lower()
    if flag not in ("0", "1", "true", "false"):
        raise FitError(f"{path} line {line} ({name}): holdout is {flag!r}; use 0 or 1")
    cols["held_out"].append(flag in ("1", "true") or row["size"] in holdout_sizes)
    iso = (row["isoflop_c"] or "").strip()
    cols["isoflop_c"].append(number(path, line, name, row, "isoflop_c") if iso else np.nan)


def read_points(path: str, n_col: str, loss_col: str, d_col: str | None = None, c_col: str | None = None) -> Points:
    """(N, D, loss) points of any CSV; D from `d_col`, or D = C / (6N) from `c_col`."""
    path = results_path(path)
    if (d_col is None) == (c_col is None):
        raise FitError("give exactly one of --d-col (tokens) and --c-col (compute, D = C / (6N))")
    header, rows = read_csv(path)
    require_columns(path, header, [n_col, loss_col, d_col or c_col])
    cols: dict = {k: [] for k in _COLUMNS}
    for line, row in enumerate(rows, start=2):
        name = f"line {line}"
        n = number(path, line, name, row, n_col)
        if d_col:
            d = number(path, line, name, row, d_col)
            c = 6.0 * n * d
        else:
            c = number(path, line, name, row, c_col)
            d = c / (6.0 * n)
        for key, value in (("n", n), ("d", d), ("c", c), ("loss", number(path, line, name, row, loss_col)),
                           ("names", name), ("sizes", ""), ("held_out", False), ("isoflop_c", np.nan)):
            cols[key].append(value)
    pts = _points(cols, [], path, "columns")
    pts.columns = {"n_col": n_col, "loss_col": loss_col, "d_col": d_col, "c_col": c_col}
    return pts


def _points(cols: dict, excluded: list, path: str, convention: str) -> Points:
    """Points with C = 6ND assumed (a reader that knows better sets k and its note after)."""
    arrays = {key: np.array(cols[key], np.float64) for key in ("n", "d", "c", "loss", "isoflop_c")}
    return Points(**arrays, names=cols["names"], sizes=cols["sizes"], held_out=np.array(cols["held_out"], bool),
                  excluded=excluded, source=path, convention=convention, k=6.0, k_note="C = 6ND")


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
    header, _ = read_csv(path)
    if not is_sweep_csv(header):
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
