"""What the fitted law predicts: held-out runs, compute-optimal sizes of given budgets, and what
each size of a sweep reaches in a given wall time. Each comes with a 95% interval."""

from __future__ import annotations

import numpy as np

from jaxlm.scaling.bootstrap import prediction_interval, seed_groups, with_ci95
from jaxlm.scaling.law import optimum
from jaxlm.scaling.points import Points, number, read_csv, require_columns


def holdout_predictions(points: Points, x, boot_x, spread: dict) -> list[dict]:
    """Seed-mean measured loss against the prediction for every held-out (N, D) configuration."""
    idx = np.flatnonzero(points.held_out)
    out = []
    for rows in seed_groups(points.n[idx], points.d[idx]).values():
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
    return [{"C": float(c), "N_opt": with_ci95(n[0, j], bn[:, j]), "D_opt": with_ci95(d[0, j], bd[:, j]),
             "loss": with_ci95(loss[0, j], bl[:, j]), "tokens_per_parameter": float(d[0, j] / n[0, j])}
            for j, c in enumerate(budgets)]


def throughputs(path: str, header: list[str], rows: list[dict]) -> dict:
    """Per size of a sweep's results.csv (read as header, rows): training tokens per second of wall
    time, the median of tokens / wall_s over its finished straight and stable runs (start-up,
    compilation and evaluation included; a branch is left out, as its wall time covers only its
    cooldown)."""
    require_columns(path, header, ["size", "tokens", "wall_s", "status"], " (needed by --seconds)")
    rates: dict = {}
    for line, row in enumerate(rows, start=2):
        if (row["status"] or "").strip() != "done" or (row.get("kind") or "").strip() == "branch":
            continue
        tokens, wall = (number(path, line, row.get("name", ""), row, col) for col in ("tokens", "wall_s"))
        rates.setdefault(row["size"], []).append(tokens / wall)
    return {size: float(np.median(r)) for size, r in rates.items()}


def time_predictions(points: Points, x, boot_x, spread: dict, seconds: float) -> dict:
    """What each size of a sweep reaches in `seconds` of wall time on the machine that ran it:
    D = seconds x its measured throughput, the law's loss there with a one-seed 95% prediction
    interval (and bits per byte, at the runs' median ratio of the two), and the best size."""
    header, rows = read_csv(points.source)
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

