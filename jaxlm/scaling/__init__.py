"""Scaling laws: sweeps of training runs, and the laws fitted to them.

The pipeline: a sweep file (YAML) -> its plan of runs -> each run trains and writes its
run_summary.json -> results.csv / results.json (one row per finished run) -> `jaxlm fit`
(fit.json and a table) -> the figures. docs/scaling.md is the reference.

Sweeps (`jaxlm sweep`):
  sweep_file  the sweep file: Sweep, Size, the typed lr and warmup rules, shapes from a target N
  plan        PlannedRun and `plan`: names, budgets, wsd stable runs and branches, train overrides
  run         `run_sweep`: trains what is unfinished, resumably, in this process; the drift check
  results     RESULT_COLUMNS (the results.csv format), run status, result rows, rescoring
  cluster     SLURM job arrays, one task per run

Fits (`jaxlm fit`, `jaxlm plot SWEEP_DIR`):
  points      Points: a sweep's results.csv or any CSV of (N, D, loss), checked
  lbfgs       the law's Huber objective and the batched L-BFGS that minimises it from many starts
  law         L(N, D) = E + A/N^alpha + B/D^beta: its value, its compute optimum, `fit_law(s)`
  bootstrap   bootstrap refits, 95% intervals, scatter, prediction intervals
  predict     held-out runs, compute budgets, wall-time budgets
  isoflop     approach 2: IsoFLOP parabolas and the exponent of N_opt(C)
  report      the printed table and fit.json
  fitting     `fit` (the content of fit.json) and the `jaxlm fit` command
  plot        the figures of a sweep and its fit
"""
