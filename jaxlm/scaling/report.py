"""A fit's outputs: the table `jaxlm fit` prints and fit.json (nan and infinities written as null)."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxlm import files
from jaxlm.scaling.lbfgs import HUBER_DELTA


def write_result(result: dict, out_dir: str) -> str:
    """Write `result` to out_dir/fit.json (nan becomes null); returns the path."""
    path = os.path.join(out_dir, "fit.json")
    files.write_json(path, _jsonable(result), indent=2)
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

